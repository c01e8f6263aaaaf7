"""A daemon renews its short-lived certificate over its manager link, without a restart.

The manager end is the stand-in of enroll_standin.py (Connect + RenewCertificate
signing with the test's CA) until the manager's RenewCertificate lands.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from connect_helpers import serve
from daemon_helpers import agent, daemon_config, eventually, short_tmp
from enroll_standin import RenewingManager, serial_of, served_serial

from daemon.config import ManagerLinkConfig
from daemon.server import DaemonServer
from daemon.tlsfiles import DaemonTLSConfig
from fleet.retry import Backoff
from fleet.tls import TLSConfig


def short_lived(pki: Any, directory: Path, seconds: float) -> TLSConfig:
    """node/n1's certificate, valid from 1 s ago for `seconds`, as node.pem/node-key.pem."""
    now = dt.datetime.now(dt.UTC)
    issued = pki.ca.issue(
        "node",
        "n1",
        not_before=now - dt.timedelta(seconds=1),
        not_after=now + dt.timedelta(seconds=seconds),
    )
    tls: TLSConfig = issued.write(directory, stem="node")
    return tls


@asynccontextmanager
async def daemon_with(
    pki: Any,
    manager: RenewingManager,
    lifetime: float,
    *,
    auto_renew: bool | None = None,
    control_stream: bool = True,
) -> AsyncIterator[tuple[DaemonServer, TLSConfig]]:
    """Daemon node/n1 (a port and the link) whose certificate lasts `lifetime` s."""
    grpc_server, port = await serve(pki.issue("manager", "m1"), manager)
    with short_tmp() as root:
        tls = short_lived(pki, root / "tls", lifetime)
        if auto_renew is not None:
            tls = DaemonTLSConfig(tls.ca_file, tls.cert_file, tls.key_file, auto_renew=auto_renew)
        link = ManagerLinkConfig(
            addresses=(f"127.0.0.1:{port}",),
            metrics_interval_seconds=0.2,
            rpc_timeout_seconds=3.0,
            reconnect=Backoff(initial=0.05, maximum=0.3),
            control_stream=control_stream,
        )
        cfg = daemon_config(
            root,
            tls,
            (agent("idle", "sleep", "1000"),),
            manager=link,
            metrics_listen="127.0.0.1:0",
            stop_agents_on_exit=True,
        )
        server = DaemonServer(cfg)
        await server.start()
        try:
            await manager.wait(lambda: manager.connected_with)
            yield server, tls
        finally:
            await server.stop(1.0)
            await grpc_server.stop(None)


@pytest.mark.parametrize("control_stream", [True, False], ids=["stream", "unary"])
async def test_renews_at_two_thirds_and_moves_link_and_port_to_the_new_certificate(
    pki: Any, control_stream: bool
) -> None:
    """10 s certificate: renewed after ~6.5 s with a new key; the link reconnects with it
    (no failed reconnect), the port serves it, and no metric batch is lost or stored twice."""
    manager = RenewingManager(pki.ca, lifetime=3600)
    async with daemon_with(pki, manager, 10.0, control_stream=control_stream) as (server, tls):
        old_serial, old_key = serial_of(tls.cert_file), tls.key_file.read_bytes()
        expiry = server.renewer.expiry_timestamp()
        manager_side = pki.issue("manager", "m9")
        assert await asyncio.to_thread(served_serial, server.port, manager_side) == old_serial
        assert manager.connected_with == [old_serial]

        await manager.wait(lambda: manager.renewals, within=15)
        (new_serial,) = manager.renewals
        await manager.wait(lambda: manager.connected_with[-1] == new_serial)
        assert len(manager.connected_with) == 2

        assert serial_of(tls.cert_file) == new_serial
        assert tls.key_file.read_bytes() != old_key, "renewal rotates the key"
        assert stat.S_IMODE(tls.key_file.stat().st_mode) == 0o600
        assert str(tls.identity()) == "node/n1"
        assert await asyncio.to_thread(served_serial, server.port, manager_side) == new_serial
        assert server.link.reconnects == 0, "the handover is not a failed connection"
        assert server.link.state == "connected"
        assert server.renewer.outcomes == {"success": 1, "failure": 0}
        assert server.renewer.expiry_timestamp() > expiry + 3000

        # Batches keep flowing over the new connection; none lost, none stored twice.
        stored = len(manager.stored)
        await manager.wait(lambda: len(manager.stored) >= stored + 3)
        assert manager.stored == list(range(manager.stored[0], manager.stored[-1] + 1))


async def test_a_manager_that_issues_no_certificates_is_retried_and_logged_with_the_expiry(
    pki: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """FAILED_PRECONDITION: one warning per attempt naming the expiry; files and link untouched."""
    caplog.set_level(logging.WARNING, logger="daemon.renewal")
    manager = RenewingManager(pki.ca, lifetime=3600)
    manager.refuse_renewal = True
    async with daemon_with(pki, manager, 8.0) as (server, tls):
        cert = tls.cert_file.read_bytes()
        await eventually(
            lambda: asyncio.sleep(0, manager.renewal_calls), lambda n: n >= 2, within=15
        )
        await eventually(
            lambda: asyncio.sleep(0, server.renewer.outcomes["failure"]), lambda n: n >= 2
        )
        assert tls.cert_file.read_bytes() == cert
        assert server.link.state == "connected"
        assert server.link.reconnects == 0
        assert server.renewer.outcomes["success"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "daemon.renewal"]
    assert len(warnings) >= 2
    assert warnings[0].startswith(
        f"certificate renewal failed: the manager issues no certificates (manager"
        f" 127.0.0.1:{server.cfg.manager.addresses[0].rpartition(':')[2]}:"
        " this manager issues no certificates); the certificate expires at "
    )
    assert "; next try in " in warnings[0]


async def test_auto_renew_off_only_warns_when_renewal_would_be_due(
    pki: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """[tls] auto_renew = false: no RenewCertificate call; one warning naming the expiry."""
    caplog.set_level(logging.WARNING, logger="daemon.renewal")
    manager = RenewingManager(pki.ca, lifetime=3600)
    async with daemon_with(pki, manager, 6.0, auto_renew=False) as (server, _tls):
        assert not server.renewer.enabled
        await eventually(
            lambda: asyncio.sleep(
                0, [r for r in caplog.records if "auto_renew is off" in r.message]
            ),
            bool,
            within=10,
        )
        assert manager.renewal_calls == 0
        assert server.renewer.expiry_timestamp() > 0
