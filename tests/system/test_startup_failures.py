"""A manager or daemon that cannot start says why in exactly one line, exits 2,
and leaves no trace: every listen address is checked before anything else.

Real `fleet-manager` and `fleet-daemon` processes; a port is "taken" by a
listening socket the test holds.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import short_tmp

from fleet.pki import CertificateAuthority
from fleet.tls import TLSConfig

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@contextmanager
def taken_port() -> Iterator[int]:
    """A port another process (this test) listens on, as gRPC and http.server would."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *cmd],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a refused start (asserting exit 2 and nothing else)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


def manager_toml(path: Path, tls: TLSConfig, listen: int, metrics: int) -> Path:
    path.write_text(
        f'state_dir = "{path.parent / "state"}"\n'
        f'[server]\nlisten = "127.0.0.1:{listen}"\nmetrics_listen = "127.0.0.1:{metrics}"\n'
        f'[tls]\nca_file = "{tls.ca_file}"\ncert_file = "{tls.cert_file}"\n'
        f'key_file = "{tls.key_file}"\n'
    )
    return path


def daemon_toml(path: Path, tls: TLSConfig, listen: int, metrics: int, run_dir: Path) -> Path:
    path.write_text(
        f'listen = "127.0.0.1:{listen}"\nmetrics_listen = "127.0.0.1:{metrics}"\n'
        f'state_dir = "{path.parent / "state"}"\nlog_dir = "{path.parent / "log"}"\n'
        f'run_dir = "{run_dir}"\n'
        f'[tls]\nca_file = "{tls.ca_file}"\ncert_file = "{tls.cert_file}"\n'
        f'key_file = "{tls.key_file}"\n'
        '[manager]\naddresses = ["127.0.0.1:1"]\n'
        '[[agents]]\nid = "web"\nargv = ["sleep", "1000"]\n'
    )
    return path


