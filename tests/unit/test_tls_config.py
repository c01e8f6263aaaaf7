"""TLSConfig.validate explains every unusable certificate setup in one line naming the file."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleet.errors import ConfigError, PermissionDenied, Unauthenticated
from fleet.pki import CertificateAuthority, Identity
from fleet.tls import (
    TLSConfig,
    _Reloader,
    channel_credentials,
    identity_from_auth_context,
    server_credentials,
)

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


def problem(cfg: TLSConfig, *, now: dt.datetime | None = None) -> str:
    """The ConfigError message validate raises; it must be exactly one line."""
    with pytest.raises(ConfigError) as info:
        cfg.validate(now=now)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def good(pki: Any) -> TLSConfig:
    """A valid node certificate setup."""
    cfg: TLSConfig = pki.issue("node", "n1")
    return cfg


def test_valid_config_passes(good: TLSConfig) -> None:
    """A correct CA, certificate and key validate and name their identity."""
    good.validate()
    assert good.identity() == Identity("node", "n1", "fleet.local")


@pytest.mark.parametrize("field", ["ca_file", "cert_file", "key_file"])
def test_missing_file(good: TLSConfig, field: str) -> None:
    """A missing file is named with 'no such file'."""
    path: Path = getattr(good, field)
    path.unlink()
    message = problem(good)
    assert str(path) in message
    assert "no such file" in message


@pytest.mark.parametrize("field", ["ca_file", "cert_file", "key_file"])
def test_directory_instead_of_file(good: TLSConfig, field: str, tmp_path: Path) -> None:
    """A directory given where a file belongs is named as such."""
    path = tmp_path / "a-directory"
    path.mkdir()
    message = problem(dataclasses.replace(good, **{field: path}))
    assert str(path) in message
    assert "is a directory" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(good: TLSConfig) -> None:
    """A file this user may not read is named with the reason."""
    good.key_file.chmod(0)
    message = problem(good)
    assert str(good.key_file) in message
    assert "cannot read it (Permission denied)" in message


def test_path_through_a_file_is_unreadable(good: TLSConfig) -> None:
    """A path that cannot be opened (here: below a regular file) names the OS reason."""
    path = good.cert_file / "key.pem"
    message = problem(dataclasses.replace(good, key_file=path))
    assert f"TLS key file {path}: cannot read it (Not a directory)" in message


@pytest.mark.parametrize(
    ("field", "what"),
    [
        ("ca_file", "not a PEM certificate"),
        ("cert_file", "not a PEM certificate"),
        ("key_file", "not a PEM private key"),
    ],
)
def test_not_pem(good: TLSConfig, field: str, what: str) -> None:
    """A file that holds no PEM of the right kind is named with what was expected."""
    path: Path = getattr(good, field)
    path.write_text("hello, not a certificate\n")
    message = problem(good)
    assert str(path) in message
    assert what in message


def test_key_given_as_certificate(good: TLSConfig) -> None:
    """Swapping the key and certificate paths is caught at the certificate."""
    swapped = TLSConfig(good.ca_file, good.key_file, good.cert_file)
    message = problem(swapped)
    assert f"certificate file {good.key_file}: not a PEM certificate" in message


def test_encrypted_key(good: TLSConfig) -> None:
    """A passphrase-protected key is refused with the reason."""
    key = serialization.load_pem_private_key(good.key_file.read_bytes(), password=None)
    good.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    message = problem(good)
    assert str(good.key_file) in message
    assert "encrypted" in message


def test_key_does_not_match_certificate(good: TLSConfig, pki: Any) -> None:
    """A key from another certificate is named together with the certificate."""
    other: TLSConfig = pki.issue("node", "n2")
    message = problem(TLSConfig(good.ca_file, good.cert_file, other.key_file))
    assert f"{other.key_file}: does not match the certificate {good.cert_file}" in message


def test_expired_certificate_says_when(pki: Any) -> None:
    """An expired certificate names its expiry date and the current time."""
    cfg: TLSConfig = pki.issue(
        "node",
        "old",
        not_before=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
        not_after=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    )
    message = problem(cfg, now=NOW)
    assert str(cfg.cert_file) in message
    assert "expired on 2026-01-01 00:00:00 UTC" in message
    assert "now 2026-06-01 12:00:00 UTC" in message


def test_not_yet_valid_certificate_says_when(pki: Any) -> None:
    """A certificate from the future names the date it becomes valid."""
    cfg: TLSConfig = pki.issue(
        "node",
        "new",
        not_before=dt.datetime(2026, 7, 1, tzinfo=dt.UTC),
        not_after=dt.datetime(2027, 7, 1, tzinfo=dt.UTC),
    )
    message = problem(cfg, now=NOW)
    assert str(cfg.cert_file) in message
    assert "not valid until 2026-07-01 00:00:00 UTC" in message


def test_expired_ca(tmp_path: Path) -> None:
    """An expired CA is named as the problem, not the leaf it signed."""
    ca = CertificateAuthority.create(now=dt.datetime(2020, 1, 1, tzinfo=dt.UTC), valid_days=10)
    cfg = ca.issue(
        "node",
        "n1",
        not_before=dt.datetime(2020, 1, 2, tzinfo=dt.UTC),
        not_after=dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
    ).write(tmp_path)
    message = problem(cfg, now=NOW)
    assert f"TLS CA file {cfg.ca_file}: expired on 2020-01-11" in message


def test_certificate_from_another_ca(good: TLSConfig, tmp_path: Path) -> None:
    """A certificate not signed by the configured CA names both files."""
    foreign = CertificateAuthority.create().issue("node", "n1").write(tmp_path / "other")
    message = problem(TLSConfig(good.ca_file, foreign.cert_file, foreign.key_file))
    assert f"{foreign.cert_file}: not signed by the CA in {good.ca_file}" in message
    # Both CAs have the default name: the message says so rather than '(issuer X, CA X)'.
    assert message.endswith(
        "(issued by another CA named 'CN=Fleet CA,OU=fleet.local,O=Fleet' (same name,"
        " different key), e.g. another fleet's or one made again with fleetctl pki init)"
    ), message


def test_certificate_from_a_differently_named_ca_names_both(
    good: TLSConfig, tmp_path: Path
) -> None:
    """A certificate from a CA with another name gives the issuer's and the CA's names."""
    other = CertificateAuthority.create(common_name="Other CA")
    foreign = other.issue("node", "n1").write(tmp_path / "other")
    message = problem(TLSConfig(good.ca_file, foreign.cert_file, foreign.key_file))
    assert message.endswith(
        "(issuer 'CN=Other CA,OU=fleet.local,O=Fleet', CA 'CN=Fleet CA,OU=fleet.local,O=Fleet')"
    ), message


def test_certificate_without_fleet_identity(good: TLSConfig, pki: Any) -> None:
    """A certificate signed by the CA but without a spiffe:// URI says what is missing."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca.cert_pem)
    ca_key = serialization.load_pem_private_key(pki.ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "plain")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .sign(ca_key, hashes.SHA256())
    )
    good.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    good.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    message = problem(good)
    assert str(good.cert_file) in message
    assert "no spiffe:// SAN URI" in message


