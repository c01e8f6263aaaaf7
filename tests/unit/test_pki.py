"""fleet.pki and scripts/generate_test_certs.sh make chains openssl accepts, named as designed."""

from __future__ import annotations

import datetime as dt
import re
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleet.pki import CertificateAuthority, Identity, IssuedCertificate
from fleet.tls import TLSConfig

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "generate_test_certs.sh"


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, check=False, timeout=30
    )


def verify(ca: Path, cert: Path) -> subprocess.CompletedProcess[str]:
    return openssl("verify", "-CAfile", ca, cert)


def san(cert: Path) -> str:
    result = openssl("x509", "-in", cert, "-noout", "-ext", "subjectAltName")
    assert result.returncode == 0, result.stderr
    return result.stdout


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def run_script(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


# --- Identity ------------------------------------------------------------------


def test_identity_names() -> None:
    """An identity renders as its SPIFFE URI, its DNS server name and role/name."""
    ident = Identity("node", "web-1", "fleet.local")
    assert ident.uri == "spiffe://fleet.local/node/web-1"
    assert ident.server_name == "web-1.node.fleet.local"
    assert str(ident) == "node/web-1"
    assert Identity.from_uri(ident.uri) == ident


@pytest.mark.parametrize(
    "uri",
    [
        "https://fleet.local/node/a",
        "spiffe://fleet.local/node",
        "spiffe://fleet.local/node/a/extra",
        "spiffe://fleet.local/admin/a",
        "spiffe://Fleet.Local/node/a",
        "spiffe://fleet.local/node/-bad",
    ],
)
def test_identity_from_malformed_uri(uri: str) -> None:
    """A URI that is not spiffe://<td>/<role>/<name> is a ValueError quoting it."""
    with pytest.raises(ValueError, match=re.escape(repr(uri))):
        Identity.from_uri(uri)


# --- fleet.pki -------------------------------------------------------------------


@pytest.mark.parametrize("role", ["manager", "node", "operator"])
def test_pki_chain_verifies_with_openssl(tmp_path: Path, role: str) -> None:
    """openssl verify accepts a fleet.pki leaf against its CA, for every role."""
    ca = CertificateAuthority.create("fleet.local")
    cfg = ca.issue(role, "x1").write(tmp_path)  # type: ignore[arg-type]
    result = verify(cfg.ca_file, cfg.cert_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ": OK" in result.stdout


def test_pki_leaf_subject_alternative_names(tmp_path: Path) -> None:
    """A manager leaf carries its SPIFFE URI, DNS names and the extra hostnames and IPs."""
    ca = CertificateAuthority.create("prod.example")
    cfg = ca.issue("manager", "m1", hostnames=["mgr.internal"], ips=["127.0.0.1"]).write(tmp_path)
    text = san(cfg.cert_file)
    for part in [
        "URI:spiffe://prod.example/manager/m1",
        "DNS:m1.manager.prod.example",
        "DNS:manager.prod.example",
        "DNS:mgr.internal",
        "IP Address:127.0.0.1",
    ]:
        assert part in text


def test_pki_node_leaf_has_no_manager_name(tmp_path: Path) -> None:
    """Only managers answer to manager.<td>; a node leaf does not carry it."""
    ca = CertificateAuthority.create()
    text = san(ca.issue("node", "n1").write(tmp_path).cert_file)
    assert "URI:spiffe://fleet.local/node/n1" in text
    assert "DNS:n1.node.fleet.local" in text
    assert "manager.fleet.local" not in text


def test_pki_extensions() -> None:
    """The CA is CA:true pathlen 1 (one intermediate level) with keyCertSign; leaves are
    serverAuth+clientAuth leaves."""
    ca = CertificateAuthority.create()
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    bc = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert (bc.value.ca, bc.value.path_length) == (True, 1)
    assert ca_cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    leaf = ca.issue("node", "n1").certificate
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH}


def test_pki_validity_override() -> None:
    """not_before / not_after make the exact window a test asks for."""
    start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    end = dt.datetime(2020, 1, 2, tzinfo=dt.UTC)
    leaf = CertificateAuthority.create().issue("node", "n1", not_before=start, not_after=end)
    assert (leaf.certificate.not_valid_before_utc, leaf.certificate.not_valid_after_utc) == (
        start,
        end,
    )


def test_pki_keys_are_private(tmp_path: Path) -> None:
    """Private keys are written 0600; certificates are world-readable."""
    ca = CertificateAuthority.create()
    ca_cert, ca_key = ca.write(tmp_path / "ca")
    cfg = ca.issue("operator", "admin").write(tmp_path / "leaf")
    assert mode(ca_key) == 0o600
    assert mode(cfg.key_file) == 0o600
    assert mode(ca_cert) == 0o644
    assert mode(cfg.cert_file) == 0o644
    assert cfg.cert_file.name == "operator-admin.pem"
    assert cfg.key_file.name == "operator-admin-key.pem"
    assert not [p for p in (tmp_path / "leaf").iterdir() if p.name.endswith(".tmp")]


def test_pki_ca_write_refuses_to_replace_a_ca(tmp_path: Path) -> None:
    """Writing a CA over an existing one fails unless asked, and leaves the old CA intact."""
    first = CertificateAuthority.create()
    first.write(tmp_path)
    with pytest.raises(FileExistsError, match="refusing to replace the CA"):
        CertificateAuthority.create().write(tmp_path)
    assert (tmp_path / "ca.pem").read_bytes() == first.cert_pem
    second = CertificateAuthority.create()
    second.write(tmp_path, overwrite=True)
    assert (tmp_path / "ca.pem").read_bytes() == second.cert_pem


def test_pki_ca_load_round_trip(tmp_path: Path) -> None:
    """A CA written to disk loads back with its trust domain and keeps issuing valid leaves."""
    ca = CertificateAuthority.create("a.example")
    loaded = CertificateAuthority.load(*ca.write(tmp_path))
    assert loaded.trust_domain == "a.example"
    cfg = loaded.issue("node", "n1").write(tmp_path / "n1")
    assert verify(tmp_path / "ca.pem", cfg.cert_file).returncode == 0


def test_ca_is_name_constrained_to_its_trust_domain(tmp_path: Path) -> None:
    """A leaf the CA key signs for another trust domain is rejected by openssl verify."""
    ca = CertificateAuthority.create("fleet.local")
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://evil.example/node/n1")]
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    path = tmp_path / "forged.pem"
    path.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    result = verify(tmp_path / "ca.pem", path)
    assert result.returncode != 0
    assert "subtree" in (result.stdout + result.stderr).lower()


# --- scripts/generate_test_certs.sh -------------------------------------------------------


@pytest.fixture
def script_certs(tmp_path: Path) -> Path:
    """A directory filled by one run of the script with two nodes."""
    out = tmp_path / "certs"
    result = run_script("--out", out, "--node", "n1", "--node", "n2")
    assert result.returncode == 0, result.stderr
    return out


def test_script_chains_verify_with_openssl(script_certs: Path) -> None:
    """Every certificate the script makes verifies against its CA with openssl."""
    leaves = [
        "manager-manager.pem",
        "node-n1.pem",
        "node-n2.pem",
        "operator-admin.pem",
    ]
    for leaf in leaves:
        result = verify(script_certs / "ca.pem", script_certs / leaf)
        assert result.returncode == 0, result.stdout + result.stderr


def test_script_subject_alternative_names(script_certs: Path) -> None:
    """The script names manager, node and operator exactly as fleet.pki does."""
    manager = san(script_certs / "manager-manager.pem")
    for part in [
        "URI:spiffe://fleet.local/manager/manager",
        "DNS:manager.manager.fleet.local",
        "DNS:manager.fleet.local",
        "DNS:localhost",
        "IP Address:127.0.0.1",
    ]:
        assert part in manager
    node = san(script_certs / "node-n1.pem")
    for part in [
        "URI:spiffe://fleet.local/node/n1",
        "DNS:n1.node.fleet.local",
        "DNS:localhost",
        "IP Address:127.0.0.1",
    ]:
        assert part in node
    assert "URI:spiffe://fleet.local/operator/admin" in san(script_certs / "operator-admin.pem")


def test_script_certificates_pass_fleet_validation(script_certs: Path) -> None:
    """fleet.tls accepts the script's files and reads the identity; fleet.pki loads its CA."""
    cfg = TLSConfig(
        script_certs / "ca.pem", script_certs / "node-n2.pem", script_certs / "node-n2-key.pem"
    )
    cfg.validate()
    assert cfg.identity() == Identity("node", "n2", "fleet.local")
    ca = CertificateAuthority.load(script_certs / "ca.pem", script_certs / "ca-key.pem")
    assert ca.trust_domain == "fleet.local"


def test_script_keys_are_private(script_certs: Path) -> None:
    """Every key the script writes is mode 0600, and nothing else is left behind."""
    keys = sorted(p.name for p in script_certs.glob("*-key.pem"))
    assert keys == [
        "ca-key.pem",
        "manager-manager-key.pem",
        "node-n1-key.pem",
        "node-n2-key.pem",
        "operator-admin-key.pem",
    ]
    for key in keys:
        assert mode(script_certs / key) == 0o600, key
    assert sorted(p.name for p in script_certs.iterdir() if p.name.startswith(".")) == []


def test_script_is_idempotent(script_certs: Path) -> None:
    """A second run keeps the CA and every valid leaf byte for byte, and adds a new node."""
    before = {p.name: p.read_bytes() for p in script_certs.iterdir()}
    result = run_script("--out", script_certs, "--node", "n1", "--node", "n2", "--node", "n3")
    assert result.returncode == 0, result.stderr
    after = {p.name: p.read_bytes() for p in script_certs.iterdir()}
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {"node-n3.pem", "node-n3-key.pem"}
    assert "kept CA" in result.stdout


def test_script_replaces_an_invalid_leaf(script_certs: Path) -> None:
    """A leaf whose key no longer matches is re-issued, and the new pair verifies."""
    cert = script_certs / "node-n1.pem"
    (script_certs / "node-n1-key.pem").write_bytes((script_certs / "node-n2-key.pem").read_bytes())
    old = cert.read_bytes()
    result = run_script("--out", script_certs, "--node", "n1")
    assert result.returncode == 0, result.stderr
    assert cert.read_bytes() != old
    cfg = TLSConfig(script_certs / "ca.pem", cert, script_certs / "node-n1-key.pem")
    cfg.validate()


def test_script_refuses_to_overwrite_a_ca(script_certs: Path) -> None:
    """A run for another trust domain fails naming --force-ca and changes nothing."""
    before = {p.name: p.read_bytes() for p in script_certs.iterdir()}
    result = run_script("--out", script_certs, "--trust-domain", "other.example")
    assert result.returncode == 1
    assert "refusing to overwrite" in result.stderr
    assert "--force-ca" in result.stderr
    assert {p.name: p.read_bytes() for p in script_certs.iterdir()} == before


def test_script_refuses_half_a_ca(script_certs: Path) -> None:
    """A ca.pem without its key is not silently replaced."""
    (script_certs / "ca-key.pem").unlink()
    ca = (script_certs / "ca.pem").read_bytes()
    result = run_script("--out", script_certs)
    assert result.returncode == 1
    assert "refusing to overwrite" in result.stderr
    assert (script_certs / "ca.pem").read_bytes() == ca


def test_script_force_ca_reissues_everything(script_certs: Path) -> None:
    """--force-ca makes a new CA, and every leaf is re-issued to verify against it."""
    old_ca = (script_certs / "ca.pem").read_bytes()
    old_leaf = (script_certs / "node-n1.pem").read_bytes()
    result = run_script(
        "--out", script_certs, "--trust-domain", "other.example", "--force-ca", "--node", "n1"
    )
    assert result.returncode == 0, result.stderr
    assert (script_certs / "ca.pem").read_bytes() != old_ca
    assert (script_certs / "node-n1.pem").read_bytes() != old_leaf
    assert verify(script_certs / "ca.pem", script_certs / "node-n1.pem").returncode == 0
    assert "URI:spiffe://other.example/node/n1" in san(script_certs / "node-n1.pem")


@pytest.mark.parametrize(
    "args",
    [["--bogus"], ["--days"], ["--days", "ten"], ["--node", "bad name"], ["--trust-domain", "UP"]],
)
def test_script_bad_flags_exit_2(tmp_path: Path, args: list[str]) -> None:
    """A bad flag or value exits 2 with a message on stderr and writes nothing."""
    out = tmp_path / "out"
    result = run_script("--out", out, *args)
    assert result.returncode == 2
    assert "generate_test_certs.sh:" in result.stderr
    assert not out.exists()


def test_script_default_output_dir(tmp_path: Path) -> None:
    """Without --out the script writes into ./certs of the working directory."""
    result = subprocess.run(
        ["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "certs").glob("*.pem")) == [
        "ca-key.pem",
        "ca.pem",
        "manager-manager-key.pem",
        "manager-manager.pem",
        "operator-admin-key.pem",
        "operator-admin.pem",
    ]


def test_issued_certificate_is_plain_data() -> None:
    """IssuedCertificate carries the CA so writing it needs nothing else."""
    ca = CertificateAuthority.create()
    issued = ca.issue("node", "n1")
    assert isinstance(issued, IssuedCertificate)
    assert issued.ca_pem == ca.cert_pem
    assert issued.identity == Identity("node", "n1", "fleet.local")
