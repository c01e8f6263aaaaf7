"""The daemon's TLS files are checked in a child process with TLSConfig's own rules and words."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from daemon import tlsfiles
from daemon.tlsfiles import DaemonTLSConfig
from fleet.errors import ConfigError
from fleet.pki import CertificateAuthority
from fleet.tls import TLSConfig

LATER = dt.datetime.now(dt.UTC) + dt.timedelta(days=3650)


def lean(cfg: TLSConfig) -> DaemonTLSConfig:
    return DaemonTLSConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})


def message(cfg: TLSConfig, now: dt.datetime | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        cfg.validate(now=now)
    return info.value.message


@pytest.fixture
def spawns(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Counts child checks (the real ones run)."""
    calls: list[Path] = []
    real = tlsfiles._check_in_child

    def counting(cfg: TLSConfig, now: dt.datetime) -> Any:
        calls.append(cfg.cert_file)
        return real(cfg, now)

    monkeypatch.setattr(tlsfiles, "_check_in_child", counting)
    return calls


def test_same_result_as_in_process(pki: Any) -> None:
    """Identity, PEM bytes and validity equal what TLSConfig loads itself."""
    cfg = pki.issue("node", "n1")
    mine, theirs = lean(cfg)._load(now=None), cfg._load(now=None)
    assert mine == theirs
    assert lean(cfg).identity().name == "n1"


def test_same_words_for_unusable_files(pki: Any, tmp_path: Path) -> None:
    """A foreign certificate, a swapped key and garbage give TLSConfig's exact message."""
    good = pki.issue("node", "n1")
    foreign = CertificateAuthority.create().issue("node", "n1").write(tmp_path / "foreign")
    other = pki.issue("node", "n2")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    for bad in (
        TLSConfig(good.ca_file, foreign.cert_file, foreign.key_file),
        TLSConfig(good.ca_file, good.cert_file, other.key_file),
        TLSConfig(good.ca_file, garbage, good.key_file),
        TLSConfig(good.ca_file, good.cert_file, tmp_path / "missing.pem"),
    ):
        assert message(lean(bad)) == message(bad)


def test_files_are_checked_once_until_they_change(pki: Any, spawns: list[Path]) -> None:
    """Repeated loads reuse the result; a replaced file is checked again (and may fail)."""
    cfg = lean(pki.issue("node", "n1"))
    cfg.identity()
    cfg.validate()
    assert len(spawns) == 1
    foreign = CertificateAuthority.create().issue("node", "n1")
    cfg.cert_file.write_bytes(foreign.cert_pem)
    cfg.key_file.write_bytes(foreign.key_pem)
    with pytest.raises(ConfigError, match="not signed by the CA"):
        cfg.validate()
    assert len(spawns) == 2


def test_dates_are_checked_on_every_use(pki: Any, spawns: list[Path]) -> None:
    """A kept result still expires: the same message as TLSConfig, without a new child."""
    plain = pki.issue("node", "n1", valid_days=30)
    cfg = lean(plain)
    cfg.validate()
    assert message(cfg, now=LATER) == message(plain, now=LATER)
    assert "expired on" in message(cfg, now=LATER)
    assert len(spawns) == 1