def test_credentials_validate_first(pki: Any) -> None:
    """Building server or channel credentials from an expired certificate fails the same way."""
    cfg: TLSConfig = pki.issue(
        "node",
        "old",
        not_before=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
        not_after=dt.datetime(2021, 1, 1, tzinfo=dt.UTC),
    )
    with pytest.raises(ConfigError, match="expired on 2021-01-01"):
        server_credentials(cfg)
    with pytest.raises(ConfigError, match="expired on 2021-01-01"):
        channel_credentials(cfg)


# --- the peer identity decision, from a plain auth-context mapping -----------------


def test_identity_from_peer_certificate(good: TLSConfig) -> None:
    """The identity comes from the peer certificate's SAN URI."""
    auth = {"x509_pem_cert": [good.cert_file.read_bytes()]}
    assert identity_from_auth_context(auth) == Identity("node", "n1", "fleet.local")


def test_identity_from_san_list_without_pem() -> None:
    """Without the PEM, the SAN list grpc extracted is used (DNS entries ignored)."""
    auth = {
        "x509_subject_alternative_name": [b"n1.node.fleet.local", b"spiffe://fleet.local/node/n1"]
    }
    assert identity_from_auth_context(auth) == Identity("node", "n1", "fleet.local")


def test_no_certificate_is_unauthenticated() -> None:
    """A peer without a certificate is Unauthenticated, saying mTLS is required."""
    with pytest.raises(Unauthenticated, match="no client certificate"):
        identity_from_auth_context({"transport_security_type": [b"ssl"]})


