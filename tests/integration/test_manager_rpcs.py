"""ManagerService over real mTLS gRPC, on SQLite and PostgreSQL: every RPC and rejection."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from manager_harness import (
    FakeClock,
    manager_config,
    node_stub,
    registration,
    rpc_error,
    running_manager,
)
from sqlalchemy import text

from fleet.v1 import common_pb2, manager_pb2
from manager.server import ManagerServer

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def clock() -> FakeClock:
    """The manager's clock, shared with the test."""
    return FakeClock()


@pytest.fixture
async def manager(
    pki: Any, database_url: str, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[ManagerServer]:
    """A running manager on this test's database."""
    config = manager_config(pki, database_url, tmp_path / "state")
    async with running_manager(config, clock) as server:
        yield server


async def count(server: ManagerServer, sql: str, **params: Any) -> int:
    """One integer from the manager's database."""
    async with server.db.engine.connect() as conn:
        return int((await conn.execute(text(sql), params)).scalar_one())


def metric(ts_ms: int, type_: str = "cpu", **values: float) -> common_pb2.MetricData:
    """A MetricData message."""
    return common_pb2.MetricData(type=type_, timestamp=ts_ms, values=values or {"usage": 1.0})


# --- RegisterNode ----------------------------------------------------------


async def test_register_stores_the_node_and_answers_interval_and_time(
    manager: ManagerServer, pki: Any, clock: FakeClock
) -> None:
    """RegisterNode upserts the node and answers the heartbeat interval and server time."""
    async with node_stub(pki, "web-1", manager.port) as stub:
        resp = await stub.RegisterNode(registration("web-1"))
    assert resp.success
    assert 10_000 <= resp.heartbeat_interval_ms <= 11_000
    assert resp.server_time == clock.ms()
    node = await manager.nodes.get("web-1")
    assert node is not None
    assert node.status == "online"
    assert node.labels == {"env": "prod", "example.com/tier": "web"}
    assert node.daemon_address == "10.0.0.7:7444"


async def test_re_register_is_idempotent_and_updates_fields(
    manager: ManagerServer, pki: Any
) -> None:
    """Registering again keeps one node and takes the new hostname, ip, versions, labels."""
    async with node_stub(pki, "web-1", manager.port) as stub:
        await stub.RegisterNode(registration("web-1"))
        resp = await stub.RegisterNode(
            registration(
                "web-1",
                hostname="web-1b",
                ip="fd00::7",
                labels={"env": "dev"},
                daemon_version="0.2.0",
                daemon_address="[fd00::7]:7444",
            )
        )
    assert resp.message == "re-registered"
    assert await manager.nodes.count() == 1
    node = await manager.nodes.get("web-1")
    assert node is not None
    assert (node.hostname, node.ip, node.daemon_version) == ("web-1b", "fd00::7", "0.2.0")
    assert node.labels == {"env": "dev"}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"ip": ""}, "ip"),
        ({"ip": "999.1.1.1"}, "ip"),
        ({"ip": "not an ip"}, "ip"),
        ({"os": ""}, "os"),
        ({"os": "x" * 65}, "os"),
        ({"arch": ""}, "arch"),
        ({"arch": "a\x00b"}, "arch"),
        ({"hostname": "bad host name"}, "hostname"),
        ({"hostname": "a" * 254}, "hostname"),
        ({"daemon_version": "v" * 65}, "daemon_version"),
        ({"agent_version": "v" * 65}, "agent_version"),
        ({"daemon_address": "no-port"}, "daemon_address"),
        ({"daemon_address": "host:99999"}, "daemon_address"),
        ({"labels": {"Bad Key!": "v"}}, "labels"),
        ({"labels": {"env": "x" * 64}}, "labels"),
        ({"labels": {f"k{i}": "v" for i in range(65)}}, "labels"),
    ],
)
async def test_register_rejects_bad_fields_and_writes_nothing(
    manager: ManagerServer, pki: Any, overrides: dict[str, Any], field: str
) -> None:
    """A bad RegisterNode field is INVALID_ARGUMENT naming it, and no node is stored."""
    async with node_stub(pki, "web-1", manager.port) as stub:
        err = await rpc_error(stub.RegisterNode(registration("web-1", **overrides)))
    assert err.code() == INVALID
    assert (err.details() or "").startswith(f"{field}:")
    assert await manager.nodes.get("web-1") is None
    assert await count(manager, "select count(*) from events") == 0


