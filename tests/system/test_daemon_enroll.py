"""`fleet-daemon enroll` as a real process against a stand-in enrollment server (real TLS).

The stand-in (tests/integration/enroll_standin.py) signs with a fleet.pki CA
until the manager's EnrollmentService lands.
"""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from enroll_standin import REFUSED_TOKEN, EnrollStandIn, Token, run_enroll, serve_enrollment
from manager_proc import free_port

from daemon.config import load_daemon_config
from fleet.enroll import ca_hash, new_token
from fleet.pki import CertificateAuthority
from fleet.tls import TLSConfig


@dataclass
class Site:
    """A fleet (root CA, intermediate issuing CA), its stand-in enrollment port, a host dir."""

    root: CertificateAuthority
    servicer: EnrollStandIn
    port: int
    host: Path
    token: str

    @property
    def pin(self) -> str:
        return ca_hash(self.root.cert_pem)

    def args(self, *extra: str, token: str | None = None, pin: str | None = None) -> list[str]:
        """The flags of a normal enrollment of node web-1 into `host`, plus `extra`."""
        return [
            "--manager",
            f"127.0.0.1:{self.port}",
            "--token",
            token or self.token,
            "--ca-hash",
            pin or self.pin,
            "--config",
            str(self.host / "daemon.toml"),
            "--tls-dir",
            str(self.host / "tls"),
            "--state-dir",
            str(self.host / "state"),
            *extra,
        ]


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    """A stand-in enrollment port signing with an intermediate CA; one token for web-1."""
    root = CertificateAuthority.create("prod.example.com")
    manager_tls = root.issue("manager", "m1").write(tmp_path / "manager")
    servicer = EnrollStandIn(root.create_intermediate(), manager_address="10.0.0.5:7443")
    token = str(new_token())
    servicer.tokens[token] = Token(node_name="web-1", labels={"env": "prod", "zone": "a"})
    server, port = await serve_enrollment(manager_tls, servicer)
    host = tmp_path / "host"
    host.mkdir()
    try:
        yield Site(root, servicer, port, host, token)
    finally:
        await server.stop(None)