def test_other_trust_domain_is_denied(good: TLSConfig) -> None:
    """An identity from another trust domain is denied, naming both domains."""
    auth = {"x509_pem_cert": [good.cert_file.read_bytes()]}
    with pytest.raises(PermissionDenied, match=r"'fleet\.local'.*'prod\.example'"):
        identity_from_auth_context(auth, trust_domain="prod.example")


def test_identity_from_grpc_peer_uri(good: TLSConfig) -> None:
    """gRPC's own record (x509_subject + peer_uri) decides; the PEM need not be parsed."""
    auth = {
        "transport_security_type": [b"ssl"],
        "x509_subject": [b"CN=n1.node.fleet.local,OU=node,O=Fleet"],
        "x509_pem_cert": [b"not parsed"],
        "peer_uri": [b"spiffe://fleet.local/node/n1"],
    }
    assert identity_from_auth_context(auth) == Identity("node", "n1", "fleet.local")


def test_grpc_certificate_without_uri_is_unauthenticated() -> None:
    """A verified certificate with no URI SAN (gRPC lists no peer_uri) has no Fleet identity."""
    auth = {
        "x509_subject": [b"CN=plain"],
        "x509_pem_cert": [b"not parsed"],
        "x509_subject_alternative_name": [b"plain.example"],
    }
    with pytest.raises(Unauthenticated, match="no spiffe:// SAN URI"):
        identity_from_auth_context(auth)


def test_grpc_certificate_with_two_spiffe_uris_is_unauthenticated() -> None:
    """Two spiffe:// URIs are ambiguous, exactly as when the PEM is parsed."""
    auth = {
        "x509_subject": [b"CN=x"],
        "peer_uri": [b"spiffe://fleet.local/node/a", b"spiffe://fleet.local/node/b"],
    }
    with pytest.raises(Unauthenticated, match="carries 2 spiffe:// SAN URIs"):
        identity_from_auth_context(auth)


def test_peer_identity_checks_load_no_crypto_library() -> None:
    """Importing fleet.tls and deciding from gRPC's auth context never imports cryptography."""
    code = (
        "import sys; from fleet.tls import identity_from_auth_context as f; "
        "f({'x509_subject': [b'CN=x'], 'peer_uri': [b'spiffe://fleet.local/manager/m']}); "
        "print('cryptography' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"


def test_the_reloader_looks_at_the_files_at_most_once_a_second(
    pki: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Handshakes within a second of the last look neither `stat` the files nor see a
    replacement; the first one after it serves the renewed certificate, once."""
    cfg: TLSConfig = pki.issue("manager", "m1")
    now = [100.0]
    reloader = _Reloader(cfg, clock=lambda: now[0])
    pki.ca.issue("manager", "m2").write(cfg.cert_file.parent, stem=cfg.cert_file.stem)
    files = {cfg.ca_file, cfg.cert_file, cfg.key_file}
    stats = []
    real_stat = os.stat

    def counted(path: Any, *args: Any, **kw: Any) -> os.stat_result:
        if path in files:
            stats.append(path)
        return real_stat(path, *args, **kw)

    monkeypatch.setattr(os, "stat", counted)
    for _ in range(100):  # a storm of handshakes within the second
        assert reloader.fetch() is None
        now[0] += 0.009
    assert stats == []
    now[0] += 0.1  # a second after the last look
    assert reloader.fetch() is not None  # the renewed one
    assert len(stats) == 3
    now[0] += 1.0
    assert reloader.fetch() is None  # looked again: unchanged
    assert len(stats) == 6
