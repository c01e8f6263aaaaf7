"""The manager's daemon pool against real fleet-daemon servers supervising real agents."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from daemon_helpers import agent, daemon_config, eventually, short_tmp

from daemon.server import DaemonServer
from fleet import errors
from fleet.v1 import common_pb2
from manager.pool import ConnectionState, DaemonPool, PoolConfig


@pytest.fixture
async def daemons(pki: Any) -> AsyncIterator[dict[str, DaemonServer]]:
    """Two real daemons (node/n1, node/n2), each supervising a sleeping agent."""
    servers: dict[str, DaemonServer] = {}
    with short_tmp() as root:
        try:
            for node in ("n1", "n2"):
                cfg = daemon_config(
                    root / node,
                    pki.issue("node", node),
                    (agent("sleeper", "/bin/sh", "-c", "echo up; exec sleep 1000"),),
                    stop_agents_on_exit=True,
                )
                servers[node] = DaemonServer(cfg)
                await servers[node].start()
            yield servers
        finally:
            for server in servers.values():
                await server.stop(1.0)


@pytest.fixture
async def pool(pki: Any) -> AsyncIterator[DaemonPool]:
    """A pool holding the manager's certificate."""
    async with DaemonPool(
        pki.issue("manager", "m1"), pki.trust_domain, config=PoolConfig(call_timeout=10.0)
    ) as pool:
        yield pool


def _address(server: DaemonServer) -> str:
    return f"127.0.0.1:{server.port}"


async def test_restart_through_the_pool_replaces_the_agent_process(
    daemons: dict[str, DaemonServer], pool: DaemonPool
) -> None:
    """A restart sent through the pool gives the agent a new pid; both daemons stay READY."""
    n1 = _address(daemons["n1"])

    async def sleeper() -> common_pb2.AgentInfo:
        return (await pool.list_agents("n1", n1)).agents[0]

    before = await eventually(sleeper, lambda a: a.status == common_pb2.AGENT_STATUS_RUNNING)
    reply = await pool.operate_agent("n1", n1, "sleeper", common_pb2.AGENT_OPERATION_RESTART)
    assert reply.success
    assert reply.agent.pid not in (0, before.pid)

    listed = await pool.list_agents("n2", _address(daemons["n2"]))
    assert [a.id for a in listed.agents] == ["sleeper"]
    assert {pool.state("n1"), pool.state("n2")} == {ConnectionState.READY}
    assert pool.connections_opened == 2


async def test_daemon_errors_reach_the_caller_named_and_unretried(
    daemons: dict[str, DaemonServer], pool: DaemonPool
) -> None:
    """An unknown agent is NOT_FOUND prefixed with the node id, tried once."""
    with pytest.raises(errors.NotFound, match=r"^n1: ") as info:
        await pool.operate_agent(
            "n1", _address(daemons["n1"]), "ghost", common_pb2.AGENT_OPERATION_START
        )
    assert "ghost" in str(info.value)
    assert pool.stats()["n1"].retries == 0


async def test_agent_log_is_read_through_the_pool(
    daemons: dict[str, DaemonServer], pool: DaemonPool
) -> None:
    """read_agent_log returns what the agent wrote to its log."""
    n1 = _address(daemons["n1"])

    async def whole() -> bytes:
        return b"".join([r.data async for r in pool.read_agent_log("n1", n1, "sleeper")])

    assert b"up\n" in await eventually(whole, lambda b: b"up" in b)
    assert pool.stats()["n1"].in_flight == 0
