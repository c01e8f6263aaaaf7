"""`fleet-daemon enroll` as a real process against a real manager's enrollment port.

The manager is a ManagerServer in this process (SQLite, the wall clock) for
trust domain prod.example.com, signing with an intermediate of its root;
the tokens are made by an operator through FleetService.
"""

from __future__ import annotations

import dataclasses
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from enroll_helpers import enroll_settings, run_enroll, token_request
from fleet_harness import operator_stub
from manager_harness import manager_config, running_manager
from manager_proc import free_port

from daemon.config import load_daemon_config
from fleet.enroll import ca_hash
from fleet.pki import CertificateAuthority
from fleet.tls import TLSConfig
from fleet.v1 import fleet_pb2_grpc
from manager.server import ManagerServer
from manager.service.enrollment import INVALID_TOKEN

TD = "prod.example.com"


@dataclass
class Site:
    """A manager with enrollment on, an operator's stub, and a one-use token for web-1."""

    root: CertificateAuthority
    manager: ManagerServer
    op: fleet_pb2_grpc.FleetServiceStub
    token: str
    tmp: Path

    @property
    def port(self) -> int:
        assert self.manager.enroll_port
        return self.manager.enroll_port

    @property
    def pin(self) -> str:
        return ca_hash(self.root.cert_pem)

    @property
    def host(self) -> Path:
        """The host most tests enroll."""
        return self.new_host("host")

    def new_host(self, name: str) -> Path:
        """An (empty, the first time) directory standing for host `name`."""
        path = self.tmp / name
        path.mkdir(exist_ok=True)
        return path

    async def new_token(self, **fields: Any) -> str:
        return str((await self.op.CreateJoinToken(token_request(**fields))).token)

    def outcomes(self) -> dict[str, float]:
        """The manager's Enroll calls by outcome (every call that reached it is counted)."""
        return {
            s.labels["outcome"]: s.value
            for metric in self.manager.metrics.enrollments.collect()
            for s in metric.samples
            if s.name.endswith("_total")
        }

    def args(
        self,
        *extra: str,
        token: str | None = None,
        pin: str | None = None,
        host: Path | None = None,
    ) -> list[str]:
        """The flags of a normal enrollment into `host` (default: `self.host`), plus `extra`."""
        where = host or self.host
        return [
            "--manager",
            f"127.0.0.1:{self.port}",
            "--token",
            token or self.token,
            "--ca-hash",
            pin or self.pin,
            "--config",
            str(where / "daemon.toml"),
            "--tls-dir",
            str(where / "tls"),
            "--state-dir",
            str(where / "state"),
            *extra,
        ]


@pytest.fixture
async def site(pki: Any, tmp_path: Path) -> AsyncIterator[Site]:
    """A real manager enrolling on 127.0.0.1 with an intermediate; a token for web-1 only."""
    prod = dataclasses.replace(pki, ca=CertificateAuthority.create(TD))
    settings = enroll_settings(prod.ca, tmp_path / "issuer", manager_address="10.0.0.5:7443")
    config = manager_config(
        prod, f"sqlite+aiosqlite:///{tmp_path / 'm.db'}", tmp_path / "state", enroll=settings
    )
    # The wall clock: the certificates it issues are checked by a real host.
    async with (
        running_manager(config, time.time) as manager,
        operator_stub(prod, manager.port) as op,
    ):
        made = await op.CreateJoinToken(
            token_request(node_name="web-1", labels={"env": "prod", "zone": "a"})
        )
        yield Site(prod.ca, manager, op, made.token, tmp_path)


