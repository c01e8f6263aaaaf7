"""FleetService.ListAgents over real mTLS, on SQLite and PostgreSQL: the last exit a daemon
synced, the status and health filters, and the stale agents of an OFFLINE node."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
from fleet_harness import operator_stub
from manager_harness import (
    FakeClock,
    manager_config,
    node_stub,
    registration,
    rpc_error,
    running_manager,
)

from fleet.v1 import common_pb2, fleet_pb2, manager_pb2
from manager.server import ManagerServer

S = common_pb2
# ttl 10 s, no jitter, grace 5 s: offline after 15 s of silence; 60 s failover grace.
LIVENESS = {"min_ttl_seconds": 10.0, "jitter": 0.0, "grace_seconds": 5.0}

STATES = [
    manager_pb2.AgentState(
        agent_id="web", type="web", status=S.AGENT_STATUS_RUNNING, pid=41,
        health=S.AGENT_HEALTH_HEALTHY,
    ),
    manager_pb2.AgentState(
        agent_id="hung", type="worker", status=S.AGENT_STATUS_RUNNING, pid=42,
        health=S.AGENT_HEALTH_UNHEALTHY,
        message="unhealthy: no heartbeat for 31.0s (timeout 30s); left running (restart = never)",
    ),
    manager_pb2.AgentState(
        agent_id="crashy", type="worker", status=S.AGENT_STATUS_FATAL, exit_code=3,
        last_exit=common_pb2.LastExit(
            kind=S.AGENT_EXIT_KIND_EXITED, exit_code=3, reason="exited with code 3",
            time=1_700_000_000_000,
        ),
        message="exited too quickly (exit code 3); 6 times in a row; gave up",
    ),
    manager_pb2.AgentState(agent_id="idle", type="web", status=S.AGENT_STATUS_STOPPED),
]  # fmt: skip


async def _sweeping(server: ManagerServer) -> None:
    """Wait until the sweeper took the lead (its failover grace counts from then)."""
    while server.sweeper.active_since is None:  # noqa: ASYNC110 - no event to await
        await asyncio.sleep(0.01)


async def _listed(stub: Any, **fields: Any) -> list[str]:
    reply = await stub.ListAgents(fleet_pb2.FleetServiceListAgentsRequest(**fields))
    return [f"{a.node_id}/{a.agent.id}" for a in reply.agents]


async def test_filters_by_state_and_health_and_keep_the_last_exit(
    pki: Any, database_url: str, tmp_path: Path
) -> None:
    """statuses keeps the agents in those states, unhealthy the UNHEALTHY ones, both together
    the agents matching both; each comes with the last exit its daemon synced."""
    config = manager_config(pki, database_url, tmp_path / "state")
    async with running_manager(config) as manager:
        async with node_stub(pki, "n1", manager.port) as node:
            await node.RegisterNode(registration("n1"))
            await node.SyncAgentStates(
                manager_pb2.SyncAgentStatesRequest(node_id="n1", states=STATES)
            )
        async with operator_stub(pki, manager.port) as stub:
            assert await _listed(stub) == ["n1/crashy", "n1/hung", "n1/idle", "n1/web"]
            down = [S.AGENT_STATUS_FATAL, S.AGENT_STATUS_STOPPED]
            assert await _listed(stub, statuses=down) == ["n1/crashy", "n1/idle"]
            assert await _listed(stub, unhealthy=True) == ["n1/hung"]
            running = [S.AGENT_STATUS_RUNNING]
            assert await _listed(stub, statuses=running, unhealthy=True) == ["n1/hung"]
            assert await _listed(stub, statuses=[S.AGENT_STATUS_FATAL], unhealthy=True) == []
            reply = await stub.ListAgents(
                fleet_pb2.FleetServiceListAgentsRequest(statuses=[S.AGENT_STATUS_FATAL])
            )
            (crashy,) = reply.agents
            assert crashy.agent.exit_code == 3
            assert crashy.agent.last_exit == STATES[2].last_exit
            assert (crashy.stale, crashy.reported_at > 0) == (False, True)


async def test_a_state_that_is_no_state_is_refused_naming_it(
    pki: Any, database_url: str, tmp_path: Path
) -> None:
    """UNSPECIFIED or an unknown number in statuses is INVALID_ARGUMENT naming its index."""
    config = manager_config(pki, database_url, tmp_path / "state")
    async with running_manager(config) as manager, operator_stub(pki, manager.port) as stub:
        for statuses, field in (
            ([S.AGENT_STATUS_RUNNING, S.AGENT_STATUS_UNSPECIFIED], "statuses[1]"),
            ([99], "statuses[0]"),
        ):
            err = await rpc_error(
                stub.ListAgents(fleet_pb2.FleetServiceListAgentsRequest(statuses=statuses))
            )
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in (err.details() or "")


async def test_agents_of_an_offline_node_are_stale_as_of_their_last_sync(
    pki: Any, database_url: str, tmp_path: Path
) -> None:
    """Once the sweeper marks n1 OFFLINE its agents are stale, reported at the time of its
    last sync; n2's, still heartbeating, are not."""
    clock = FakeClock()
    config = manager_config(pki, database_url, tmp_path / "state", liveness=LIVENESS)
    async with running_manager(config, clock) as manager:
        await _sweeping(manager)
        async with (
            node_stub(pki, "n1", manager.port) as n1,
            node_stub(pki, "n2", manager.port) as n2,
        ):
            await n1.RegisterNode(registration("n1"))
            await n2.RegisterNode(registration("n2"))
            clock.advance(30)
            synced_ms = clock.ms()
            for stub, name in ((n1, "n1"), (n2, "n2")):
                await stub.SyncAgentStates(
                    manager_pb2.SyncAgentStatesRequest(node_id=name, states=STATES[:1])
                )
            clock.advance(45)  # past the failover grace; n1 silent 45 s
            await n2.Heartbeat(manager_pb2.HeartbeatRequest(node_id="n2", timestamp=clock.ms()))
            await manager.heartbeats.flush()
            assert (await manager.sweeper.sweep_once()).offline == ("n1",)
        async with operator_stub(pki, manager.port) as stub:
            reply = await stub.ListAgents(fleet_pb2.FleetServiceListAgentsRequest())
            shown = {a.node_id: (a.stale, a.reported_at) for a in reply.agents}
            assert shown == {"n1": (True, synced_ms), "n2": (False, synced_ms)}
