"""fleetctl pki init/issue (offline), and settings from file, FLEET_* env and flags."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from fleetctl_fake import FakeFleet, FakeManager, Fleetctl, demo_fleet, serve

from fleet.pki import CertificateAuthority
from fleet.tls import TLSConfig


@pytest.fixture
def offline(tmp_path: Path) -> Fleetctl:
    """fleetctl for commands that need no manager."""
    placeholder = TLSConfig(tmp_path / "ca.pem", tmp_path / "c.pem", tmp_path / "k.pem")
    return Fleetctl(FakeManager("127.0.0.1:1", FakeFleet()), placeholder, tmp_path)


def test_pki_init_then_issue_an_operator(offline: Fleetctl, tmp_path: Path) -> None:
    """init writes a CA (key 0600); issue signs an operator certificate that validates."""
    ca_dir = tmp_path / "certs"
    init = offline("pki", "init", str(ca_dir), "--trust-domain", "prod.example", connect=False)
    assert init.exit_code == 0, init.output
    assert stat.S_IMODE((ca_dir / "ca-key.pem").stat().st_mode) == 0o600
    issued = offline(
        "-o", "json", "pki", "issue", "operator", "alice", "--ca-dir", str(ca_dir),
        "--out", str(tmp_path / "me"), "--days", "7", connect=False,
    )  # fmt: skip
    assert issued.exit_code == 0, issued.output
    info = json.loads(issued.stdout)
    assert info["identity"] == "spiffe://prod.example/operator/alice"
    cfg = TLSConfig(Path(info["ca_file"]), Path(info["cert_file"]), Path(info["key_file"]))
    assert str(cfg.identity()) == "operator/alice"


def test_pki_init_refuses_to_replace_a_ca_without_force(offline: Fleetctl, tmp_path: Path) -> None:
    """A second init keeps the first CA unless --force; with --force it is replaced."""
    ca_dir = tmp_path / "certs"
    assert offline("pki", "init", str(ca_dir), connect=False).exit_code == 0
    first = (ca_dir / "ca.pem").read_bytes()
    again = offline("pki", "init", str(ca_dir), connect=False)
    assert again.exit_code == 1
    assert "refusing to replace the CA" in again.stderr
    assert "--force" in again.stderr
    assert (ca_dir / "ca.pem").read_bytes() == first
    forced = offline("pki", "init", str(ca_dir), "--force", connect=False)
    assert forced.exit_code == 0
    assert (ca_dir / "ca.pem").read_bytes() != first


def test_pki_issue_manager_with_hosts_and_ips(offline: Fleetctl, tmp_path: Path) -> None:
    """--host and --ip land in the SAN next to manager.<td>."""
    CertificateAuthority.create().write(tmp_path / "certs")
    result = offline(
        "pki", "issue", "manager", "m1", "--ca-dir", str(tmp_path / "certs"),
        "--host", "mgr.example.com", "--ip", "10.0.0.5", connect=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "manager-m1.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"manager.fleet.local", "mgr.example.com"} <= set(san.get_values_for_type(x509.DNSName))
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]


@pytest.mark.parametrize(
    ("args", "code", "problem"),
    [
        (["operator", "alice", "--ip", "10.0.0.300"], 2, "--ip: '10.0.0.300' is not an IP"),
        (["operator", "bad_"], 2, "operator 'bad_'"),
        (["admin", "alice"], 2, "admin"),
        (["operator", "alice", "--ca-dir", "/nonexistent"], 2, "/nonexistent/ca.pem: no such file"),
    ],
)
def test_pki_issue_bad_input(
    offline: Fleetctl, tmp_path: Path, args: list[str], code: int, problem: str
) -> None:
    """Bad role, name, IP or CA dir: one line naming it, nothing written."""
    CertificateAuthority.create().write(tmp_path / "certs")
    if "--ca-dir" not in args:
        args = [*args, "--ca-dir", str(tmp_path / "certs")]
    result = offline("pki", "issue", *args, connect=False)
    assert result.exit_code == code
    assert problem in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == ["ca-key.pem", "ca.pem"]


@pytest.fixture
def live(pki, tmp_path: Path) -> Iterator[Fleetctl]:
    """fleetctl and a fake manager, for settings that must reach it."""
    with serve(pki.issue("manager", "manager"), demo_fleet()) as manager:
        yield Fleetctl(manager, pki.issue("operator", "alice"), tmp_path)


def _toml(live: Fleetctl, **extra: str) -> str:
    tls = live.operator
    lines = [
        f'manager = "{live.manager.address}"',
        f'ca = "{tls.ca_file}"',
        f'cert = "{tls.cert_file}"',
        f'key = "{tls.key_file}"',
        *(f'{k} = "{v}"' for k, v in extra.items()),
    ]
    return "\n".join(lines) + "\n"


def test_default_config_file_is_used(live: Fleetctl) -> None:
    """$XDG_CONFIG_HOME/fleet/fleetctl.toml supplies the manager, certs and default -o."""
    path = live.home / "fleet" / "fleetctl.toml"
    path.parent.mkdir()
    path.write_text(_toml(live, output="json"))
    result = live("nodes", "list", connect=False)
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["nodes"]) == 3


def test_env_overrides_config_and_flags_override_env(live: Fleetctl, tmp_path: Path) -> None:
    """FLEET_MANAGER beats the file's manager; --manager beats FLEET_MANAGER."""
    path = tmp_path / "custom.toml"
    path.write_text(_toml(live).replace(live.manager.address, "127.0.0.1:1"))
    env = {"FLEETCTL_CONFIG": str(path), "FLEET_MANAGER": live.manager.address}
    assert live("-o", "json", "nodes", "list", connect=False, env=env).exit_code == 0
    env["FLEET_MANAGER"] = "127.0.0.1:1"
    broken = live("nodes", "list", connect=False, env=env)
    assert broken.exit_code == 1
    assert "127.0.0.1:1" in broken.stderr
    fixed = live("--manager", live.manager.address, "nodes", "list", connect=False, env=env)
    assert fixed.exit_code == 0, fixed.output


