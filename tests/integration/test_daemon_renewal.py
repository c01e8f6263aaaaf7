"""A daemon renews its short-lived certificate over its manager link, without a restart.

The manager is a real ManagerServer (SQLite, the wall clock) whose issuer is
an intermediate of the test's CA and whose certificates last an hour; the
daemon (a real DaemonServer) starts on a certificate minted here for a few
seconds, as if enrolled a while ago.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from daemon_helpers import agent, daemon_config, eventually, short_tmp
from enroll_helpers import enroll_settings, serial_of, served_serial
from fleet_harness import operator_stub
from manager_harness import manager_config, running_manager
from sqlalchemy import select

from daemon.config import ManagerLinkConfig
from daemon.server import DaemonServer
from daemon.tlsfiles import DaemonTLSConfig
from fleet.retry import Backoff
from fleet.tls import TLSConfig
from fleet.v1 import common_pb2, fleet_pb2, fleet_pb2_grpc
from manager.server import ManagerServer
from manager.service.certificates import NO_ISSUER
from manager.storage.schema import metric_batches

ONLINE = common_pb2.NODE_STATUS_ONLINE
RENEWED_DAYS = 1 / 24
"""Lifetime of the certificates the manager issues: an hour."""


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


@dataclass
class Env:
    """The manager, an operator's stub, and daemon n1 on its short-lived certificate."""

    manager: ManagerServer
    op: fleet_pb2_grpc.FleetServiceStub
    server: DaemonServer
    tls: TLSConfig

    async def node(self) -> fleet_pb2.Node:
        request = fleet_pb2.FleetServiceGetNodeRequest(node_id="n1")
        return (await self.op.GetNode(request)).node

    async def registered(self) -> fleet_pb2.Node:
        """n1, or an empty Node while it has not registered."""
        try:
            return await self.node()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return fleet_pb2.Node()

    async def stored(self) -> list[int]:
        """The sequences of n1's metric batches the manager stored, in order."""
        query = (
            select(metric_batches.c.sequence)
            .where(metric_batches.c.node_id == "n1")
            .order_by(metric_batches.c.sequence)
        )
        async with self.manager.db.engine.connect() as conn:
            return list((await conn.execute(query)).scalars())

    def renewals(self) -> dict[str, float]:
        """The manager's RenewCertificate calls by outcome."""
        return {
            s.labels["outcome"]: s.value
            for metric in self.manager.metrics.renewals.collect()
            for s in metric.samples
            if s.name.endswith("_total")
        }