def files_in(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


async def test_enroll_writes_a_private_key_the_certificate_and_a_config_the_daemon_loads(
    site: Site,
) -> None:
    """Exit 0; node-key.pem 0600; the TLS files form the node's identity; the config loads."""
    run = await run_enroll(*site.args("--name", "web-1"))
    assert run.code == 0, run.err
    tls = TLSConfig(
        site.host / "tls/ca.pem", site.host / "tls/node.pem", site.host / "tls/node-key.pem"
    )
    assert stat.S_IMODE(tls.key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(tls.cert_file.stat().st_mode) == 0o644
    assert tls.ca_file.read_bytes() == site.root.cert_pem
    assert str(tls.identity()) == "node/web-1"  # key matches, chains to the root
    # The key never left the host: only a CSR went out.
    (request,) = site.servicer.requests
    assert b"PRIVATE KEY" not in request.SerializeToString()
    assert b"CERTIFICATE REQUEST" in request.csr_pem

    cfg = load_daemon_config(site.host / "daemon.toml", environ={})
    assert cfg.node_id == "web-1"
    assert cfg.listen == ""
    assert cfg.manager.addresses == ("10.0.0.5:7443",)
    assert cfg.manager.control_stream
    assert (cfg.tls.ca_file, cfg.tls.cert_file, cfg.tls.key_file) == (
        tls.ca_file,
        tls.cert_file,
        tls.key_file,
    )
    assert cfg.tls.auto_renew
    assert cfg.state_dir == site.host / "state"

    assert "enrolled as node/web-1 in trust domain prod.example.com" in run.out
    assert "(labels: env=prod, zone=a)" in run.out
    assert f"next: fleet-daemon --config {site.host / 'daemon.toml'}" in run.out
    assert run.err == ""


async def test_manager_address_flag_wins_over_the_managers_answer(site: Site) -> None:
    """--manager-address goes into the config as the manager's address."""
    run = await run_enroll(*site.args("--name", "web-1", "--manager-address", "mgr.internal:7443"))
    assert run.code == 0, run.err
    cfg = load_daemon_config(site.host / "daemon.toml", environ={})
    assert cfg.manager.addresses == ("mgr.internal:7443",)


async def test_a_wrong_pin_is_refused_and_nothing_is_written_or_sent(site: Site) -> None:
    """The pin of another CA: one line, exit 1, no file on the host, no Enroll call made."""
    other = ca_hash(CertificateAuthority.create("prod.example.com").cert_pem)
    run = await run_enroll(*site.args("--name", "web-1", pin=other))
    assert run.code == 1
    assert run.err == (
        f"fleet-daemon enroll: the manager at 127.0.0.1:{site.port} presented no CA matching"
        f" {other}; check --ca-hash (fleetctl tokens create prints it) and --manager\n"
    )
    assert files_in(site.host) == []
    assert site.servicer.requests == []


async def test_a_refused_token_exits_1_with_the_managers_message_and_leaves_no_key(
    site: Site,
) -> None:
    """An unknown token: the manager's UNAUTHENTICATED message, exit 1, the key removed again."""
    run = await run_enroll(*site.args("--name", "web-1", token=str(new_token())))
    assert run.code == 1
    assert run.err == (
        f"fleet-daemon enroll: the manager at 127.0.0.1:{site.port} refused the token:"
        f" {REFUSED_TOKEN}\n"
    )
    assert files_in(site.host) == ["tls"]  # the directory made for the key; no file in it


async def test_a_name_the_token_does_not_allow_is_refused(site: Site) -> None:
    """The token enrolls web-1 only: asking for web-2 is refused naming both."""
    run = await run_enroll(*site.args("--name", "web-2"))
    assert run.code == 1
    assert run.err.startswith(
        f"fleet-daemon enroll: the manager at 127.0.0.1:{site.port} refused the name 'web-2':"
        " this token enrolls only node 'web-1'"
    )
    assert not (site.host / "tls" / "node-key.pem").exists()
    assert not (site.host / "daemon.toml").exists()


async def test_an_unreachable_manager_is_one_line(site: Site) -> None:
    """Nothing listening on the port: exit 1 naming the address, nothing written."""
    port = free_port()
    args = site.args("--name", "web-1")
    args[1] = f"127.0.0.1:{port}"
    run = await run_enroll(*args)
    assert run.code == 1
    assert run.err.startswith(f"fleet-daemon enroll: cannot reach the manager at 127.0.0.1:{port}:")
    assert len(run.err.splitlines()) == 1
    assert files_in(site.host) == []


async def test_an_enrolled_host_is_not_overwritten_without_force(site: Site) -> None:
    """A second enroll refuses before any network call; --force re-enrolls with a new key."""
    first = await run_enroll(*site.args("--name", "web-1"))
    assert first.code == 0, first.err
    key = (site.host / "tls" / "node-key.pem").read_bytes()
    second = await run_enroll(*site.args("--name", "web-1"))
    assert second.code == 1
    assert second.err == (
        f"fleet-daemon enroll: {site.host / 'daemon.toml'} exists (the daemon config);"
        " pass --force to replace it (this host then gets a new identity)\n"
    )
    assert (site.host / "tls" / "node-key.pem").read_bytes() == key
    assert len(site.servicer.requests) == 1

    site.servicer.tokens[site.token].uses = 1
    forced = await run_enroll(*site.args("--name", "web-1", "--force"))
    assert forced.code == 0, forced.err
    assert (site.host / "tls" / "node-key.pem").read_bytes() != key


async def test_a_forced_enrollment_that_is_refused_keeps_the_old_key(site: Site) -> None:
    """--force, then a refused token: the previous key is back in place."""
    first = await run_enroll(*site.args("--name", "web-1"))
    assert first.code == 0, first.err
    key = (site.host / "tls" / "node-key.pem").read_bytes()
    run = await run_enroll(*site.args("--name", "web-1", "--force"))  # the token is used up
    assert run.code == 1
    assert "refused the token" in run.err
    assert (site.host / "tls" / "node-key.pem").read_bytes() == key


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--token", "abc", "--token: a join token is '<id>.<secret>'"),
        ("--ca-hash", "sha1:00", "--ca-hash: 'sha1:00' is not a CA hash"),
        ("--name", "web_", "--name: name 'web_' must be 1-63 letters"),
    ],
)
async def test_bad_flags_exit_2_naming_the_flag(
    site: Site, flag: str, value: str, says: str
) -> None:
    """A malformed token, pin or name is a usage error; nothing is contacted or written."""
    args: list[Any] = site.args("--name", "web-1")
    args[args.index(flag) + 1] = value
    run = await run_enroll(*args)
    assert run.code == 2
    assert says in run.err.splitlines()[-1]
    assert files_in(site.host) == []
    assert site.servicer.requests == []