async def test_a_node_may_only_register_itself(manager: ManagerServer, pki: Any) -> None:
    """node/a registering node b is PERMISSION_DENIED naming both, and stores nothing."""
    async with node_stub(pki, "node-a", manager.port) as stub:
        err = await rpc_error(stub.RegisterNode(registration("node-b")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "node/node-a" in (err.details() or "")
    assert "node-b" in (err.details() or "")
    assert await manager.nodes.count() == 0


async def test_operators_may_not_call_manager_service(manager: ManagerServer, pki: Any) -> None:
    """An operator certificate gets PERMISSION_DENIED on every ManagerService RPC."""
    async with node_stub(pki, "admin", manager.port, role="operator") as stub:
        for call in (
            stub.RegisterNode(registration("admin")),
            stub.Heartbeat(manager_pb2.HeartbeatRequest(node_id="admin", timestamp=1)),
            stub.ReportMetrics(manager_pb2.ReportMetricsRequest(node_id="admin", sequence=1)),
            stub.SyncAgentStates(manager_pb2.SyncAgentStatesRequest(node_id="admin")),
        ):
            err = await rpc_error(call)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_every_rpc_refuses_speaking_for_another_node(
    manager: ManagerServer, pki: Any, clock: FakeClock
) -> None:
    """Heartbeat, ReportMetrics and SyncAgentStates for another node are PERMISSION_DENIED."""
    async with node_stub(pki, "node-b", manager.port) as b:
        await b.RegisterNode(registration("node-b"))
    async with node_stub(pki, "node-a", manager.port) as stub:
        for call in (
            stub.Heartbeat(manager_pb2.HeartbeatRequest(node_id="node-b", timestamp=clock.ms())),
            stub.ReportMetrics(
                manager_pb2.ReportMetricsRequest(
                    node_id="node-b", sequence=1, metrics=[metric(clock.ms())]
                )
            ),
            stub.SyncAgentStates(manager_pb2.SyncAgentStatesRequest(node_id="node-b")),
        ):
            err = await rpc_error(call)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await count(manager, "select count(*) from metric_samples") == 0


# --- Heartbeat ---------------------------------------------------------------


async def test_heartbeat_of_unknown_node_is_not_found(
    manager: ManagerServer, pki: Any, clock: FakeClock
) -> None:
    """A heartbeat before RegisterNode is NOT_FOUND, telling the daemon to register."""
    async with node_stub(pki, "web-1", manager.port) as stub:
        err = await rpc_error(
            stub.Heartbeat(manager_pb2.HeartbeatRequest(node_id="web-1", timestamp=clock.ms()))
        )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "RegisterNode" in (err.details() or "")


async def test_heartbeat_updates_last_seen_through_one_flush(
    manager: ManagerServer, pki: Any, clock: FakeClock
) -> None:
    """A heartbeat lands in the map; one flush writes the manager's time as last-seen."""
    async with node_stub(pki, "web-1", manager.port) as stub:
        await stub.RegisterNode(registration("web-1"))
        clock.advance(5)
        resp = await stub.Heartbeat(
            manager_pb2.HeartbeatRequest(node_id="web-1", timestamp=clock.ms())
        )
    assert resp.success
    assert 10_000 <= resp.heartbeat_interval_ms <= 11_000
    await manager.heartbeats.flush()
    node = await manager.nodes.get("web-1")
    assert node is not None
    assert node.last_seen_ms == clock.ms()


@pytest.mark.parametrize("skew_s", [-301, 301, -(10**6)])
async def test_a_heartbeat_from_a_host_whose_clock_is_off_still_counts(
    manager: ManagerServer, pki: Any, clock: FakeClock, skew_s: int
) -> None:
    """A heartbeat timestamp far off the manager's clock is accepted and recorded at the
    manager's time: liveness is judged on its clock, and refusing it made a unary daemon
    register again every few seconds (the skew is shown from the registration)."""
    async with node_stub(pki, "web-1", manager.port) as stub:
        await stub.RegisterNode(registration("web-1"))
        resp = await stub.Heartbeat(
            manager_pb2.HeartbeatRequest(node_id="web-1", timestamp=clock.ms() + skew_s * 1000)
        )
    assert resp.success
    await manager.heartbeats.flush()
    node = await manager.nodes.get("web-1")
    assert node is not None
    assert node.last_seen_ms == clock.ms()


async def test_a_heartbeat_with_a_negative_timestamp_is_invalid(
    manager: ManagerServer, pki: Any
) -> None:
    """A negative timestamp is no time at all: INVALID_ARGUMENT naming it, not recorded."""
    async with node_stub(pki, "web-1", manager.port) as stub:
        await stub.RegisterNode(registration("web-1"))
        err = await rpc_error(
            stub.Heartbeat(manager_pb2.HeartbeatRequest(node_id="web-1", timestamp=-1))
        )
    assert err.code() == INVALID
    assert (err.details() or "").startswith("timestamp:")
    assert len(manager.heartbeats) == 0


# --- ReportMetrics -----------------------------------------------------------


async def test_report_metrics_stores_the_batch_once(
    manager: ManagerServer, pki: Any, clock: FakeClock
) -> None:
    """A batch is stored; the same sequence again is acknowledged as duplicate, stored once."""
    now = clock.ms()
    request = manager_pb2.ReportMetricsRequest(
        node_id="web-1",
        sequence=1,
        metrics=[
            metric(now - 1000, "cpu", usage_percent=12.5, load1=0.5),
            common_pb2.MetricData(
                type="app.requests", timestamp=now, values={"count": 3.0}, agent_id="agent-1"
            ),
        ],
    )
    async with node_stub(pki, "web-1", manager.port) as stub:
        await stub.RegisterNode(registration("web-1"))
        first = await stub.ReportMetrics(request)
        second = await stub.ReportMetrics(request)
    assert (first.duplicate, first.accepted) == (False, 3)
    assert (second.duplicate, second.accepted) == (True, 0)
    assert await count(manager, "select count(*) from metric_samples") == 3
    series = await manager.metric_service.query(
        node_id="web-1",
        type="cpu",
        start_ms=now - 60_000,
        end_ms=now + 1,
        step_s=60,
        aggregate="max",
    )
    assert [v for _, v in series["usage_percent"]] == [12.5]


def _big_batch(now: int, values: int) -> list[common_pb2.MetricData]:
    return [
        metric(now, "custom", **{f"v{j}": 1.0 for j in range(100)}) for _ in range(values // 100)
    ]


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda now: {"sequence": 0, "metrics": [metric(now)]}, "sequence"),
        (lambda now: {"sequence": 1, "metrics": []}, "metrics"),
        (lambda now: {"sequence": 1, "metrics": _big_batch(now, 10_100)}, "metrics"),
        (lambda now: {"sequence": 1, "metrics": [metric(now, "CPU")]}, "metrics[0].type"),
        (lambda now: {"sequence": 1, "metrics": [metric(now, "")]}, "metrics[0].type"),
        (
            lambda now: {"sequence": 1, "metrics": [metric(now), metric(now, "x" * 64)]},
            "metrics[1].type",
        ),
        (
            lambda now: {"sequence": 1, "metrics": [metric(now, usage=math.nan)]},
            "metrics[0].values[usage]",
        ),
        (
            lambda now: {"sequence": 1, "metrics": [metric(now, usage=math.inf)]},
            "metrics[0].values[usage]",
        ),
        (
            lambda now: {"sequence": 1, "metrics": [metric(now, **{"Bad Name": 1.0})]},
            "metrics[0].values",
        ),
        (
            lambda now: {
                "sequence": 1,
                "metrics": [common_pb2.MetricData(type="cpu", timestamp=now)],
            },
            "metrics[0].values",
        ),
        (lambda now: {"sequence": 1, "metrics": [metric(now + 301_000)]}, "metrics[0].timestamp"),
        (
            lambda now: {"sequence": 1, "metrics": [metric(now - 25 * 3600_000)]},
            "metrics[0].timestamp",
        ),
        (
            lambda now: {
                "sequence": 1,
                "metrics": [
                    common_pb2.MetricData(
                        type="cpu", timestamp=now, values={"u": 1.0}, agent_id="bad agent"
                    )
                ],
            },
            "metrics[0].agent_id",
        ),
    ],
)
async def test_report_metrics_rejects_bad_batches_and_stores_nothing(
    manager: ManagerServer, pki: Any, clock: FakeClock, build: Any, field: str
) -> None:
    """A bad ReportMetrics is INVALID_ARGUMENT naming the field; no sample, no dedupe key."""
    async with node_stub(pki, "web-1", manager.port) as stub:
        await stub.RegisterNode(registration("web-1"))
        err = await rpc_error(
            stub.ReportMetrics(
                manager_pb2.ReportMetricsRequest(node_id="web-1", **build(clock.ms()))
            )
        )
    assert err.code() == INVALID
    assert (err.details() or "").startswith(f"{field}:"), err.details()
    assert await count(manager, "select count(*) from metric_samples") == 0
    assert await count(manager, "select count(*) from metric_batches") == 0


