"""The daemon on the control channel: a real daemon with no listening port, managed over
its own Connect stream (an in-test Connect server, tests/integration/connect_helpers.py)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from connect_helpers import ConnectManager, OlderManager, serve
from daemon_helpers import agent, daemon_config, short_tmp
from grpc import aio

from daemon.config import ManagerLinkConfig
from daemon.manager_link import ManagerLink, NodeInfo
from daemon.server import DaemonServer
from fleet.retry import Backoff
from fleet.v1 import common_pb2, daemon_pb2

S = common_pb2
OK = grpc.StatusCode.OK.value[0]
TALKER = "i=0; while true; do echo line $i; i=$((i+1)); sleep 0.02; done"


@dataclass
class Controlled:
    server: DaemonServer
    manager: ConnectManager
    grpc_server: aio.Server
    port: int
    pki: Any


def _link_config(port: int, **kw: Any) -> ManagerLinkConfig:
    settings: dict[str, Any] = {
        "metrics_interval_seconds": 0.2,
        "rpc_timeout_seconds": 2.0,
        "reconnect": Backoff(initial=0.05, maximum=0.3),
    }
    return ManagerLinkConfig(addresses=(f"127.0.0.1:{port}",), **(settings | kw))


@pytest.fixture
async def controlled(pki: Any) -> AsyncIterator[Controlled]:
    """Daemon node/n1 with `listen = ""` connected to a Connect server (manager/m1)."""
    manager = ConnectManager()
    grpc_server, port = await serve(pki.issue("manager", "m1"), manager)
    with short_tmp() as root:
        cfg = daemon_config(
            root,
            pki.issue("node", "n1"),
            (
                agent("talker", "/bin/sh", "-c", TALKER),
                agent("idle", "sleep", "1000", autostart=False),
            ),
            listen="",
            manager=_link_config(port),
            stop_agents_on_exit=True,
        )
        server = DaemonServer(cfg)
        await server.start()
        state = Controlled(server, manager, grpc_server, port, pki)
        try:
            await manager.wait(lambda: manager.open and manager.hellos)
            yield state
        finally:
            await server.stop(1.0)
            await state.grpc_server.stop(None)


async def _call(manager: ConnectManager, method: str, request: Any, **kw: Any) -> Any:
    rid = manager.command(method, request, **kw)
    return await manager.ended(rid)


async def test_hello_says_everything_register_does_and_no_port_is_open(
    controlled: Controlled,
) -> None:
    """Hello first with the node's facts, an empty daemon_address; states and metrics follow
    on the stream, no heartbeat or RegisterNode call is made, no TCP port is served."""
    m, server = controlled.manager, controlled.server
    hello = m.hellos[0]
    assert hello.node_id == "n1"
    assert hello.daemon_address == ""
    assert hello.hostname == socket.gethostname()
    assert hello.daemon_version
    assert hello.os
    assert hello.arch
    await m.wait(lambda: len(m.stored) >= 2)
    await m.wait(lambda: any(s.states for s in m.snapshots))
    assert {s.agent_id for s in m.snapshots[-1].states} == {"talker", "idle"}
    assert m.stored == sorted(set(m.stored))  # each batch once, in order
    assert m.registrations == []
    assert m.heartbeats == 0
    assert server.link.mode == "stream"
    assert server.link.state == "connected"
    assert server.port == 0
    assert server.advertised == ""


async def test_commands_list_and_operate_through_the_servicer(controlled: Controlled) -> None:
    """ListAgents and OperateAgent run the DaemonService handlers and answer in pieces."""
    m = controlled.manager
    result = await _call(m, "ListAgents", daemon_pb2.ListAgentsRequest())
    assert result.code == OK, result.message
    agents = {a.id: a for a in daemon_pb2.ListAgentsResponse.FromString(result.responses[0]).agents}
    assert set(agents) == {"talker", "idle"}
    result = await _call(
        m,
        "OperateAgent",
        daemon_pb2.OperateAgentRequest(agent_id="idle", operation=S.AGENT_OPERATION_START),
    )
    assert result.code == OK, result.message
    reply = daemon_pb2.OperateAgentResponse.FromString(result.responses[0])
    assert reply.success
    assert reply.agent.id == "idle"
    result = await _call(m, "OperateAgent", daemon_pb2.OperateAgentRequest(agent_id="nope"))
    assert result.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert result.responses == []
    assert controlled.server.link.commands_run[("ListAgents", "OK")] == 1


async def test_unknown_method_and_bad_requests_are_refused_with_a_status(
    controlled: Controlled,
) -> None:
    """UNIMPLEMENTED for an unknown method, INVALID_ARGUMENT for bytes that are no request,
    a cancel for an unknown id is ignored, and the stream keeps serving."""
    m = controlled.manager
    result = await _call(m, "FormatDisk", b"")
    assert result.code == grpc.StatusCode.UNIMPLEMENTED.value[0]
    assert "FormatDisk" in result.message
    result = await _call(m, "ListAgents", b"\xff\xff\xff")
    assert result.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    m.cancel(999)
    result = await _call(m, "ListAgents", daemon_pb2.ListAgentsRequest())
    assert result.code == OK
    assert 999 not in m.results


async def test_a_followed_log_sends_only_what_was_credited(controlled: Controlled) -> None:
    """ReadAgentLog with follow: 2 messages on 2 credits, 3 more after a grant of 3; a
    cancel ends it CANCELLED."""
    m = controlled.manager
    request = daemon_pb2.ReadAgentLogRequest(agent_id="talker", follow=True, max_bytes=16)
    rid = m.command("ReadAgentLog", request, credit=2)
    await m.wait(lambda: len(m.results.get(rid, _empty).responses) >= 2)
    await asyncio.sleep(0.5)  # the log grows meanwhile: still only what was credited
    assert len(m.results[rid].responses) == 2
    m.grant(rid, 3)
    await m.wait(lambda: len(m.results[rid].responses) >= 5)
    await asyncio.sleep(0.3)
    assert len(m.results[rid].responses) == 5
    chunks = [daemon_pb2.ReadAgentLogResponse.FromString(r) for r in m.results[rid].responses]
    assert [c.offset for c in chunks[1:]] == [c.next_offset for c in chunks[:-1]]
    m.cancel(rid)
    result = await m.ended(rid)
    assert result.code == grpc.StatusCode.CANCELLED.value[0]


async def test_a_deadline_ends_a_follow(controlled: Controlled) -> None:
    """timeout_seconds bounds the call: DEADLINE_EXCEEDED, even while output flows."""
    m = controlled.manager
    request = daemon_pb2.ReadAgentLogRequest(agent_id="talker", follow=True)
    result = await _call(m, "ReadAgentLog", request, credit=1_000_000, timeout=0.5)
    assert result.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert result.responses  # it did run until the deadline


async def test_push_update_in_pieces_and_an_oversized_request(controlled: Controlled) -> None:
    """A PushUpdate sent in many pieces is applied; a request over 4 MiB is refused
    RESOURCE_EXHAUSTED and changes nothing."""
    m = controlled.manager
    spec = common_pb2.AgentSpec(
        id="pushed", argv=["sleep", "1000"], env={"NOTE": "x" * 2000}, start_secs=0.2
    )
    request = daemon_pb2.PushUpdateRequest(version=1, agents=[spec])
    assert len(request.SerializeToString()) > 1000
    result = await _call(m, "PushUpdate", request, piece=100)
    assert result.code == OK, result.message
    assert daemon_pb2.PushUpdateResponse.FromString(result.responses[0]).added == ["pushed"]
    big = daemon_pb2.PushUpdateRequest(version=2, agents=[spec]).SerializeToString()
    big += b"\x00" * (4 * 1024 * 1024)
    result = await _call(m, "PushUpdate", big)
    assert result.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert controlled.server.supervisor.version == 1


async def test_a_batch_is_kept_until_stored_and_resent_after_a_manager_restart(
    controlled: Controlled,
) -> None:
    """Unanswered batches stay buffered; the restarted manager gets them, each stored once,
    and the daemon reconnects by itself."""
    m = controlled.manager
    m.answer_metrics = False
    first = len(m.received)
    await m.wait(lambda: len(m.received) > first)
    waiting = m.received[first]
    assert waiting in controlled.server.link.buffer.sequences()
    await controlled.grpc_server.stop(None)
    again = ConnectManager()
    controlled.grpc_server, _ = await serve(
        controlled.pki.issue("manager", "m1"), again, controlled.port
    )
    await again.wait(lambda: waiting in again.stored, within=20)
    assert again.hellos
    assert again.hellos[0].node_id == "n1"
    assert sorted(again.stored) == again.stored
    assert controlled.server.link.reconnects >= 1


async def test_an_older_manager_gets_the_unary_rpcs(pki: Any, tmp_path: Any) -> None:
    """Connect answered UNIMPLEMENTED: RegisterNode, heartbeats and ReportMetrics instead."""
    manager = OlderManager()
    grpc_server, port = await serve(pki.issue("manager", "m1"), manager)
    link = ManagerLink(
        _link_config(port),
        tls=pki.issue("node", "n1"),
        trust_domain=pki.trust_domain,
        node=NodeInfo("n1", "127.0.0.1:7444", {}),
        state_dir=tmp_path,
        collect=lambda: [common_pb2.MetricData(type="cpu", timestamp=1, values={"v": 1.0})],
        snapshot=list,
    )
    await link.start()
    try:
        await manager.wait(lambda: manager.heartbeats >= 1 and len(manager.stored) >= 2)
    finally:
        await link.stop()
        await grpc_server.stop(None)
    assert manager.hellos == []
    assert [r.node_id for r in manager.registrations] == ["n1"]
    assert link.reconnects == 0  # the fallback is no failure


async def test_a_refused_batch_is_handled_as_the_unary_answer(pki: Any, tmp_path: Any) -> None:
    """A ConnectError RESOURCE_EXHAUSTED on a batch keeps it and retries on the same stream."""
    manager = ConnectManager()
    manager.refuse["metrics"] = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    grpc_server, port = await serve(pki.issue("manager", "m1"), manager)
    link = ManagerLink(
        _link_config(port, metrics_interval_seconds=3600.0),
        tls=pki.issue("node", "n1"),
        trust_domain=pki.trust_domain,
        node=NodeInfo("n1", "", {}),
        state_dir=tmp_path,
        collect=lambda: [common_pb2.MetricData(type="cpu", timestamp=1, values={"v": 1.0})],
        snapshot=list,
    )
    link.cut_batch()
    await link.start()
    try:
        await manager.wait(lambda: manager.open and manager.hellos)
        await asyncio.sleep(0.5)
        assert manager.stored == []
        assert link.buffer.sequences() == [1]
        del manager.refuse["metrics"]
        await manager.wait(lambda: manager.stored == [1])
        await manager.wait(lambda: len(link.buffer) == 0)
    finally:
        await link.stop()
        await grpc_server.stop(None)
    assert manager.streams == 1
    assert link.reconnects == 0


class _Empty:
    responses: list[bytes] = []  # noqa: RUF012  # read-only stand-in


_empty = _Empty()
