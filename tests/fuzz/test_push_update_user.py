"""A pushed spec whose user contains a NUL is INVALID_ARGUMENT (found by the daemon fuzzer soak).

`daemon/supervisor/spec.py` looks the user up with `pwd.getpwnam`, catching
KeyError for an unknown user; a NUL makes it raise ValueError ("embedded
null byte") instead, and the manager's PushUpdate gets INTERNAL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from daemon_helpers import agent, short_tmp
from fuzz_support import supervisor_state
from grpc import aio
from live_env import SERVICES, SLEEP, ModulePki, channels, invoke, live_daemon, node_name

from daemon.server import DaemonServer
from fleet.v1 import common_pb2, daemon_pb2

PUSH = SERVICES["DaemonService"].methods_by_name["PushUpdate"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def daemon(module_pki: ModulePki) -> AsyncIterator[tuple[DaemonServer, aio.Channel]]:
    """Node n1's daemon with one agent, and the manager's channel to it."""
    with short_tmp() as root:
        async with (
            live_daemon(module_pki, root, "n1", [agent("sleeper", SLEEP, "1000")]) as server,
            channels(
                server.port,
                {"manager": module_pki.issue("manager", "m1")},
                node_name(module_pki, "n1"),
            ) as chans,
        ):
            yield server, chans["manager"]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("user", ["\x00", "root\x00x"])
async def test_push_with_a_nul_in_user_is_invalid_argument(
    daemon: tuple[DaemonServer, aio.Channel], user: str
) -> None:
    """The push is refused naming the user field, and the agents are unchanged."""
    server, channel = daemon
    before = supervisor_state(server)
    spec = common_pb2.AgentSpec(id="sleeper", argv=[SLEEP, "1000"], user=user, autostart=True)
    outcome = await invoke(channel, PUSH, daemon_pb2.PushUpdateRequest(version=7, agents=[spec]))
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert "user" in outcome.details, outcome
    assert supervisor_state(server) == before