@asynccontextmanager
async def daemon_with(
    pki: Any,
    tmp_path: Path,
    lifetime: float,
    *,
    issuer: bool = True,
    auto_renew: bool | None = None,
    control_stream: bool = True,
) -> AsyncIterator[Env]:
    """A manager (issuing unless `issuer` is False) and daemon node/n1 connected to it, whose
    certificate lasts `lifetime` s."""
    enroll = (
        enroll_settings(pki.ca, tmp_path / "issuer", node_cert_days=RENEWED_DAYS)
        if issuer
        else None
    )
    config = manager_config(
        pki, f"sqlite+aiosqlite:///{tmp_path / 'm.db'}", tmp_path / "state", enroll=enroll
    )
    # The wall clock: the certificates it issues must be valid now.
    async with (
        running_manager(config, time.time) as manager,
        operator_stub(pki, manager.port) as op,
    ):
        with short_tmp() as root:
            tls = short_lived(pki, root / "tls", lifetime)
            if auto_renew is not None:
                tls = DaemonTLSConfig(
                    tls.ca_file, tls.cert_file, tls.key_file, auto_renew=auto_renew
                )
            link = ManagerLinkConfig(
                addresses=(f"127.0.0.1:{manager.port}",),
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
            env = Env(manager, op, server, tls)
            try:
                node = await eventually(env.registered, lambda n: n.status == ONLINE)
                assert node.cert_expire_time == int(server.renewer.expiry_timestamp() * 1000)
                yield env
            finally:
                await server.stop(1.0)


@pytest.mark.parametrize("control_stream", [True, False], ids=["stream", "unary"])
async def test_renews_at_two_thirds_and_moves_link_and_port_to_the_new_certificate(
    pki: Any, tmp_path: Path, control_stream: bool
) -> None:
    """10 s certificate: renewed by the manager after ~6.5 s with a new key; the link
    reconnects with it (no failed reconnect), the port serves it, and no metric batch is lost
    or stored twice."""
    async with daemon_with(pki, tmp_path, 10.0, control_stream=control_stream) as env:
        server, tls = env.server, env.tls
        old_serial, old_key = serial_of(tls.cert_file), tls.key_file.read_bytes()
        expiry = server.renewer.expiry_timestamp()
        manager_side = pki.issue("manager", "m9")
        assert await asyncio.to_thread(served_serial, server.port, manager_side) == old_serial
        assert server.link.registrations == 1

        await eventually(
            lambda: asyncio.sleep(0, server.renewer.outcomes["success"]), bool, within=15
        )
        assert env.renewals() == {"issued": 1.0}
        new_serial = serial_of(tls.cert_file)
        assert new_serial != old_serial
        new_expiry_ms = int(server.renewer.expiry_timestamp() * 1000)
        # The handover: one more registration, over a new connection.
        await eventually(lambda: asyncio.sleep(0, server.link.registrations), lambda n: n == 2)
        # The node's certificate expiry is what the caller of RegisterNode (or of the stream's
        # hello) presented: had the new connection used the old certificate, it would read
        # the old expiry again.
        node = await env.node()
        assert node.cert_expire_time == new_expiry_ms
        assert node.status == ONLINE

        assert tls.key_file.read_bytes() != old_key, "renewal rotates the key"
        assert stat.S_IMODE(tls.key_file.stat().st_mode) == 0o600
        assert str(tls.identity()) == "node/n1"
        # Served within a second (the daemon's port looks at its files that often).
        await eventually(
            lambda: asyncio.to_thread(served_serial, server.port, manager_side),
            lambda serial: serial == new_serial,
            within=5.0,
        )
        assert server.link.reconnects == 0, "the handover is not a failed connection"
        assert server.link.state == "connected"
        assert server.renewer.outcomes == {"success": 1, "failure": 0}
        assert server.renewer.expiry_timestamp() > expiry + 3000

        # Batches keep flowing over the new connection; none lost, none stored twice.
        before = len(await env.stored())
        stored = await eventually(env.stored, lambda s: len(s) >= before + 3)
        assert stored == list(range(stored[0], stored[-1] + 1))


async def test_a_manager_that_issues_no_certificates_is_retried_and_logged_with_the_expiry(
    pki: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A manager without an issuer answers FAILED_PRECONDITION: one warning per attempt naming
    the expiry; files and link untouched."""
    caplog.set_level(logging.WARNING, logger="daemon.renewal")
    async with daemon_with(pki, tmp_path, 8.0, issuer=False) as env:
        server, tls = env.server, env.tls
        cert = tls.cert_file.read_bytes()
        await eventually(
            lambda: asyncio.sleep(0, env.renewals().get("no_issuer", 0)),
            lambda n: n >= 2,
            within=15,
        )
        await eventually(
            lambda: asyncio.sleep(0, server.renewer.outcomes["failure"]), lambda n: n >= 2
        )
        assert tls.cert_file.read_bytes() == cert
        assert server.link.state == "connected"
        assert server.link.reconnects == 0
        assert server.renewer.outcomes["success"] == 0
        port = env.manager.port
    warnings = [r.getMessage() for r in caplog.records if r.name == "daemon.renewal"]
    assert len(warnings) >= 2
    assert warnings[0].startswith(
        f"certificate renewal failed: the manager issues no certificates (manager"
        f" 127.0.0.1:{port}: {NO_ISSUER}); the certificate expires at "
    )
    assert "; next try in " in warnings[0]


async def test_auto_renew_off_only_warns_when_renewal_would_be_due(
    pki: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """[tls] auto_renew = false: no RenewCertificate call; one warning naming the expiry."""
    caplog.set_level(logging.WARNING, logger="daemon.renewal")
    async with daemon_with(pki, tmp_path, 6.0, auto_renew=False) as env:
        assert not env.server.renewer.enabled
        await eventually(
            lambda: asyncio.sleep(
                0, [r for r in caplog.records if "auto_renew is off" in r.message]
            ),
            bool,
            within=10,
        )
        assert env.renewals() == {}
        assert env.server.renewer.expiry_timestamp() > 0