async def test_report_metrics_of_unknown_node_is_not_found(
    manager: ManagerServer, pki: Any, clock: FakeClock
) -> None:
    """Metrics from a node that never registered are NOT_FOUND and not stored."""
    async with node_stub(pki, "web-1", manager.port) as stub:
        err = await rpc_error(
            stub.ReportMetrics(
                manager_pb2.ReportMetricsRequest(
                    node_id="web-1", sequence=1, metrics=[metric(clock.ms())]
                )
            )
        )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert await count(manager, "select count(*) from metric_samples") == 0


async def test_oversized_message_is_refused_by_grpc(
    manager: ManagerServer, pki: Any, clock: FakeClock
) -> None:
    """A request above max_receive_message_bytes is RESOURCE_EXHAUSTED before any handler."""
    huge = [metric(clock.ms(), "custom", **{"v": 1.0}) for _ in range(10)]
    huge[0].values["x" + "y" * 60] = 1.0
    padding = common_pb2.MetricData(type="custom", timestamp=clock.ms(), agent_id="a" * (5 << 20))
    async with node_stub(pki, "web-1", manager.port) as stub:
        await stub.RegisterNode(registration("web-1"))
        err = await rpc_error(
            stub.ReportMetrics(
                manager_pb2.ReportMetricsRequest(
                    node_id="web-1", sequence=1, metrics=[*huge, padding]
                )
            )
        )
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await count(manager, "select count(*) from metric_samples") == 0


