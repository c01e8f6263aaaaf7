"""DaemonService over real mTLS against a real supervisor with real child processes."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from daemon_helpers import agent, client_channel, daemon_config, eventually, short_tmp
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from daemon.server import DaemonServer
from fleet.v1 import common_pb2, daemon_pb2, daemon_pb2_grpc

PY = sys.executable
S = common_pb2


@dataclass
class Served:
    server: DaemonServer
    stub: daemon_pb2_grpc.DaemonServiceStub
    channel: aio.Channel
    pki: Any


@pytest.fixture
async def served(pki: Any) -> AsyncIterator[Served]:
    """A daemon (node/n1) with two agents, and a manager/m1 client."""
    with short_tmp() as root:
        cfg = daemon_config(
            root,
            pki.issue("node", "n1"),
            (
                agent("talker", "/bin/sh", "-c", "echo hello from talker; exec sleep 1000"),
                agent("idle", "sleep", "1000", autostart=False),
            ),
            stop_agents_on_exit=True,
        )
        server = DaemonServer(cfg)
        await server.start()
        channel = client_channel(pki.issue("manager", "m1"), server.port, "n1", pki.trust_domain)
        try:
            yield Served(server, daemon_pb2_grpc.DaemonServiceStub(channel), channel, pki)
        finally:
            await channel.close()
            await server.stop(1.0)


async def _agents(stub: daemon_pb2_grpc.DaemonServiceStub) -> dict[str, common_pb2.AgentInfo]:
    reply = await stub.ListAgents(daemon_pb2.ListAgentsRequest())
    return {a.id: a for a in reply.agents}


async def _code(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        await call
    return info.value.code()  # type: ignore[no-any-return]


async def test_manager_lists_agents_with_their_state(served: Served) -> None:
    """A manager sees every agent: the autostarted one RUNNING with a pid, the other STOPPED."""
    agents = await eventually(
        lambda: _agents(served.stub),
        lambda a: a["talker"].status == S.AGENT_STATUS_RUNNING,
    )
    assert agents["talker"].pid > 0
    assert agents["idle"].status == S.AGENT_STATUS_STOPPED
    assert agents["idle"].pid == 0


@pytest.mark.parametrize("role", ["node", "operator"])
async def test_only_manager_identities_may_call(served: Served, role: str) -> None:
    """node/* and operator/* certificates get PERMISSION_DENIED on every RPC."""
    tls = served.pki.issue(role, "intruder")
    async with client_channel(tls, served.server.port, "n1", served.pki.trust_domain) as ch:
        stub = daemon_pb2_grpc.DaemonServiceStub(ch)
        calls = [
            stub.ListAgents(daemon_pb2.ListAgentsRequest()),
            stub.OperateAgent(
                daemon_pb2.OperateAgentRequest(agent_id="idle", operation=S.AGENT_OPERATION_START)
            ),
            stub.GetAgentMetrics(daemon_pb2.GetAgentMetricsRequest(agent_id="talker")),
            stub.PushUpdate(daemon_pb2.PushUpdateRequest(version=99)),
        ]
        for call in calls:
            assert await _code(call) == grpc.StatusCode.PERMISSION_DENIED
        stream = stub.ReadAgentLog(daemon_pb2.ReadAgentLogRequest(agent_id="talker"))
        with pytest.raises(grpc.RpcError) as info:
            async for _ in stream:
                pass
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"{role}/intruder" in (info.value.details() or "")
    # Nothing was done on their behalf.
    assert (await _agents(served.stub))["idle"].status == S.AGENT_STATUS_STOPPED


async def test_operate_agent_start_stop_restart_idempotent(served: Served) -> None:
    """start/stop/restart answer with the resulting agent; repeating start/stop changes nothing."""
    op = daemon_pb2.OperateAgentRequest
    started = await served.stub.OperateAgent(op(agent_id="idle", operation=S.AGENT_OPERATION_START))
    assert started.success
    assert started.agent.status in (S.AGENT_STATUS_STARTING, S.AGENT_STATUS_RUNNING)
    pid = started.agent.pid
    assert pid > 0
    again = await served.stub.OperateAgent(op(agent_id="idle", operation=S.AGENT_OPERATION_START))
    assert again.agent.pid == pid

    restarted = await served.stub.OperateAgent(
        op(agent_id="idle", operation=S.AGENT_OPERATION_RESTART)
    )
    assert restarted.agent.pid not in (0, pid)

    stopped = await served.stub.OperateAgent(op(agent_id="idle", operation=S.AGENT_OPERATION_STOP))
    assert stopped.agent.status == S.AGENT_STATUS_STOPPED
    assert stopped.agent.pid == 0
    twice = await served.stub.OperateAgent(op(agent_id="idle", operation=S.AGENT_OPERATION_STOP))
    assert twice.agent.status == S.AGENT_STATUS_STOPPED


async def test_operate_agent_rejects_bad_requests(served: Served) -> None:
    """UNSPECIFIED op and empty id are INVALID_ARGUMENT; an unknown agent is NOT_FOUND."""
    op = daemon_pb2.OperateAgentRequest
    stub = served.stub
    assert (await _code(stub.OperateAgent(op(agent_id="idle")))) == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        await _code(stub.OperateAgent(op(operation=S.AGENT_OPERATION_START)))
    ) == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        await _code(stub.OperateAgent(op(agent_id="ghost", operation=S.AGENT_OPERATION_START)))
    ) == grpc.StatusCode.NOT_FOUND
    assert (await _agents(stub))["idle"].status == S.AGENT_STATUS_STOPPED


async def test_get_agent_metrics_reads_the_ring_buffer(served: Served) -> None:
    """Samples of a running agent come back with rss and a process count; bad input is refused."""
    req = daemon_pb2.GetAgentMetricsRequest
    reply = await eventually(
        lambda: served.stub.GetAgentMetrics(req(agent_id="talker", duration_seconds=60)),
        lambda r: len(r.data_points) >= 2,
    )
    point = reply.data_points[-1]
    assert point.memory_rss > 0
    assert point.processes >= 1
    assert point.timestamp > 0
    stub = served.stub
    assert (
        await _code(stub.GetAgentMetrics(req(agent_id="talker", duration_seconds=-1)))
    ) == grpc.StatusCode.INVALID_ARGUMENT
    assert (await _code(stub.GetAgentMetrics(req()))) == grpc.StatusCode.INVALID_ARGUMENT
    assert (await _code(stub.GetAgentMetrics(req(agent_id="ghost")))) == grpc.StatusCode.NOT_FOUND


def _spec(agent_id: str, *argv: str, **kw: Any) -> common_pb2.AgentSpec:
    return common_pb2.AgentSpec(
        id=agent_id, argv=list(argv), autostart=True, start_secs=0.2, stop_timeout_seconds=2, **kw
    )


async def test_push_update_runs_beside_host_agents_and_refuses_stale(served: Served) -> None:
    """Pushed agents join the host's own; a host agent's id is refused; old versions fail."""
    stub = served.stub
    push = daemon_pb2.PushUpdateRequest
    before = await eventually(
        lambda: _agents(stub), lambda a: a["talker"].status == S.AGENT_STATUS_RUNNING
    )
    talker = _spec("talker", "/bin/sh", "-c", "echo v2; exec sleep 1000")
    talker.revision = 4
    pushed = [talker, _spec("fresh", "sleep", "1000")]
    reply = await stub.PushUpdate(push(version=5, agents=pushed))
    assert (reply.success, reply.version) == (True, 5)
    assert (list(reply.added), list(reply.changed), list(reply.removed)) == (["fresh"], [], [])
    [refused] = reply.refused
    assert (refused.agent_id, refused.revision) == ("talker", 4)
    assert "defined in this host's" in refused.reason
    assert reply.message == "applied version 5; refused talker"
    agents = await eventually(
        lambda: _agents(stub), lambda a: a["fresh"].status == S.AGENT_STATUS_RUNNING
    )
    assert set(agents) == {"talker", "idle", "fresh"}
    assert agents["talker"].pid == before["talker"].pid
    assert agents["talker"].revision == 0

    again = await stub.PushUpdate(push(version=5, agents=pushed))  # a retry: no-op
    assert (again.version, list(again.added), len(again.refused)) == (5, [], 1)
    for stale in (5, 4):
        assert (
            await _code(stub.PushUpdate(push(version=stale, agents=[_spec("x", "sleep", "1")])))
        ) == grpc.StatusCode.FAILED_PRECONDITION
    assert set(await _agents(stub)) == {"talker", "idle", "fresh"}


async def test_push_update_with_an_invalid_spec_changes_nothing(served: Served) -> None:
    """A bad spec is INVALID_ARGUMENT naming the agent and field, and no agent is touched."""
    stub = served.stub
    before = await eventually(
        lambda: _agents(stub), lambda a: a["talker"].status == S.AGENT_STATUS_RUNNING
    )
    bad = _spec("broken", "sleep", "1")
    bad.stop_timeout_seconds = -3
    with pytest.raises(grpc.RpcError) as info:
        await stub.PushUpdate(
            daemon_pb2.PushUpdateRequest(version=7, agents=[_spec("fresh", "sleep", "9"), bad])
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "broken" in (info.value.details() or "")
    assert "stop_timeout" in (info.value.details() or "")
    after = await _agents(stub)
    assert set(after) == {"talker", "idle"}
    assert after["talker"].pid == before["talker"].pid
    # The refused version was not recorded: the same number works once fixed.
    ok = await stub.PushUpdate(
        daemon_pb2.PushUpdateRequest(version=7, agents=[_spec("fresh", "sleep", "9")])
    )
    assert ok.version == 7


async def test_read_agent_log_reads_and_follows(served: Served) -> None:
    """The log reads from an offset, and follow mode streams output written later."""
    stub = served.stub
    req = daemon_pb2.ReadAgentLogRequest

    async def whole() -> bytes:
        return b"".join([r.data async for r in stub.ReadAgentLog(req(agent_id="talker"))])

    text = await eventually(whole, lambda b: b"hello from talker" in b)
    tail = [r async for r in stub.ReadAgentLog(req(agent_id="talker", offset=-6))]
    assert b"".join(r.data for r in tail) == text[-6:]

    await stub.PushUpdate(
        daemon_pb2.PushUpdateRequest(
            version=1,
            agents=[
                _spec(
                    "writer",
                    PY,
                    "-u",
                    "-c",
                    "import time\nfor i in range(100):\n print('line', i)\n time.sleep(0.1)",
                )
            ],
        )
    )
    got = b""
    stream = stub.ReadAgentLog(req(agent_id="writer", offset=0, follow=True))

    async def follow() -> None:
        nonlocal got
        async for chunk in stream:
            got += chunk.data
            if b"line 5\n" in got:
                return

    await asyncio.wait_for(follow(), timeout=20)
    stream.cancel()
    assert got.startswith(b"line 0\n")
    assert (
        await _code(stub.ReadAgentLog(req(agent_id="talker", max_bytes=-1)).read())
    ) == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        await _code(stub.ReadAgentLog(req(agent_id="ghost")).read())
    ) == grpc.StatusCode.NOT_FOUND


async def test_health_and_reflection_are_served(served: Served) -> None:
    """Stock gRPC tools work: health says SERVING and reflection lists the DaemonService."""
    health = health_pb2_grpc.HealthStub(served.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="fleet.v1.DaemonService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names: set[str] = set()
    async for answer in reflection.ServerReflectionInfo(iter([request])):
        names.update(s.name for s in answer.list_services_response.service)
    assert {"fleet.v1.DaemonService", "grpc.health.v1.Health"} <= names


async def test_list_agents_shows_the_spec_without_env_values(pki: Any) -> None:
    """ListAgents carries the spec the daemon runs and its log file; environment values
    (secrets) never leave the host, only their names."""
    with short_tmp() as root:
        spec = agent(
            "secretive",
            "sleep",
            "1000",
            env={"DB_PASSWORD": "hunter2", "MODE": "fast"},
            restart="always",
        )
        server = DaemonServer(
            daemon_config(root, pki.issue("node", "n1"), (spec,), stop_agents_on_exit=True)
        )
        await server.start()
        channel = client_channel(pki.issue("manager", "m1"), server.port, "n1", pki.trust_domain)
        try:
            reply = await daemon_pb2_grpc.DaemonServiceStub(channel).ListAgents(
                daemon_pb2.ListAgentsRequest()
            )
        finally:
            await channel.close()
            await server.stop(1.0)
    (info,) = reply.agents
    assert list(info.spec.argv) == ["sleep", "1000"]
    assert info.spec.restart == S.RESTART_POLICY_ALWAYS
    assert dict(info.spec.env) == {"DB_PASSWORD": "", "MODE": ""}
    assert b"hunter2" not in reply.SerializeToString()
    assert info.log_path == str(root / "log" / "secretive.log")
