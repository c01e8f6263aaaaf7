"""Fuzz every FleetService RPC against a live manager and a live daemon, as an operator.

Node n1 is a real daemon (agents "sleeper" and "other") on loopback; node n2
is registered at a loopback port where nothing listens. Properties: never
UNKNOWN/INTERNAL; a refused call writes nothing (an operation that reached
a daemon may audit its failure, so for OperateAgent(s) only a request
refused as INVALID_ARGUMENT must leave no trace); the manager still serves.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio
from daemon_helpers import agent, short_tmp
from fuzz_support import FUZZ, call_checked, db_state, settled
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc import aio
from hypothesis import given
from hypothesis import strategies as st
from live_env import (
    ARTIFACT,
    SLEEP,
    ModulePki,
    artifact_upload,
    channels,
    desired_requests,
    enrollment_requests,
    invoke,
    live_daemon,
    live_manager,
    manager_name,
    methods,
    probe_definition,
    registration,
    rpc_name,
    serving,
)
from proto_strategies import mostly, requests, text

from fleet.v1 import common_pb2, fleet_pb2, jobs_pb2, manager_pb2
from manager.server import ManagerServer
from manager.servicers.fleet_service import SERVICE_NAME

AGENTS = ("sleeper", "other")


def _overrides() -> dict[str, st.SearchStrategy[Any]]:
    out: dict[str, st.SearchStrategy[Any]] = {}
    for method in methods("FleetService"):
        fields = method.input_type.fields_by_name
        name = method.input_type.full_name
        if "node_id" in fields:
            out[f"{name}.node_id"] = st.one_of(st.just("n1"), st.just("n1"), st.just("n2"), text)
        if "agent_id" in fields:
            out[f"{name}.agent_id"] = st.one_of(st.sampled_from(AGENTS), text)
        if "follow" in fields:  # a following stream is cut after 0.3 s idle: keep it rare
            out[f"{name}.follow"] = mostly(False, st.booleans())
        if "name" in fields:  # definitions and rollouts: the applied one, or anything
            out[f"{name}.name"] = st.one_of(st.just("probe"), text)
        # A real fan-out restarts agents, a real apply or undo stores a revision;
        # plans exercise the same validation.
        if "plan" in fields:
            out[f"{name}.plan"] = mostly(True, st.booleans())
    # An applied definition must select no node: pushes and rollouts in the
    # background would change the database under the "a refusal writes
    # nothing" check. Selector parsing is fuzzed through ListNodes.
    out["fleet.v1.Definition.selector"] = st.just(probe_definition().selector)
    out["fleet.v1.FleetServiceQueryMetricsRequest.type"] = st.one_of(st.just("cpu"), text)
    # Jobs: plans only (a started job's driver writes after the reply); job ids of
    # no job, or anything.
    out["fleet.v1.FleetServiceRunJobRequest.plan"] = st.just(True)
    for rpc in ("GetJob", "WatchJob", "ReadJobOutput", "CancelJob", "RerunJob"):
        out[f"fleet.v1.FleetService{rpc}Request.job_id"] = st.one_of(st.just("no-such-job"), text)
    # Deleting or revoking n1 or n2 would take the other fuzzers' nodes away; any other
    # name is fair (integration tests delete and revoke real nodes).
    for rpc in ("DeleteNode", "RevokeNode"):
        out[f"fleet.v1.FleetService{rpc}Request.node_id"] = st.one_of(
            st.just("absent"), text.filter(lambda t: t not in ("n1", "n2"))
        )
    return out


OVERRIDES = _overrides()


def valid(rpc: str) -> Message:
    """A request an operator gets OK for, now (n1 and its agent "sleeper")."""
    now = int(time.time() * 1000)
    restart = common_pb2.AGENT_OPERATION_RESTART
    test_nodes = common_pb2.LabelSelector(match_labels={"env": "test"})
    f = fleet_pb2
    return {
        "FleetService.ListNodes": f.FleetServiceListNodesRequest(selector=test_nodes),
        "FleetService.GetNode": f.FleetServiceGetNodeRequest(node_id="n1"),
        "FleetService.UpdateNodeLabels": f.FleetServiceUpdateNodeLabelsRequest(
            node_id="n1", set={"team": "fuzz"}
        ),
        "FleetService.ListAgents": f.FleetServiceListAgentsRequest(node_id="n1"),
        "FleetService.OperateAgent": f.FleetServiceOperateAgentRequest(
            node_id="n1", agent_id="sleeper", operation=restart
        ),
        "FleetService.OperateAgents": f.FleetServiceOperateAgentsRequest(
            selector=test_nodes, agent_id="sleeper", operation=restart, plan=True
        ),
        "FleetService.QueryMetrics": f.FleetServiceQueryMetricsRequest(
            node_id="n1", type="cpu", start_time=now - 60_000, end_time=now + 60_000
        ),
        "FleetService.ListMetricTypes": f.FleetServiceListMetricTypesRequest(node_id="n1"),
        "FleetService.GetAgentMetrics": f.FleetServiceGetAgentMetricsRequest(
            node_id="n1", agent_id="sleeper"
        ),
        "FleetService.ReadAgentLog": f.FleetServiceReadAgentLogRequest(
            node_id="n1", agent_id="sleeper"
        ),
        "FleetService.WatchEvents": f.FleetServiceWatchEventsRequest(),
        **desired_requests(),
        # A client stream of one message: the (empty) artifact's upload.
        "FleetService.PushArtifact": artifact_upload(),
        "FleetService.ListArtifacts": f.FleetServiceListArtifactsRequest(name=ARTIFACT[0]),
        "FleetService.GetArtifact": f.FleetServiceGetArtifactRequest(
            name=ARTIFACT[0], version=ARTIFACT[1]
        ),
        "FleetService.DeleteArtifact": f.FleetServiceDeleteArtifactRequest(
            name=ARTIFACT[0], version=ARTIFACT[1]
        ),
        "FleetService.RunJob": f.FleetServiceRunJobRequest(
            spec=jobs_pb2.JobSpec(
                steps=[jobs_pb2.JobStep(command=jobs_pb2.JobCommand(argv=["true"]))],
                selector=test_nodes,
                max_concurrency="1",
            ),
            plan=True,
        ),
        "FleetService.ListJobs": f.FleetServiceListJobsRequest(),
        "FleetService.GetJob": f.FleetServiceGetJobRequest(job_id="no-such-job"),
        "FleetService.WatchJob": f.FleetServiceWatchJobRequest(job_id="no-such-job"),
        "FleetService.ReadJobOutput": f.FleetServiceReadJobOutputRequest(job_id="no-such-job"),
        "FleetService.CancelJob": f.FleetServiceCancelJobRequest(job_id="no-such-job"),
        "FleetService.RerunJob": f.FleetServiceRerunJobRequest(job_id="no-such-job"),
        **enrollment_requests(),
    }[rpc]


@functools.cache
def strategy(rpc: str) -> st.SearchStrategy[Message]:
    """Built at first use, so the valid base's times are the manager's now."""
    return requests(valid(rpc), OVERRIDES)


AUDITED = {"FleetService.OperateAgent", "FleetService.OperateAgents"}
# Accepted calls whose consequences (convergence, rollout steps) land after the reply.
CONVERGING = {
    f"FleetService.{rpc}"
    for rpc in (
        "UpdateNodeLabels",
        "ApplyDefinitions",
        "DeleteDefinition",
        "PauseRollout",
        "ResumeRollout",
        "PromoteRollout",
        "AbortRollout",
        "UndoRollout",
    )
}
"""Operations record their attempt; only an invalid request must leave nothing."""


@dataclass
class Env:
    """The live manager, n1's daemon port, and an operator's channel."""

    manager: ManagerServer
    channel: aio.Channel
    known: dict[str, Any] | None = None
    """The database as the last refused call left it (None: re-read it)."""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(module_pki: ModulePki, manager_database: str) -> AsyncIterator[Env]:
    """A manager (per backend); n1's real daemon and n2 (unreachable) registered with it."""
    pki = module_pki
    specs = [agent(a, SLEEP, "1000", start_secs=0.0, stop_timeout=2.0) for a in AGENTS]
    register = {m.name: m for m in methods("ManagerService")}["RegisterNode"]
    with short_tmp() as root:
        async with (
            live_manager(pki, root, manager_database) as manager,
            live_daemon(pki, root / "d", "n1", specs) as daemon,
            channels(
                manager.port,
                {
                    "n1": pki.issue("node", "n1"),
                    "n2": pki.issue("node", "n2"),
                    "operator": pki.issue("operator", "alice"),
                },
                manager_name(pki),
            ) as chans,
        ):
            for node, address, env in (
                ("n1", f"127.0.0.1:{daemon.port}", "test"),
                ("n2", "127.0.0.1:1", "dead"),
            ):
                request = registration(node, address)
                request.labels["env"] = env
                reply = await invoke(chans[node], register, request)
                assert reply.code == grpc.StatusCode.OK, reply
            # The manager knows n1's agents (its daemon's link dials nowhere here).
            sync = {m.name: m for m in methods("ManagerService")}["SyncAgentStates"]
            states = [
                manager_pb2.AgentState(agent_id=a, status=common_pb2.AGENT_STATUS_RUNNING)
                for a in AGENTS
            ]
            request = manager_pb2.SyncAgentStatesRequest(node_id="n1", states=states)
            reply = await invoke(chans["n1"], sync, request)
            assert reply.code == grpc.StatusCode.OK, reply
            # On PostgreSQL the driver leads a second after it takes the lock: wait for it,
            # or `settled` below could see the quiet before its first pass.
            for _ in range(300):
                if manager.convergence.leading:
                    break
                await asyncio.sleep(0.1)
            assert manager.convergence.leading, "the desired-state driver never led"
            # A definition (of no node) with a revision and a finished rollout.
            apply = {m.name: m for m in methods("FleetService")}["ApplyDefinitions"]
            request = fleet_pb2.FleetServiceApplyDefinitionsRequest(
                definitions=[probe_definition()]
            )
            reply = await invoke(chans["operator"], apply, request)
            assert reply.code == grpc.StatusCode.OK, reply
            # Its rollout ends after the call returns, by the driver's next pass; a quiet
            # database alone can come before that pass (seen on a loaded CI machine).
            for _ in range(300):
                if [r.state for r in (await db_state(manager.db))["rollouts"]] == ["SUCCESSFUL"]:
                    break
                await asyncio.sleep(0.1)
            rollouts = (await db_state(manager.db))["rollouts"]
            assert [r.state for r in rollouts] == ["SUCCESSFUL"], rollouts
            await settled(manager.db)
            yield Env(manager, chans["operator"])


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("method", methods("FleetService"), ids=rpc_name)
@FUZZ
@given(data=st.data())
async def test_fuzz_fleet_service(env: Env, method: MethodDescriptor, data: st.DataObject) -> None:
    """Any request: a proper status (never UNKNOWN/INTERNAL), and a refusal writes nothing."""
    name = rpc_name(method)
    request = data.draw(strategy(name), label="request")
    before = env.known or await db_state(env.manager.db)
    env.known = None
    idle = 5.0 if name == "FleetService.OperateAgents" else 0.3  # let a fan-out finish
    outcome = await call_checked(env.channel, method, request, idle=idle)
    if outcome.code == grpc.StatusCode.OK:
        if name in CONVERGING:
            env.known = await settled(env.manager.db)
        return
    after = await db_state(env.manager.db)
    if name not in AUDITED or outcome.code == grpc.StatusCode.INVALID_ARGUMENT:
        assert after == before, f"refused with {outcome.code.name} but the database changed"
    env.known = after


@pytest.mark.asyncio(loop_scope="module")
async def test_manager_still_serves_operators_after_fuzzing(env: Env) -> None:
    """After the fuzzers, health says SERVING and GetNode n1 answers."""
    assert await serving(env.channel, SERVICE_NAME)
    get_node = {m.name: m for m in methods("FleetService")}["GetNode"]
    reply = await invoke(env.channel, get_node, fleet_pb2.FleetServiceGetNodeRequest(node_id="n1"))
    assert reply.code == grpc.StatusCode.OK, reply