def test_bad_config_key_is_one_line_with_the_file(live: Fleetctl, tmp_path: Path) -> None:
    """A typo in the config file names the file and key with a suggestion (exit 2)."""
    path = tmp_path / "bad.toml"
    path.write_text('managr = "x:1"\n')
    result = live("--config", str(path), "nodes", "list", connect=False)
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(f"fleetctl: error: {path}: managr: unknown key")
    assert "manager" in result.stderr


def test_missing_explicit_config_file(live: Fleetctl, tmp_path: Path) -> None:
    """--config naming a missing file is an error, not silently ignored."""
    result = live("--config", str(tmp_path / "nope.toml"), "nodes", "list", connect=False)
    assert result.exit_code == 2
    assert "no such config file" in result.stderr


def test_bad_env_value_names_the_variable(live: Fleetctl) -> None:
    """FLEET_TIMEOUT=abc is reported with the variable's name."""
    result = live("nodes", "list", env={"FLEET_TIMEOUT": "abc"})
    assert result.exit_code == 2
    assert "FLEET_TIMEOUT" in result.stderr


def test_bad_manager_flag(live: Fleetctl) -> None:
    """--manager without a port is a usage error naming the expected shape."""
    result = live("nodes", "list", "--manager", "somehost")
    assert result.exit_code == 2
    assert "host:port" in result.stderr
    assert "--message" not in result.stderr


def test_a_git_style_dash_m_message_is_explained(live: Fleetctl) -> None:
    """`apply -m "why"` (git's habit) sets --manager: the error says where -m went."""
    result = live("definitions", "list", "-m", "fix the probe")
    assert result.exit_code == 2
    assert result.stderr.strip().endswith(
        "manager must be host:port, got 'fix the probe' (-m is --manager; a change cause is"
        " --message)"
    ), result.stderr


def test_fleet_output_env_sets_the_default_format(live: Fleetctl) -> None:
    """FLEET_OUTPUT=yaml makes YAML the default; -o still wins; a bad value names the variable."""
    as_yaml = live("nodes", "list", env={"FLEET_OUTPUT": "yaml"})
    assert as_yaml.exit_code == 0, as_yaml.output
    assert as_yaml.stdout.startswith("nodes:\n- node_id: node-1\n")
    as_json = live("-o", "json", "nodes", "list", env={"FLEET_OUTPUT": "yaml"})
    assert json.loads(as_json.stdout)["nodes"][0]["node_id"] == "node-1"
    bad = live("nodes", "list", env={"FLEET_OUTPUT": "xml"})
    assert bad.exit_code == 2
    assert "FLEET_OUTPUT" in bad.stderr
    assert live.manager.fleet.requests[-1][0] == "ListNodes"
    assert len(live.manager.fleet.requests) == 2


def test_pki_intermediate_issues_leaves_that_chain_to_the_root(
    offline: Fleetctl, tmp_path: Path
) -> None:
    """An issuing CA made by `pki intermediate` signs leaves a peer trusting only the root accepts;
    `pki ca-hash` prints the pin that `init` printed."""
    ca_dir, out = tmp_path / "certs", tmp_path / "issuer"
    init = offline("-o", "json", "pki", "init", str(ca_dir), connect=False)
    assert init.exit_code == 0, init.output
    pin = json.loads(init.stdout)["ca_hash"]
    made = offline("-o", "json", "pki", "intermediate", str(out), "--ca-dir", str(ca_dir),
                   connect=False)  # fmt: skip
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["ca_hash"] == pin
    assert stat.S_IMODE((out / "issuer-key.pem").stat().st_mode) == 0o600
    issuer = CertificateAuthority.load(
        out / "issuer.pem", out / "issuer-key.pem", root_path=ca_dir / "ca.pem"
    )
    assert issuer.is_intermediate
    leaf = issuer.issue("node", "web-1").write(tmp_path / "leaf")
    assert (tmp_path / "leaf" / "ca.pem").read_bytes() == (ca_dir / "ca.pem").read_bytes()
    assert str(leaf.identity()) == "node/web-1"  # validates leaf -> issuer -> root
    shown = offline("pki", "ca-hash", str(ca_dir / "ca.pem"), connect=False)
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.strip() == pin
    again = offline("pki", "intermediate", str(out), "--ca-dir", str(ca_dir), connect=False)
    assert again.exit_code == 1
    assert "exists; pass --force" in again.stderr


def test_pki_intermediate_refuses_a_pathlen_0_root(offline: Fleetctl, tmp_path: Path) -> None:
    """A root made before issuing CAs (pathlen 0) cannot sign one: say what to do instead."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    root = CertificateAuthority.create()
    cert = x509.load_pem_x509_certificate(root.cert_pem)
    key = serialization.load_pem_private_key(root.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for ext in cert.extensions:
        value = ext.value
        if isinstance(value, x509.BasicConstraints):
            value = x509.BasicConstraints(ca=True, path_length=0)
        builder = builder.add_extension(value, ext.critical)
    old = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    CertificateAuthority("fleet.local", old, root.key_pem).write(tmp_path / "old")
    result = offline("pki", "intermediate", str(tmp_path / "iss"), "--ca-dir",
                     str(tmp_path / "old"), connect=False)  # fmt: skip
    assert result.exit_code == 1
    assert "pathlen 0" in result.stderr
    assert not (tmp_path / "iss" / "issuer-key.pem").exists()
