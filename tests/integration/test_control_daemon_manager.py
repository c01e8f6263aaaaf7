"""The daemon's own end of the control channel against the real manager, over mTLS.

The daemon is the real one (`DaemonServer`, `ManagerLink`, `daemon.control`);
the manager is a real `ManagerServer` on SQLite. Where the stream must break
under a call, the daemon reaches the manager through `BlackholeProxy`: cut,
the command goes into the void; mended or closed, the connection drops on
both sides, as when a cable is pulled and the daemon reconnects.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from daemon_helpers import BlackholeProxy, agent, daemon_config, short_tmp
from manager_harness import manager_config, node_stub, registration, rpc_error, running_manager
from sqlalchemy import text

from daemon.config import ManagerLinkConfig
from daemon.control import ControlStream
from daemon.manager_link import ManagerLink, NodeInfo
from daemon.server import DaemonServer
from fleet import errors
from fleet.retry import Backoff
from fleet.v1 import common_pb2, manager_pb2
from manager.pool.stream import ControlSession
from manager.server import ManagerServer

NODE = "n1"
RESTART = common_pb2.AgentOperation.AGENT_OPERATION_RESTART


@pytest.fixture
async def manager(pki: Any, tmp_path: Path) -> AsyncIterator[ManagerServer]:
    """A running manager on SQLite."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'manager.db'}"
    async with running_manager(manager_config(pki, url, tmp_path / "state")) as server:
        yield server


def link_config(port: int, **kw: Any) -> ManagerLinkConfig:
    """The daemon's link to 127.0.0.1:`port`, reconnecting within a third of a second."""
    settings: dict[str, Any] = {
        "rpc_timeout_seconds": 2.0,
        "reconnect": Backoff(initial=0.05, maximum=0.3),
    }
    return ManagerLinkConfig(addresses=(f"127.0.0.1:{port}",), **(settings | kw))


async def wait_until(predicate: Any, within: float = 10.0) -> None:
    """Poll `predicate` (another component's state, no event to wait on) for `within` s."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110  # polls another component's state
            await asyncio.sleep(0.01)


def stream_of(manager: ManagerServer) -> ControlSession | None:
    return manager.control_streams.get(NODE)


@dataclass
class Behind:
    """A real daemon whose control stream goes through a proxy that can cut it."""

    daemon: DaemonServer
    proxy: BlackholeProxy
    address: str
    """The daemon's own listen address ("" if it has none)."""

    async def in_flight_into_the_cut(self, manager: ManagerServer) -> ControlSession:
        """Wait until one command went out on the (cut) stream and waits for its answer."""
        session = stream_of(manager)
        assert session is not None
        await wait_until(lambda: session.in_flight == 1 and session.queued == 0)
        return session


@pytest.fixture(params=["portless", "listening"])
async def behind(
    request: pytest.FixtureRequest, pki: Any, manager: ManagerServer
) -> AsyncIterator[Behind]:
    """Daemon n1 (agent `sleeper` running) streaming to the manager through a proxy;
    "portless" has no listen address, "listening" serves DaemonService too."""
    proxy = BlackholeProxy()
    await proxy.start()
    proxy.target_port = manager.port
    with short_tmp() as root:
        cfg = daemon_config(
            root,
            pki.issue("node", NODE),
            (agent("sleeper", "sleep", "1000"),),
            manager=link_config(proxy.port),
            stop_agents_on_exit=True,
            **({"listen": ""} if request.param == "portless" else {}),
        )
        daemon = DaemonServer(cfg)
        await daemon.start()
        try:
            address = f"127.0.0.1:{daemon.port}" if daemon.port else ""
            await wait_until(lambda: stream_of(manager) is not None)
            yield Behind(daemon, proxy, address)
        finally:
            await daemon.stop(1.0)
            await proxy.close()


# --- a call whose stream closed under it (issue 15: idempotent calls go again) -------


async def test_a_read_whose_stream_was_cut_is_answered_over_the_next_one(
    manager: ManagerServer, behind: Behind
) -> None:
    """ListAgents sent into a cut stream: the connection drops, the daemon reconnects,
    and the same call is answered (over the new stream, or dialled where the daemon
    listens), within its one deadline; the daemon ran it once."""
    first = stream_of(manager)
    behind.proxy.cut()
    call = asyncio.create_task(manager.pool.list_agents(NODE, behind.address, call_timeout=20))
    await behind.in_flight_into_the_cut(manager)
    behind.proxy.mend()  # both ends see the connection drop; the daemon dials again
    reply = await asyncio.wait_for(call, 20)
    assert [a.id for a in reply.agents] == ["sleeper"]
    assert manager.pool.stats()[NODE].retries == 1
    await wait_until(lambda: stream_of(manager) not in (None, first))
    ran = behind.daemon.link.commands_run
    listed = {code: n for (method, code), n in ran.items() if method == "ListAgents"}
    # The cut one never arrived; the one sent again did, unless it was dialled.
    assert listed == {"OK": 1} or (behind.address and listed == {}), listed


