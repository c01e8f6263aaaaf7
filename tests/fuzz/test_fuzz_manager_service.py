"""Fuzz every ManagerService RPC against a live manager, speaking as node n1.

Properties: never UNKNOWN/INTERNAL; a refused call leaves the database as it
was (no node row, no sample of the batch, agent states intact); the manager
still serves afterwards.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from artifact_helpers import Grants, digest
from enroll_helpers import csr
from fuzz_support import FUZZ, call_checked, db_state
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc import aio
from hypothesis import given, settings
from hypothesis import strategies as st
from live_env import (
    TRUST_DOMAIN,
    ModulePki,
    channels,
    invoke,
    live_manager,
    manager_name,
    methods,
    registration,
    rpc_name,
    serving,
)
from proto_strategies import plausible_text, requests, text

from fleet.v1 import common_pb2, jobs_pb2, manager_pb2
from manager.server import SERVICE_NAME, ManagerServer
from manager.service.artifacts import Upload

NODE = "n1"
"""The node the fuzzer's certificate belongs to."""
STORED = b"an artifact node n1 is assigned"
"""Stored before fuzzing; DownloadArtifact reaches its offset checks and its bytes."""

_finite = st.floats(allow_nan=False, allow_infinity=False)
OVERRIDES = {
    # Speaking for another node is one check (see test_fuzz_speaking_for_another_node).
    **{f"fleet.v1.{m.input_type.name}.node_id": st.just(NODE) for m in methods("ManagerService")},
    "fleet.v1.RegisterNodeRequest.ip": st.one_of(
        st.sampled_from(["127.0.0.1", "::1", "10.1.2.3"]), text
    ),
    # Never dialed here: no FleetService call in this module reaches a daemon.
    "fleet.v1.RegisterNodeRequest.daemon_address": st.one_of(st.just("127.0.0.1:7444"), text),
    "fleet.v1.MetricData.type": st.one_of(st.sampled_from(["cpu", "memory", "disk"]), text),
    "fleet.v1.MetricData.values": st.one_of(
        st.dictionaries(plausible_text, _finite, min_size=1, max_size=4),
        st.dictionaries(text, st.floats(), max_size=4),
    ),
}
"""Steer node_id to the caller and some fields to valid values, so checks run deep."""


@dataclass
class Env:
    """The live manager and node n1's channel to it."""

    manager: ManagerServer
    channel: aio.Channel
    known: dict[str, Any] | None = None
    """The database as the last refused call left it (None: re-read it)."""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(
    module_pki: ModulePki, tmp_path_factory: pytest.TempPathFactory, manager_database: str
) -> AsyncIterator[Env]:
    """One manager per module and backend, with node n1 registered and assigned STORED."""
    root: Path = tmp_path_factory.mktemp("manager")
    grants = Grants({NODE: [digest(STORED)]})
    async with (
        live_manager(module_pki, root, manager_database, artifact_access=grants) as manager,
        channels(
            manager.port, {NODE: module_pki.issue("node", NODE)}, manager_name(module_pki)
        ) as chans,
    ):
        register = {m.name: m for m in methods("ManagerService")}["RegisterNode"]
        first = await invoke(chans[NODE], register, registration(NODE, "127.0.0.1:7444"))
        assert first.code == grpc.StatusCode.OK, first
        await manager.artifacts.push(
            Upload("fuzz", "1", digest(STORED), len(STORED)), _once(STORED), actor="operator/t"
        )
        yield Env(manager, chans[NODE])


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def valid(rpc: str) -> Message:
    """A request node n1 gets OK for, now."""
    now = int(time.time() * 1000)
    state = manager_pb2.AgentState(
        agent_id="web", status=common_pb2.AGENT_STATUS_RUNNING, pid=42, start_time=now
    )
    return {
        "ManagerService.RegisterNode": registration(NODE, "127.0.0.1:7444"),
        "ManagerService.Heartbeat": manager_pb2.HeartbeatRequest(node_id=NODE, timestamp=now),
        "ManagerService.ReportMetrics": manager_pb2.ReportMetricsRequest(
            node_id=NODE,
            sequence=now,
            metrics=[common_pb2.MetricData(type="cpu", timestamp=now, values={"usage": 0.5})],
        ),
        "ManagerService.SyncAgentStates": manager_pb2.SyncAgentStatesRequest(
            node_id=NODE, states=[state]
        ),
        "ManagerService.DownloadArtifact": manager_pb2.DownloadArtifactRequest(
            node_id=NODE, digest=digest(STORED), offset=1
        ),
        # No job runs here (a driver's writes would race the "refusals write nothing"
        # check): the fuzzed fields are validated before the job is looked up.
        "ManagerService.ReportJobStatus": manager_pb2.ReportJobStatusRequest(
            node_id=NODE, job_id="no-such-job", state=jobs_pb2.JOB_TARGET_STATE_RUNNING
        ),
        "ManagerService.UploadJobOutput": manager_pb2.UploadJobOutputRequest(
            node_id=NODE, job_id="no-such-job", offset=0, data=b"out"
        ),
        # A new key for the caller's own name (test_fuzz_enroll.py mutates CSRs too).
        "ManagerService.RenewCertificate": manager_pb2.RenewCertificateRequest(
            node_id=NODE, csr_pem=csr(NODE, TRUST_DOMAIN)[1]
        ),
    }[rpc]


