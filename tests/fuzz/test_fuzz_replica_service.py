"""Fuzz ReplicaService (Relay, RelayStream) as a peer replica would call it.

A live manager holds node n1's control stream (a simulated daemon written
from the protocol, bench/connect_sim.py). A `manager/*` caller sends any
RelayRequest: a known or unknown node, method and replica, a valid request
of the method or arbitrary bytes. Properties: never UNKNOWN/INTERNAL, always
answered (a follow may stay open: that is OK), and n1's stream survives
every example and still runs a relayed ListAgents.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from fuzz_support import FUZZ, call_checked
from grpc import aio
from hypothesis import given
from hypothesis import strategies as st
from live_env import SERVICES, ModulePki, live_manager, manager_name, open_channel
from proto_strategies import text

from bench.connect_sim import ConnectNode
from fleet.control import METHODS
from fleet.v1 import daemon_pb2, replica_pb2
from manager.server import ManagerServer

NODE = "n1"
RELAY = SERVICES["ReplicaService"].methods_by_name["Relay"]
RELAY_STREAM = SERVICES["ReplicaService"].methods_by_name["RelayStream"]
VALID: dict[str, bytes] = {
    "ListAgents": daemon_pb2.ListAgentsRequest().SerializeToString(),
    "OperateAgent": daemon_pb2.OperateAgentRequest(agent_id="web", operation=1).SerializeToString(),
    "GetAgentMetrics": daemon_pb2.GetAgentMetricsRequest(agent_id="web").SerializeToString(),
    "ReadAgentLog": daemon_pb2.ReadAgentLogRequest(agent_id="web").SerializeToString(),
}


@dataclass
class Env:
    """The manager, n1 streaming to it, and a peer replica's channel."""

    manager: ManagerServer
    node: ConnectNode
    peer: aio.Channel


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(
    module_pki: ModulePki, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Env]:
    root: Path = tmp_path_factory.mktemp("manager")
    async with live_manager(module_pki, root) as manager:
        node = ConnectNode(
            NODE,
            module_pki.issue("node", NODE),
            module_pki.trust_domain,
            (f"127.0.0.1:{manager.port}",),
        )
        node.start()
        await node.connected.wait()
        peer = open_channel(
            manager.port, module_pki.issue("manager", "m2"), manager_name(module_pki)
        )
        try:
            yield Env(manager, node, peer)
        finally:
            await peer.close(None)
            await node.stop()


def relay_fields() -> st.SearchStrategy[dict[str, object]]:
    """A well-formed call for n1 with one or two fields fuzzed, or anything at all."""
    anything = st.fixed_dictionaries(
        {
            "node_id": st.one_of(st.just(NODE), st.just("n2"), text),
            "method": st.one_of(st.sampled_from(sorted(METHODS)), text),
            "replica_id": st.one_of(st.just(""), st.just("m1"), text),
            "request": st.one_of(st.sampled_from(sorted(VALID.values())), st.binary(max_size=64)),
        }
    )
    well_formed = st.builds(
        lambda method, replica, garbage: {
            "node_id": NODE,
            "method": method,
            "replica_id": replica,
            "request": VALID[method] + garbage,  # appended bytes: unknown fields or junk
        },
        st.sampled_from(sorted(VALID)),
        st.sampled_from(["", "m1", "m9"]),
        st.sampled_from([b"", b"", b"\x00", b"\xff\xff"]),
    )
    return st.one_of(well_formed, anything)


@pytest.mark.asyncio(loop_scope="module")
@FUZZ
@given(fields=relay_fields(), wrong_kind=st.sampled_from([False, False, False, True]))
async def test_fuzz_relay_requests(env: Env, fields: dict[str, object], wrong_kind: bool) -> None:
    """Any relay request from a peer replica: a proper status, and n1's stream survives."""
    known = METHODS.get(str(fields["method"]))
    streaming = (known is not None and known.server_streaming) != wrong_kind
    if streaming:
        await call_checked(env.peer, RELAY_STREAM, replica_pb2.RelayStreamRequest(**fields))
    else:
        await call_checked(env.peer, RELAY, replica_pb2.RelayRequest(**fields))
    assert env.manager.control_streams.get(NODE) is not None, "n1's stream was ended"
    ok = await call_checked(
        env.peer,
        RELAY,
        replica_pb2.RelayRequest(node_id=NODE, method="ListAgents", request=VALID["ListAgents"]),
    )
    assert ok.code.name == "OK", ok
