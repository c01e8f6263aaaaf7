"""Fuzz every DaemonService RPC against a live daemon, as the manager.

Properties: never UNKNOWN/INTERNAL; a refused call leaves the supervisor's
pushed version and agent specs, and the node's jobs, as they were; the
daemon still serves.

Pushed specs and jobs run real programs, so argv is steered: either `sleep
1000` (runs until stopped, exits at once on SIGTERM; a job's is `sleep 0`)
or a program under a directory that does not exist (refused by validation),
never a fuzzed program name that PATH could resolve, and a job's script only
under an interpreter that cannot run it. A refused StartJob keeps no job.
start_secs stays small so an operation that waits for RUNNING answers
quickly.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio
from daemon_helpers import agent, short_tmp
from fuzz_support import FUZZ, call_checked, supervisor_state
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc import aio
from hypothesis import given
from hypothesis import strategies as st
from live_env import (
    SLEEP,
    ModulePki,
    channels,
    invoke,
    live_daemon,
    methods,
    node_name,
    rpc_name,
    serving,
)
from proto_strategies import requests, text

from daemon.server import DaemonServer
from fleet.v1 import common_pb2, daemon_pb2, jobs_pb2

AGENTS = ("sleeper", "other")

_argv = st.one_of(
    st.just([SLEEP, "1000"]),
    st.just([]),
    st.lists(text, max_size=3).map(lambda args: ["/nonexistent/fuzz-agent", *args]),
    text.map(lambda t: ["/nonexistent/" + t.replace("/", "_")]),
)
OVERRIDES: dict[str, st.SearchStrategy[Any]] = {
    **{
        f"{m.input_type.full_name}.agent_id": st.one_of(st.sampled_from(AGENTS), text)
        for m in methods("DaemonService")
        if "agent_id" in m.input_type.fields_by_name
    },
    "fleet.v1.ReadAgentLogRequest.follow": st.sampled_from([False, False, False, True]),
    # Stale, fresh (set in the test) or anything below the fresh ones.
    "fleet.v1.PushUpdateRequest.version": st.integers(0, 10**18),
    "fleet.v1.AgentSpec.id": st.one_of(st.sampled_from([*AGENTS, "new"]), text),
    "fleet.v1.AgentSpec.argv": _argv,
    "fleet.v1.AgentSpec.start_secs": st.one_of(
        st.floats(0, 0.1), st.sampled_from([-1.0, float("nan"), float("-inf")])
    ),
    "fleet.v1.AgentSpec.stop_signal": st.one_of(
        st.sampled_from(["", "SIGTERM", "TERM", "SIGINT", "KILL"]), text
    ),
    "fleet.v1.AgentSpec.cwd": st.one_of(st.just(""), st.just("/"), text),
    # Jobs run programs too: `sleep 0`, nothing, or a program that does not exist; a
    # script only under an interpreter that cannot run it (never a fuzzed shell script).
    "fleet.v1.JobCommand.argv": st.one_of(
        st.just([SLEEP, "0"]),
        st.just([]),
        st.lists(text, max_size=3).map(lambda args: ["/nonexistent/fuzz-job", *args]),
    ),
    "fleet.v1.JobCommand.interpreter": st.one_of(
        st.just([]), st.just([SLEEP]), st.just(["/nonexistent/fuzz-interpreter"])
    ),
    "fleet.v1.JobCommand.timeout_seconds": st.one_of(
        st.floats(0, 2), st.sampled_from([-1.0, float("nan"), float("inf"), 1e300])
    ),
    "fleet.v1.StartJobRequest.job_id": st.one_of(st.sampled_from(["fz-1", "fz-2"]), text),
    "fleet.v1.CancelJobRequest.job_id": st.one_of(st.sampled_from(["fz-1", "fz-2"]), text),
    "fleet.v1.ReadJobOutputRequest.job_id": st.one_of(st.sampled_from(["fz-1", "fz-2"]), text),
    "fleet.v1.ReadJobOutputRequest.follow": st.just(False),
}
"""Keep node-side effects bounded (see the module docstring); everything else is fuzzed."""


def valid(rpc: str) -> Message:
    """A request the manager gets OK for (agents "sleeper" and "other")."""
    specs = [
        common_pb2.AgentSpec(id=a, argv=[SLEEP, "1000"], start_secs=0.0, stop_timeout_seconds=2)
        for a in AGENTS
    ]
    d = daemon_pb2
    return {
        "DaemonService.ListAgents": d.ListAgentsRequest(),
        "DaemonService.OperateAgent": d.OperateAgentRequest(
            agent_id="sleeper", operation=common_pb2.AGENT_OPERATION_RESTART
        ),
        "DaemonService.GetAgentMetrics": d.GetAgentMetricsRequest(
            agent_id="sleeper", duration_seconds=10
        ),
        "DaemonService.PushUpdate": d.PushUpdateRequest(version=1, agents=specs),
        "DaemonService.ReadAgentLog": d.ReadAgentLogRequest(agent_id="sleeper"),
        "DaemonService.StartJob": d.StartJobRequest(
            job_id="fz-1",
            steps=[jobs_pb2.JobStep(command=jobs_pb2.JobCommand(argv=[SLEEP, "0"]))],
            timeout_seconds=5,
        ),
        "DaemonService.CancelJob": d.CancelJobRequest(job_id="fz-1"),
        "DaemonService.ReadJobOutput": d.ReadJobOutputRequest(job_id="fz-1"),
    }[rpc]


STRATEGIES = {
    rpc_name(m): requests(valid(rpc_name(m)), OVERRIDES) for m in methods("DaemonService")
}


@dataclass
class Env:
    """The live daemon and the manager's channel to it."""

    daemon: DaemonServer
    channel: aio.Channel


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(module_pki: ModulePki) -> AsyncIterator[Env]:
    """Node n1's daemon with two sleeping agents, and a manager certificate's channel."""
    specs = [agent(a, SLEEP, "1000", start_secs=0.0, stop_timeout=2.0) for a in AGENTS]
    with short_tmp() as root:
        async with (
            live_daemon(module_pki, root, "n1", specs) as daemon,
            channels(
                daemon.port,
                {"manager": module_pki.issue("manager", "m1")},
                node_name(module_pki, "n1"),
            ) as chans,
        ):
            yield Env(daemon, chans["manager"])


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("method", methods("DaemonService"), ids=rpc_name)
@FUZZ
@given(data=st.data())
async def test_fuzz_daemon_service(env: Env, method: MethodDescriptor, data: st.DataObject) -> None:
    """Any request: a proper status (never UNKNOWN/INTERNAL), and a refusal changes nothing."""
    request = data.draw(STRATEGIES[rpc_name(method)], label="request")
    if isinstance(request, daemon_pb2.PushUpdateRequest) and data.draw(st.booleans(), "fresh"):
        request.version = time.time_ns()  # newer than anything pushed so far
    before = supervisor_state(env.daemon)
    jobs_before = env.daemon.jobs.store.job_ids()
    outcome = await call_checked(env.channel, method, request)
    if outcome.code != grpc.StatusCode.OK:
        after = supervisor_state(env.daemon)
        assert after == before, f"refused with {outcome.code.name} but the agents changed"
        assert env.daemon.jobs.store.job_ids() == jobs_before, "refused, but a job was kept"
    elif isinstance(request, daemon_pb2.PushUpdateRequest):
        # Put the usual agents back, so the other RPCs keep finding them.
        restore = daemon_pb2.PushUpdateRequest()
        restore.CopyFrom(valid("DaemonService.PushUpdate"))
        restore.version = time.time_ns()
        back = await call_checked(env.channel, method, restore)
        assert back.code == grpc.StatusCode.OK, back


@pytest.mark.asyncio(loop_scope="module")
async def test_daemon_still_serves_after_fuzzing(env: Env) -> None:
    """After the fuzzers, health says SERVING and ListAgents answers."""
    assert await serving(env.channel, "fleet.v1.DaemonService")
    list_agents = {m.name: m for m in methods("DaemonService")}["ListAgents"]
    reply = await invoke(env.channel, list_agents, daemon_pb2.ListAgentsRequest())
    assert reply.code == grpc.StatusCode.OK, reply
