"""Oversized requests are refused by gRPC's receive limit before any handler, and write nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio
from daemon_helpers import agent, short_tmp
from fuzz_support import NEVER, db_state, supervisor_state
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc import aio
from live_env import (
    SERVICES,
    SLEEP,
    ModulePki,
    Outcome,
    channels,
    invoke,
    live_daemon,
    live_manager,
    manager_name,
    methods,
    node_name,
    registration,
    requests,
    rpc_name,
)

from daemon.server import DaemonServer
from fleet.v1 import common_pb2, daemon_pb2, fleet_pb2, manager_pb2
from manager.server import ManagerServer

pytestmark = pytest.mark.asyncio(loop_scope="module")

LIMIT = 4 * 1024 * 1024
"""The receive limit of both servers (manager: server.max_receive_message_bytes default)."""
HUGE = "x" * (LIMIT + 1024)
BIG = "x" * (LIMIT // 2)
"""Under the limit: reaches the handler, whose validation refuses it."""
NOW = 1_700_000_000_000


@dataclass(frozen=True)
class Env:
    """A manager (n1 registered), n1's daemon, and channels as n1, operator and manager."""

    manager: ManagerServer
    daemon: DaemonServer
    chans: dict[str, aio.Channel]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(module_pki: ModulePki) -> AsyncIterator[Env]:
    """The servers and channels of this module."""
    pki = module_pki
    with short_tmp() as root:
        async with (
            live_manager(pki, root) as manager,
            live_daemon(pki, root / "d", "n1", [agent("sleeper", SLEEP, "1000")]) as daemon,
            channels(
                manager.port,
                {"n1": pki.issue("node", "n1"), "operator": pki.issue("operator", "alice")},
                manager_name(pki),
            ) as to_manager,
            channels(
                daemon.port, {"manager": pki.issue("manager", "m1")}, node_name(pki, "n1")
            ) as to_daemon,
        ):
            chans = {**to_manager, **to_daemon}
            register = SERVICES["ManagerService"].methods_by_name["RegisterNode"]
            reply = await invoke(chans["n1"], register, registration("n1", "127.0.0.1:7444"))
            assert reply.code == grpc.StatusCode.OK, reply
            yield Env(manager, daemon, chans)


MANAGER_CASES = {
    "RegisterNode": lambda s: manager_pb2.RegisterNodeRequest(
        node_id="n1", hostname=s, ip="127.0.0.1", os="linux", arch="x"
    ),
    "ReportMetrics": lambda s: manager_pb2.ReportMetricsRequest(
        node_id="n1",
        sequence=7,
        metrics=[common_pb2.MetricData(type="cpu", timestamp=NOW, values={s: 1.0})],
    ),
    "SyncAgentStates": lambda s: manager_pb2.SyncAgentStatesRequest(
        node_id="n1", states=[manager_pb2.AgentState(agent_id="a", message=s)]
    ),
}


@pytest.mark.parametrize("rpc", sorted(MANAGER_CASES))
async def test_oversized_manager_request_is_resource_exhausted(env: Env, rpc: str) -> None:
    """Past 4 MiB: RESOURCE_EXHAUSTED and nothing written; under it, the handler refuses it."""
    method = SERVICES["ManagerService"].methods_by_name[rpc]
    before = await db_state(env.manager.db)
    huge = await invoke(env.chans["n1"], method, MANAGER_CASES[rpc](HUGE))
    assert huge.code == grpc.StatusCode.RESOURCE_EXHAUSTED, huge
    big = await invoke(env.chans["n1"], method, MANAGER_CASES[rpc](BIG))
    assert big.code == grpc.StatusCode.INVALID_ARGUMENT, big
    assert await db_state(env.manager.db) == before


async def test_oversized_operator_request_is_resource_exhausted(env: Env) -> None:
    """An operator's 4 MiB label update is refused by size and changes no node."""
    method = SERVICES["FleetService"].methods_by_name["UpdateNodeLabels"]
    before = await db_state(env.manager.db)
    request = fleet_pb2.FleetServiceUpdateNodeLabelsRequest(node_id="n1", set={"big": HUGE})
    outcome = await invoke(env.chans["operator"], method, request)
    assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
    assert await db_state(env.manager.db) == before


async def test_oversized_push_is_resource_exhausted(env: Env) -> None:
    """A PushUpdate past 4 MiB is refused by size and the daemon's agents are unchanged."""
    method = SERVICES["DaemonService"].methods_by_name["PushUpdate"]
    before = supervisor_state(env.daemon)
    spec = common_pb2.AgentSpec(id="sleeper", argv=[SLEEP, "1000"], config=HUGE.encode())
    request = daemon_pb2.PushUpdateRequest(version=10, agents=[spec])
    outcome = await invoke(env.chans["manager"], method, request)
    assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
    assert supervisor_state(env.daemon) == before


CALLER = {"ManagerService": "n1", "FleetService": "operator", "DaemonService": "manager"}
TCP_RPCS = [m for service in CALLER for m in methods(service)]


def with_unknown_field(request: Message, size: int) -> bytes:
    """`request` serialised plus an unknown length-delimited field (number 1000) of `size` bytes."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)

    return request.SerializeToString() + varint(1000 << 3 | 2) + varint(size) + b"\0" * size


async def call_raw(channel: aio.Channel, method: MethodDescriptor, payload: bytes) -> Outcome:
    """Send pre-serialised bytes to `method`; read a stream until it ends or idles."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.client_streaming:  # PushArtifact: a stream of this one message
            await channel.stream_unary(path)(iter([payload]), timeout=15)
            return Outcome(grpc.StatusCode.OK, "")
        if not method.server_streaming:
            await channel.unary_unary(path)(payload, timeout=15)
            return Outcome(grpc.StatusCode.OK, "")
        call = channel.unary_stream(path)(payload, timeout=15)
        try:
            # 4 MiB through TLS takes a while on a busy machine: wait for the verdict.
            while await asyncio.wait_for(call.read(), 5.0) is not aio.EOF:
                pass
        except TimeoutError:
            call.cancel()
            return Outcome(grpc.StatusCode.OK, "")
        return Outcome(await call.code(), await call.details() or "")
    except aio.AioRpcError as exc:
        return Outcome(exc.code(), exc.details() or "")


@pytest.mark.parametrize("method", TCP_RPCS, ids=rpc_name)
async def test_every_rpc_refuses_an_oversized_request_and_ignores_unknown_fields(
    env: Env, method: MethodDescriptor
) -> None:
    """Past 4 MiB (an unknown field): RESOURCE_EXHAUSTED, no write; a small one is ignored."""
    service = method.containing_service.name
    channel = env.chans[CALLER[service]]
    request = requests(env.daemon.port, node="n1")[rpc_name(method)]
    before = (await db_state(env.manager.db), supervisor_state(env.daemon))

    huge = await call_raw(channel, method, with_unknown_field(request, LIMIT + 1024))
    assert huge.code == grpc.StatusCode.RESOURCE_EXHAUSTED, huge
    assert (await db_state(env.manager.db), supervisor_state(env.daemon)) == before

    small = await call_raw(channel, method, with_unknown_field(request, 1024))
    assert small.code not in NEVER | {grpc.StatusCode.RESOURCE_EXHAUSTED}, small