async def test_a_restart_whose_stream_was_cut_fails_saying_the_outcome_is_unknown(
    manager: ManagerServer, behind: Behind
) -> None:
    """A restart sent into a cut stream fails UNAVAILABLE as soon as the stream drops,
    saying it may or may not have run, and is never sent again: the agent was not
    restarted."""
    before = await manager.pool.list_agents(NODE, behind.address)
    pid = before.agents[0].pid
    behind.proxy.cut()
    loop = asyncio.get_running_loop()
    call = asyncio.create_task(
        manager.pool.operate_agent(NODE, behind.address, "sleeper", RESTART, call_timeout=20)
    )
    await behind.in_flight_into_the_cut(manager)
    behind.proxy.mend()
    t0 = loop.time()
    with pytest.raises(errors.Unavailable) as lost:
        await asyncio.wait_for(call, 20)
    assert loop.time() - t0 < 5  # at the drop, not at the deadline
    assert lost.value.message.startswith(f"{NODE}: the node's control stream closed")
    assert "OperateAgent was in flight, so whether it ran on the node is unknown" in (
        lost.value.message
    )
    await wait_until(lambda: stream_of(manager) is not None)
    after = await manager.pool.list_agents(NODE, behind.address)
    assert (after.agents[0].pid, after.agents[0].restart_count) == (pid, 0)
    ran = behind.daemon.link.commands_run
    assert not [key for key in ran if key[0] == "OperateAgent"]


async def test_a_read_is_dialled_when_the_stream_does_not_come_back(
    pki: Any, manager: ManagerServer
) -> None:
    """The proxy closed for good under a ListAgents: a daemon with a listen address is
    dialled and answers; the one stream command it was sent never reached it."""
    proxy = BlackholeProxy()
    await proxy.start()
    proxy.target_port = manager.port
    with short_tmp() as root:
        cfg = daemon_config(
            root,
            pki.issue("node", NODE),
            (agent("sleeper", "sleep", "1000"),),
            manager=link_config(proxy.port),
            stop_agents_on_exit=True,
        )
        daemon = DaemonServer(cfg)
        await daemon.start()
        try:
            address = f"127.0.0.1:{daemon.port}"
            await wait_until(lambda: stream_of(manager) is not None)
            proxy.cut()
            call = asyncio.create_task(manager.pool.list_agents(NODE, address, call_timeout=20))
            session = stream_of(manager)
            assert session is not None
            await wait_until(lambda: session.in_flight == 1 and session.queued == 0)
            await proxy.close()  # the stream drops and cannot come back
            reply = await asyncio.wait_for(call, 20)
            assert [a.id for a in reply.agents] == ["sleeper"]
            assert manager.pool.stats()[NODE].connections == 1  # dialled
            assert stream_of(manager) is None
            assert daemon.link.commands_run == {}
        finally:
            await daemon.stop(1.0)
            await proxy.close()


# --- ConnectError carries the Resource (issue 15) -----------------------------------


async def test_a_refusal_over_the_stream_is_the_error_the_unary_call_gives(
    pki: Any, manager: ManagerServer
) -> None:
    """The node deleted under its open stream: the daemon's SyncAgentStates over the
    stream and the unary one become the same NotFound, naming the node as its Resource."""
    async with node_stub(pki, NODE, manager.port) as stub:
        stream, welcome = await ControlStream.open(
            stub, registration(NODE, daemon_address=""), rpc_timeout=5.0
        )
        try:
            assert welcome.success
            async with manager.db.engine.begin() as conn:
                await conn.execute(text("DELETE FROM nodes WHERE node_id = :n"), {"n": NODE})
            states = manager_pb2.SyncAgentStatesRequest(node_id=NODE)
            with pytest.raises(grpc.RpcError) as refused:
                await stream.SyncAgentStates(states)
        finally:
            await stream.close()
        unary = await rpc_error(stub.SyncAgentStates(states, timeout=10))
    over_stream = errors.from_rpc_error(refused.value, target="manager")
    over_unary = errors.from_rpc_error(unary, target="manager")
    assert type(over_stream) is type(over_unary) is errors.NotFound
    assert over_stream.message == over_unary.message == f"manager: node {NODE!r} is not registered"
    assert over_stream.resource == over_unary.resource == errors.Resource("node", NODE)


# --- a link without a command runner (issue 15) --------------------------------------


async def test_a_link_without_a_command_runner_answers_unimplemented_at_once(
    pki: Any, manager: ManagerServer, tmp_path: Path
) -> None:
    """A daemon link that runs no commands ends each one UNIMPLEMENTED right away (not at
    the caller's deadline), unary or streaming, is not asked again, and keeps its stream."""
    link = ManagerLink(
        link_config(manager.port),
        tls=pki.issue("node", NODE),
        trust_domain=pki.trust_domain,
        node=NodeInfo(NODE, "", {}),
        state_dir=tmp_path / "link",
        collect=list,
        snapshot=list,
    )
    await link.start()
    try:
        await wait_until(lambda: stream_of(manager) is not None)
        session = stream_of(manager)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(errors.FleetError) as unary:
            await manager.pool.list_agents(NODE, "", call_timeout=30)
        with pytest.raises(errors.FleetError) as streaming:
            async for _ in manager.pool.read_agent_log(NODE, "", "web", call_timeout=30):
                pass
        assert loop.time() - t0 < 5
        for refused in (unary.value, streaming.value):
            assert refused.code == grpc.StatusCode.UNIMPLEMENTED
            assert refused.message == f"{NODE}: this daemon runs no commands on its control stream"
        assert manager.pool.stats()[NODE].retries == 0  # an answer, not a broken stream
        assert stream_of(manager) is session
        assert (link.mode, link.reconnects) == ("stream", 0)
    finally:
        await link.stop()