# --- SyncAgentStates ---------------------------------------------------------


def agent(
    agent_id: str, status: int = common_pb2.AGENT_STATUS_RUNNING, **kw: Any
) -> manager_pb2.AgentState:
    """An AgentState message."""
    return manager_pb2.AgentState(agent_id=agent_id, status=status, type="worker", **kw)


async def test_sync_agent_states_replaces_and_counts_changes(
    manager: ManagerServer, pki: Any
) -> None:
    """A snapshot replaces the node's agents; each change is counted and is an event."""
    async with node_stub(pki, "web-1", manager.port) as stub:
        await stub.RegisterNode(registration("web-1"))
        first = await stub.SyncAgentStates(
            manager_pb2.SyncAgentStatesRequest(
                node_id="web-1", states=[agent("a1", pid=10), agent("a2", pid=11)]
            )
        )
        same = await stub.SyncAgentStates(
            manager_pb2.SyncAgentStatesRequest(
                node_id="web-1", states=[agent("a1", pid=10), agent("a2", pid=11)]
            )
        )
        changed = await stub.SyncAgentStates(
            manager_pb2.SyncAgentStatesRequest(
                node_id="web-1", states=[agent("a1", common_pb2.AGENT_STATUS_EXITED, exit_code=3)]
            )
        )
    assert (first.changed, same.changed, changed.changed) == (2, 0, 2)
    rows = await count(manager, "select count(*) from agent_states where node_id = 'web-1'")
    assert rows == 1
    events = await count(manager, "select count(*) from events where kind = 'AGENT_STATE_CHANGED'")
    assert events == 4


