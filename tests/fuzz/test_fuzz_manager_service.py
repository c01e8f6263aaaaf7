"""Fuzz every ManagerService RPC against a live manager, speaking as node n1.

Properties: never UNKNOWN/INTERNAL; a refused call leaves the database as it
was (no node row, no sample of the batch, agent states intact); the manager
still serves afterwards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from fuzz_support import FUZZ, call_checked, db_state
from google.protobuf.descriptor import MethodDescriptor
from grpc import aio
from hypothesis import given
from hypothesis import strategies as st
from live_env import (
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
from proto_strategies import message, mostly, plausible_text, text

from manager.server import SERVICE_NAME, ManagerServer

NODE = "n1"
"""The node the fuzzer's certificate belongs to."""

_finite = st.floats(allow_nan=False, allow_infinity=False)
OVERRIDES = {
    **{
        f"fleet.v1.{m.input_type.name}.node_id": mostly(NODE, text)
        for m in methods("ManagerService")
    },
    "fleet.v1.RegisterNodeRequest.ip": st.one_of(
        st.sampled_from(["127.0.0.1", "::1", "10.1.2.3"]), text
    ),
    "fleet.v1.RegisterNodeRequest.hostname": st.one_of(st.just("n1.example.com"), text),
    "fleet.v1.RegisterNodeRequest.os": st.one_of(st.just("linux"), text),
    "fleet.v1.RegisterNodeRequest.arch": st.one_of(st.just("x86_64"), text),
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
    module_pki: ModulePki, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Env]:
    """One manager for the module, with node n1 registered."""
    root: Path = tmp_path_factory.mktemp("manager")
    async with (
        live_manager(module_pki, root) as manager,
        channels(
            manager.port, {NODE: module_pki.issue("node", NODE)}, manager_name(module_pki)
        ) as chans,
    ):
        register = {m.name: m for m in methods("ManagerService")}["RegisterNode"]
        first = await invoke(chans[NODE], register, registration(NODE, "127.0.0.1:7444"))
        assert first.code == grpc.StatusCode.OK, first
        yield Env(manager, chans[NODE])


STRATEGIES = {rpc_name(m): message(m.input_type, OVERRIDES) for m in methods("ManagerService")}


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("method", methods("ManagerService"), ids=rpc_name)
@FUZZ
@given(data=st.data())
async def test_fuzz_manager_service(
    env: Env, method: MethodDescriptor, data: st.DataObject
) -> None:
    """Any request: a proper status (never UNKNOWN/INTERNAL), and a refusal writes nothing."""
    request = data.draw(STRATEGIES[rpc_name(method)], label="request")
    before = env.known or await db_state(env.manager.db)
    env.known = None
    outcome = await call_checked(env.channel, method, request)
    if outcome.code != grpc.StatusCode.OK:
        after = await db_state(env.manager.db)
        assert after == before, f"refused with {outcome.code.name} but the database changed"
        env.known = after  # only an accepted call changes it


@pytest.mark.asyncio(loop_scope="module")
async def test_manager_still_serves_after_fuzzing(env: Env) -> None:
    """After the fuzzers, health says SERVING and n1 can still register."""
    assert await serving(env.channel, SERVICE_NAME)
    register = {m.name: m for m in methods("ManagerService")}["RegisterNode"]
    again = await invoke(env.channel, register, registration(NODE, "127.0.0.1:7444"))
    assert again.code == grpc.StatusCode.OK, again