@functools.cache
def strategy(rpc: str) -> st.SearchStrategy[Message]:
    """Built at first use, so the valid base's timestamps are the manager's now."""
    return requests(valid(rpc), OVERRIDES)


# Connect (a bidirectional stream of these requests) has its own fuzzer: test_fuzz_connect.py.
UNARY = [m for m in methods("ManagerService") if not m.client_streaming]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("method", UNARY, ids=rpc_name)
@FUZZ
@given(data=st.data())
async def test_fuzz_manager_service(
    env: Env, method: MethodDescriptor, data: st.DataObject
) -> None:
    """Any request: a proper status (never UNKNOWN/INTERNAL), and a refusal writes nothing."""
    request = data.draw(strategy(rpc_name(method)), label="request")
    before = env.known or await db_state(env.manager.db)
    env.known = None
    outcome = await call_checked(env.channel, method, request)
    if outcome.code != grpc.StatusCode.OK:
        after = await db_state(env.manager.db)
        assert after == before, f"refused with {outcome.code.name} but the database changed"
        env.known = after  # only an accepted call changes it


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("method", UNARY, ids=rpc_name)
@settings(FUZZ, max_examples=max(10, FUZZ.max_examples // 6))
@given(data=st.data())
async def test_fuzz_speaking_for_another_node(
    env: Env, method: MethodDescriptor, data: st.DataObject
) -> None:
    """Any request naming another node is PERMISSION_DENIED and writes nothing."""
    request = data.draw(strategy(rpc_name(method)), label="request")
    other = data.draw(text.filter(lambda t: t != NODE), label="node_id")
    request.node_id = other  # type: ignore[attr-defined]  # every ManagerService request has it
    before = env.known or await db_state(env.manager.db)
    outcome = await call_checked(env.channel, method, request)
    assert outcome.code == grpc.StatusCode.PERMISSION_DENIED, outcome
    assert await db_state(env.manager.db) == before
    env.known = before


@pytest.mark.asyncio(loop_scope="module")
async def test_manager_still_serves_after_fuzzing(env: Env) -> None:
    """After the fuzzers, health says SERVING and n1 can still register."""
    assert await serving(env.channel, SERVICE_NAME)
    register = {m.name: m for m in methods("ManagerService")}["RegisterNode"]
    again = await invoke(env.channel, register, registration(NODE, "127.0.0.1:7444"))
    assert again.code == grpc.StatusCode.OK, again