def files_in(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _key_body(pem: bytes) -> bytes:
    """A private key's base64 lines, as they would appear in anything that held a copy."""
    return b"".join(pem.splitlines()[1:-1])


async def test_enroll_writes_a_private_key_the_certificate_and_a_config_the_daemon_loads(
    site: Site,
) -> None:
    """Exit 0; node-key.pem 0600; the TLS files form the node's identity; the config loads;
    the manager holds no copy of the key."""
    run = await run_enroll(*site.args("--name", "web-1"))
    assert run.code == 0, run.err
    tls = TLSConfig(
        site.host / "tls/ca.pem", site.host / "tls/node.pem", site.host / "tls/node-key.pem"
    )
    assert stat.S_IMODE(tls.key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(tls.cert_file.stat().st_mode) == 0o644
    assert tls.ca_file.read_bytes() == site.root.cert_pem
    assert str(tls.identity()) == "node/web-1"  # key matches, chains to the root
    # The key never left the host: only a CSR went out, so nothing the manager wrote has it.
    key = _key_body(tls.key_file.read_bytes())
    for path in site.tmp.rglob("*"):
        if path.is_file() and not path.is_relative_to(site.host):
            assert key not in path.read_bytes().replace(b"\n", b""), path
    assert site.outcomes() == {"issued": 1.0}

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

    assert f"enrolled as node/web-1 in trust domain {TD}" in run.out
    assert "(labels: env=prod, zone=a)" in run.out
    assert f"next: fleet-daemon --config {site.host / 'daemon.toml'}" in run.out
    assert run.err == ""


async def test_install_sh_turns_off_the_next_steps(site: Site) -> None:
    """--no-next-steps (install.sh, which installs and starts the unit itself): what was
    written, no 'next:' lines telling its user to point the unit at the config."""
    run = await run_enroll(*site.args("--name", "web-1", "--no-next-steps"))
    assert run.code == 0, run.err
    assert f"wrote {site.host / 'daemon.toml'}" in run.out
    assert "next:" not in run.out
    assert "systemd unit" not in run.out


async def test_manager_address_flag_wins_over_the_managers_answer(site: Site) -> None:
    """--manager-address goes into the config as the manager's address."""
    run = await run_enroll(*site.args("--name", "web-1", "--manager-address", "mgr.internal:7443"))
    assert run.code == 0, run.err
    cfg = load_daemon_config(site.host / "daemon.toml", environ={})
    assert cfg.manager.addresses == ("mgr.internal:7443",)


async def test_a_wrong_pin_is_refused_and_nothing_is_written_or_sent(site: Site) -> None:
    """The pin of another CA: one line, exit 1, no file on the host, no Enroll call made."""
    other = ca_hash(CertificateAuthority.create(TD).cert_pem)
    run = await run_enroll(*site.args("--name", "web-1", pin=other))
    assert run.code == 1
    assert run.err == (
        f"fleet-daemon enroll: the manager at 127.0.0.1:{site.port} presented no CA matching"
        f" {other}; check --ca-hash (fleetctl tokens create prints it) and --manager\n"
    )
    assert files_in(site.host) == []
    assert site.outcomes() == {}


async def test_the_managers_mtls_port_is_not_its_enrollment_port(site: Site) -> None:
    """--manager naming ManagerService's port, which serves its certificate without the CA:
    one line asking whether it is the enrollment port, exit 1, nothing written or sent."""
    args = site.args("--name", "web-1")
    args[1] = f"127.0.0.1:{site.manager.port}"
    run = await run_enroll(*args)
    assert run.code == 1
    assert run.err.startswith(
        f"fleet-daemon enroll: the manager at 127.0.0.1:{site.manager.port} presented no CA"
        f" matching {site.pin}, and no CA at all: is --manager the manager's enrollment port?"
    )
    assert len(run.err.splitlines()) == 1
    assert files_in(site.host) == []
    assert site.outcomes() == {}


async def test_a_used_up_token_exits_1_with_the_managers_message_and_leaves_no_key(
    site: Site,
) -> None:
    """The token enrolled web-1 on one host; another host trying it gets the manager's
    UNAUTHENTICATED message, exit 1, and its key is removed again."""
    first = await run_enroll(*site.args("--name", "web-1", host=site.new_host("first")))
    assert first.code == 0, first.err
    run = await run_enroll(*site.args("--name", "web-1"))
    assert run.code == 1
    assert run.err == (
        f"fleet-daemon enroll: the manager at 127.0.0.1:{site.port} refused the token:"
        f" {INVALID_TOKEN}\n"
    )
    assert files_in(site.host) == ["tls"]  # the directory made for the key; no file in it
    assert site.outcomes() == {"issued": 1.0, "token_used_up": 1.0}


@pytest.mark.parametrize(
    ("token_fields", "name", "says"),
    [
        ({"node_name": "web-1"}, "web-2", "this join token enrolls only node web-1, not web-2"),
        (
            {"name_prefix": "web-"},
            "db-1",
            "this join token enrolls only new names starting with 'web-', not db-1",
        ),
    ],
    ids=["node-name", "name-prefix"],
)
async def test_a_name_outside_the_tokens_scope_is_refused(
    site: Site, token_fields: dict[str, str], name: str, says: str
) -> None:
    """The manager's PERMISSION_DENIED, naming both; no key, no config, no use spent."""
    token = await site.new_token(**token_fields)
    run = await run_enroll(*site.args("--name", name, token=token))
    assert run.code == 1
    assert run.err == (
        f"fleet-daemon enroll: the manager at 127.0.0.1:{site.port} refused the name"
        f" {name!r}: {says}\n"
    )
    assert files_in(site.host) == ["tls"]
    assert site.outcomes() == {"name_not_allowed": 1.0}
    again = await run_enroll(*site.args("--name", "web-1", token=token))
    assert again.code == 0, "the refusal spent no use"


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
    again = await site.new_token(node_name="web-1")
    second = await run_enroll(*site.args("--name", "web-1", token=again))
    assert second.code == 1
    assert second.err == (
        f"fleet-daemon enroll: {site.host / 'daemon.toml'} exists (the daemon config);"
        " pass --force to replace it (this host then gets a new identity)\n"
    )
    assert (site.host / "tls" / "node-key.pem").read_bytes() == key
    assert site.outcomes() == {"issued": 1.0}

    forced = await run_enroll(*site.args("--name", "web-1", "--force", token=again))
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
    assert site.outcomes() == {}