def contents(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.mark.parametrize("which", ["listen", "metrics_listen", "same port twice"])
def test_manager_with_a_taken_port_changes_nothing(pki: Any, tmp_path: Path, which: str) -> None:
    """Port in use: one line naming the setting, exit 2, no database created."""
    tls = pki.issue("manager", "m1")
    with taken_port() as busy:
        port = free_port()
        ports = {
            "listen": (busy, port),
            "metrics_listen": (port, busy),
            "same port twice": (port, port),
        }[which]
        cfg = manager_toml(tmp_path / "manager.toml", tls, *ports)
        before = contents(tmp_path)
        line = one_line(run(["manager.cli", "serve", "--config", str(cfg)]))
    setting = "server.listen" if which == "listen" else "server.metrics_listen"
    address = f"127.0.0.1:{busy if which != 'same port twice' else port}"
    assert line == (
        f"fleet-manager: {setting} {address}: cannot listen: address already in use"
        " (another process listens there)"
    )
    assert contents(tmp_path) == before  # no state dir, no manager.db


def test_manager_with_a_missing_or_mismatched_certificate_prints_one_line(
    pki: Any, tmp_path: Path
) -> None:
    """A missing certificate or a key of another certificate: one line, no 'manager stopped'."""
    tls = pki.issue("manager", "m1")
    missing = TLSConfig(tls.ca_file, tmp_path / "gone.pem", tls.key_file)
    cfg = manager_toml(tmp_path / "manager.toml", missing, free_port(), free_port())
    assert "gone.pem: no such file" in one_line(run(["manager.cli", "serve", "--config", str(cfg)]))
    other = pki.issue("manager", "m2")
    mismatched = TLSConfig(tls.ca_file, tls.cert_file, other.key_file)
    cfg = manager_toml(tmp_path / "manager.toml", mismatched, free_port(), free_port())
    line = one_line(run(["manager.cli", "serve", "--config", str(cfg)]))
    assert line.startswith("fleet-manager: ")
    assert "key" in line
    assert not (tmp_path / "state").exists()


def _unusable(tls: TLSConfig, field: str, how: str, tmp_path: Path) -> tuple[TLSConfig, str]:
    """`tls` with its `field` file made unusable `how`; (the config, the cause said)."""
    bad = {
        "missing": (tmp_path / "gone.pem", "no such file"),
        "a directory": (tmp_path, "is a directory, not a file"),
        "not PEM": (tmp_path / "junk.pem", ""),
    }[how]
    (tmp_path / "junk.pem").write_text("junk\n")
    cause = bad[1] or ("not a PEM private key" if field == "key_file" else "not a PEM certificate")
    return dataclasses.replace(tls, **{field: bad[0]}), f"{bad[0]}: {cause}"


@pytest.mark.parametrize("how", ["missing", "a directory", "not PEM"])
@pytest.mark.parametrize("field", ["ca_file", "cert_file", "key_file"])
def test_an_unusable_tls_file_is_named_by_its_config_key(
    pki: Any, tmp_path: Path, field: str, how: str
) -> None:
    """fleet-manager and fleet-daemon: one line naming the TOML key, the path and the
    cause, exit 2, nothing created."""
    tls, said = _unusable(pki.issue("manager", "m1"), field, how, tmp_path)
    cfg = manager_toml(tmp_path / "manager.toml", tls, free_port(), free_port())
    line = one_line(run(["manager.cli", "serve", "--config", str(cfg)]))
    assert line == f"fleet-manager: tls.{field}: {said}"
    assert not (tmp_path / "state").exists()

    tls, said = _unusable(pki.issue("node", "n1"), field, how, tmp_path)
    home = tmp_path / "daemon"
    home.mkdir()
    with short_tmp() as run_dir:
        cfg = daemon_toml(home / "daemon.toml", tls, free_port(), free_port(), run_dir / "run")
        line = one_line(run(["daemon.cli", "--config", str(cfg)]))
        assert not (run_dir / "run").exists()
    assert line == f"fleet-daemon: {cfg}: tls.{field}: {said}"
    assert contents(home) == ["daemon.toml"]


@pytest.mark.parametrize("which", ["listen", "metrics_listen"])
def test_daemon_with_a_taken_port_starts_no_agent_and_writes_nothing(
    pki: Any, tmp_path: Path, which: str
) -> None:
    """Port in use: one line, exit 2, no agents.json, no directories, no agent process."""
    tls = pki.issue("node", "n1")
    with short_tmp() as run_dir, taken_port() as busy:
        port = free_port()
        ports = (busy, port) if which == "listen" else (port, busy)
        home = tmp_path / "daemon"
        home.mkdir()
        cfg = daemon_toml(home / "daemon.toml", tls, *ports, run_dir / "run")
        line = one_line(run(["daemon.cli", "--config", str(cfg)]))
        assert not (run_dir / "run").exists()
    assert line == (
        f"fleet-daemon: {which} 127.0.0.1:{busy}: cannot listen: address already in use"
        " (another process listens there)"
    )
    assert contents(home) == ["daemon.toml"]


def test_daemon_whose_agent_socket_is_served_by_another_daemon_refuses(
    pki: Any, tmp_path: Path
) -> None:
    """Another process serves the agent socket in run_dir: refused in one line, left alone."""
    tls = pki.issue("node", "n1")
    home = tmp_path / "daemon"
    home.mkdir()
    with short_tmp() as run_dir:
        (run_dir / "run").mkdir()
        sock_path = run_dir / "run" / "agent.sock"
        with socket.socket(socket.AF_UNIX) as other:
            other.bind(str(sock_path))
            other.listen()
            cfg = daemon_toml(home / "daemon.toml", tls, free_port(), free_port(), run_dir / "run")
            line = one_line(run(["daemon.cli", "--config", str(cfg)]))
            assert sock_path.exists()  # the other daemon's socket was not replaced
    assert "agent socket" in line
    assert "another process is serving there" in line
    assert contents(home) == ["daemon.toml"]


def test_foreign_ca_still_one_line(tmp_path: Path) -> None:
    """(Guard) the existing TLS refusal keeps its one-line form through the new order."""
    ca = CertificateAuthority.create()
    tls = ca.issue("manager", "m1").write(tmp_path / "m1")
    foreign = CertificateAuthority.create().issue("manager", "m1").write(tmp_path / "f")
    cfg = manager_toml(
        tmp_path / "manager.toml",
        TLSConfig(tls.ca_file, foreign.cert_file, foreign.key_file),
        free_port(),
        free_port(),
    )
    assert "not signed by the CA" in one_line(run(["manager.cli", "serve", "--config", str(cfg)]))


def serving(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    """A real `fleet-manager serve`, once it logs that it serves."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "manager.cli", "serve", "--config", str(cfg)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    deadline = time.monotonic() + 60
    while "serving on port" not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    return proc


def test_a_second_manager_on_the_same_sqlite_database_refuses_until_the_first_is_gone(
    pki: Any, tmp_path: Path
) -> None:
    """Two managers on one SQLite file would both sweep, converge and drive jobs: the
    second `serve` (and `migrate`) is refused in one line naming the first's pid; once
    the first is killed with -9 (the kernel drops its lock), the second starts."""
    tls = pki.issue("manager", "m1")
    first_cfg = manager_toml(tmp_path / "first.toml", tls, free_port(), free_port())
    second_cfg = manager_toml(tmp_path / "second.toml", tls, free_port(), free_port())
    first = serving(first_cfg, tmp_path / "first.log")
    try:
        refusal = (
            f"fleet-manager: database {tmp_path / 'state' / 'manager.db'} is in use by another"
            f" fleet-manager (pid {first.pid}): an SQLite database serves one manager; stop"
            " that one first, or use PostgreSQL to run several (docs/operations-manager.md)"
        )
        assert one_line(run(["manager.cli", "serve", "--config", str(second_cfg)])) == refusal
        assert one_line(run(["manager.cli", "migrate", "--config", str(second_cfg)])) == refusal
    finally:
        first.kill()
        first.wait()
    second = serving(second_cfg, tmp_path / "second.log")
    second.terminate()
    assert second.wait(timeout=30) == 0


def test_without_config_the_refusal_says_no_config_was_given(tmp_path: Path) -> None:
    """The usual cause of a daemon or manager refusing at once is a forgotten --config: the
    one line says none was given (and writes nothing: the manager's TLS check comes first)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("FLEET_MANAGER_", "FLEET_DAEMON_"))
    }
    env["PYTHONPATH"] = str(REPO)
    for module, expected in [
        (
            ["daemon.cli"],
            "fleet-daemon: (no config file): tls: missing required key; no --config was given"
            " (e.g. --config /etc/fleet/daemon.toml)",
        ),
        (
            ["manager.cli", "serve"],
            "; no --config was given (the defaults and FLEET_MANAGER_* variables were used)",
        ),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", *module],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
            cwd=tmp_path,
        )
        assert one_line(result).endswith(expected), result.stderr
    assert contents(tmp_path) == []
