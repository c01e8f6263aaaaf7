"""Back-pressure, a locked/unavailable database, health, reflection and /metrics."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from manager_harness import (
    FakeClock,
    manager_config,
    node_stub,
    registration,
    rpc_error,
    running_manager,
)
from sqlalchemy import text

from fleet.tls import channel_credentials, channel_options
from fleet.v1 import common_pb2, manager_pb2
from manager.config import DatabaseConfig
from manager.server import SERVICE_NAME, ManagerServer


async def count(server: ManagerServer, sql: str) -> int:
    """One integer from the manager's database."""
    async with server.db.engine.connect() as conn:
        return int((await conn.execute(text(sql))).scalar_one())


@asynccontextmanager
async def table_locked(database_url: str, table: str) -> AsyncIterator[None]:
    """Another process/connection holds a write lock that blocks `table`'s writers."""
    if database_url.startswith("sqlite"):
        path = database_url.split(":///", 1)[1]
        script = textwrap.dedent(f"""
            import sqlite3, sys
            conn = sqlite3.connect({path!r}, isolation_level=None)
            conn.execute("BEGIN EXCLUSIVE")
            print("locked", flush=True)
            sys.stdin.readline()
            conn.execute("ROLLBACK")
        """)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        assert proc.stdin is not None
        assert (await proc.stdout.readline()).strip() == b"locked"
        try:
            yield
        finally:
            proc.stdin.write(b"\n")
            await proc.stdin.drain()
            assert await proc.wait() == 0
    else:
        conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
        try:
            tx = conn.transaction()
            await tx.start()
            await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            try:
                yield
            finally:
                await tx.rollback()
        finally:
            await conn.close()


def metrics_request(node: str, seq: int, now_ms: int) -> manager_pb2.ReportMetricsRequest:
    """A two-sample batch."""
    return manager_pb2.ReportMetricsRequest(
        node_id=node,
        sequence=seq,
        metrics=[common_pb2.MetricData(type="cpu", timestamp=now_ms, values={"a": 1, "b": 2})],
    )


async def test_full_queue_is_resource_exhausted_and_stores_nothing_of_that_batch(
    pki: Any, database_url: str, tmp_path: Path
) -> None:
    """With the queue full, ReportMetrics is RESOURCE_EXHAUSTED and that batch is not stored."""
    clock = FakeClock()
    config = manager_config(pki, database_url, tmp_path / "s", metrics={"writer_queue_batches": 1})
    async with (
        running_manager(config, clock) as server,
        node_stub(pki, "web-1", server.port) as stub,
    ):
        await stub.RegisterNode(registration("web-1"))
        async with table_locked(database_url, "metric_batches"):
            first = asyncio.ensure_future(
                stub.ReportMetrics(metrics_request("web-1", 1, clock.ms()))
            )
            while server.writer.depth < 1:  # noqa: ASYNC110 - the writer has no event to await
                await asyncio.sleep(0.01)
            err = await rpc_error(stub.ReportMetrics(metrics_request("web-1", 2, clock.ms())))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await first).accepted == 2
        assert await count(server, "select count(*) from metric_samples") == 2
        assert await count(server, "select count(*) from metric_batches where sequence = 2") == 0
        retried = await stub.ReportMetrics(metrics_request("web-1", 2, clock.ms()))
        assert (retried.duplicate, retried.accepted) == (False, 2)


async def test_locked_database_gives_unavailable_then_recovers_without_restart(
    pki: Any, database_url: str, tmp_path: Path
) -> None:
    """A database locked past the retry budget: UNAVAILABLE, heartbeats kept; then it recovers."""
    clock = FakeClock()
    config = manager_config(pki, database_url, tmp_path / "s")
    config = type(config)(
        **{
            **config.__dict__,
            "database": DatabaseConfig(
                url=database_url, busy_timeout_ms=200, retry_timeout_seconds=1.0
            ),
        }
    )
    async with (
        running_manager(config, clock) as server,
        node_stub(pki, "web-1", server.port) as stub,
    ):
        await stub.RegisterNode(registration("web-1"))
        async with table_locked(database_url, "nodes"):
            err = await rpc_error(stub.RegisterNode(registration("web-1", hostname="other")))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert "unavailable" in (err.details() or "")
            clock.advance(3)
            hb = await stub.Heartbeat(
                manager_pb2.HeartbeatRequest(node_id="web-1", timestamp=clock.ms())
            )
            assert hb.success  # the map takes it; the flusher keeps it until the db is back
            await asyncio.sleep(1.5)  # at least one flush fails meanwhile
            assert len(server.heartbeats) == 1
        again = await stub.RegisterNode(registration("web-1", hostname="web-1-new"))
        assert again.success
        node = await server.nodes.get("web-1")
        assert node is not None
        assert node.hostname == "web-1-new"
        assert node.last_seen_ms >= clock.ms()


async def test_health_reflection_and_prometheus_metrics(
    pki: Any, database_url: str, tmp_path: Path
) -> None:
    """Health says SERVING, reflection lists ManagerService, /metrics counts RPCs by code."""
    clock = FakeClock()
    config = manager_config(pki, database_url, tmp_path / "s")
    async with running_manager(config, clock) as server:
        async with node_stub(pki, "web-1", server.port) as stub:
            await stub.RegisterNode(registration("web-1"))
            await rpc_error(
                stub.Heartbeat(manager_pb2.HeartbeatRequest(node_id="web-1", timestamp=-1))
            )
        tls = pki.issue("operator", "probe")
        async with aio.secure_channel(
            f"127.0.0.1:{server.port}",
            channel_credentials(tls),
            options=channel_options(f"manager.{pki.trust_domain}"),
        ) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            async for answer in refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            ):
                names = {s.name for s in answer.list_services_response.service}
                assert SERVICE_NAME in names
                break
        await server.sweeper.refresh_counts()
        assert server.metrics_port is not None
        body = await asyncio.to_thread(_get, f"http://127.0.0.1:{server.metrics_port}/metrics")
    assert 'fleet_manager_rpc_total{code="OK",method="RegisterNode"} 1.0' in body
    assert 'fleet_manager_rpc_total{code="INVALID_ARGUMENT",method="Heartbeat"} 1.0' in body
    assert 'fleet_manager_nodes{status="online"} 1.0' in body
    assert "fleet_manager_metric_queue_depth 0.0" in body
    assert "fleet_manager_heartbeat_flush_seconds_bucket" in body
    assert "fleet_sweeper_leader 1.0" in body
    assert "fleet_manager_event_loop_lag_seconds_count" in body


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


@pytest.mark.parametrize("migrate", [False])
async def test_old_schema_refuses_to_start_with_a_clear_message(
    pki: Any, database_url: str, tmp_path: Path, migrate: bool
) -> None:
    """migrate_on_start=false on an empty database: start fails naming `fleet-manager migrate`."""
    config = manager_config(pki, database_url, tmp_path / "s")
    config = type(config)(
        **{
            **config.__dict__,
            "database": DatabaseConfig(url=database_url, migrate_on_start=migrate),
        }
    )
    server = ManagerServer(config, clock=FakeClock())
    with pytest.raises(Exception, match="fleet-manager migrate"):
        await server.start()
    await server.stop(0)