@pytest.mark.parametrize(
    ("states", "field"),
    [
        ([agent("a1"), agent("a1")], "states[1].agent_id"),
        ([agent("")], "states[0].agent_id"),
        ([agent("bad id")], "states[0].agent_id"),
        ([agent("a1", common_pb2.AGENT_STATUS_UNSPECIFIED)], "states[0].status"),
        ([agent("a1", 99)], "states[0].status"),
        ([agent("a1", pid=-1)], "states[0].pid"),
        ([agent("a1", restart_count=-2)], "states[0].restart_count"),
        ([agent("a1", start_time=-5)], "states[0].start_time"),
        ([agent("a1", labels={"no good": "x"})], "states[0].labels"),
        ([agent("a1", message="m" * 1025)], "states[0].message"),
        ([agent("a1", message="exited\x00")], "states[0].message"),
        ([agent("a1", version="v" * 65)], "states[0].version"),
        ([agent(f"a{i}") for i in range(1001)], "states"),
    ],
)
async def test_sync_agent_states_rejects_bad_snapshots_and_keeps_the_old_one(
    manager: ManagerServer, pki: Any, states: list[manager_pb2.AgentState], field: str
) -> None:
    """A bad snapshot is INVALID_ARGUMENT naming the field; the stored agents are unchanged."""
    async with node_stub(pki, "web-1", manager.port) as stub:
        await stub.RegisterNode(registration("web-1"))
        await stub.SyncAgentStates(
            manager_pb2.SyncAgentStatesRequest(node_id="web-1", states=[agent("keep")])
        )
        err = await rpc_error(
            stub.SyncAgentStates(manager_pb2.SyncAgentStatesRequest(node_id="web-1", states=states))
        )
    assert err.code() == INVALID
    assert (err.details() or "").startswith(f"{field}:"), err.details()
    assert await count(manager, "select count(*) from agent_states") == 1
    assert await count(manager, "select count(*) from agent_states where agent_id='keep'") == 1


async def test_concurrent_syncs_share_transactions_and_each_is_stored(
    manager: ManagerServer, pki: Any
) -> None:
    """Reports arriving together are committed together (fewer transactions than
    reports), and each one's snapshot, change count and spec version is stored."""
    names = [f"web-{i}" for i in range(30)]
    async with contextlib.AsyncExitStack() as stack:
        stubs = [await stack.enter_async_context(node_stub(pki, n, manager.port)) for n in names]
        for name, stub in zip(names, stubs, strict=True):
            await stub.RegisterNode(registration(name))
        before = manager.agent_states.commits
        answers = await asyncio.gather(
            *(
                stub.SyncAgentStates(
                    manager_pb2.SyncAgentStatesRequest(
                        node_id=name,
                        states=[agent(f"a{j}") for j in range(i % 3 + 1)],
                        spec_version=i + 1,
                    )
                )
                for i, (name, stub) in enumerate(zip(names, stubs, strict=True))
            )
        )
    assert [a.changed for a in answers] == [i % 3 + 1 for i in range(30)]
    assert manager.agent_states.commits - before < len(names)
    assert await count(manager, "select count(*) from agent_states") == sum(
        i % 3 + 1 for i in range(30)
    )
    for i, name in enumerate(names):
        version = await count(
            manager, "select reported_version from node_desired where node_id = :n", n=name
        )
        assert version == i + 1


async def test_sync_agent_states_of_unknown_node_is_not_found(
    manager: ManagerServer, pki: Any
) -> None:
    """Agent states of a node that never registered are NOT_FOUND."""
    async with node_stub(pki, "web-1", manager.port) as stub:
        err = await rpc_error(
            stub.SyncAgentStates(
                manager_pb2.SyncAgentStatesRequest(node_id="web-1", states=[agent("a1")])
            )
        )
    assert err.code() == grpc.StatusCode.NOT_FOUND
