"""Pushed specs with extreme (but accepted) durations must not break the daemon's answers.

Validation accepts any duration >= 0, including infinity and values whose
milliseconds do not fit an int64. Whatever it accepts, ListAgents and the
agent's own Register must still answer: a spec the daemon cannot serve must
be refused at PushUpdate (INVALID_ARGUMENT), not break later calls with
UNKNOWN/INTERNAL.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from daemon_helpers import agent, short_tmp
from grpc import aio
from live_env import SERVICES, SLEEP, ModulePki, channels, invoke, live_daemon, node_name

from daemon.server import DaemonServer
from fleet.v1 import agent_pb2, common_pb2, daemon_pb2

pytestmark = pytest.mark.asyncio(loop_scope="module")

FALSE = shutil.which("false") or "/bin/false"
PUSH = SERVICES["DaemonService"].methods_by_name["PushUpdate"]
LIST = SERVICES["DaemonService"].methods_by_name["ListAgents"]
OK_OR_REFUSED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}

# The agent calls Register on the agent socket and prints the status code.
REGISTER = r"""
import json, os, sys, time, grpc, base64
ch = grpc.insecure_channel("unix:" + os.environ["FLEET_DAEMON_SOCKET"])
req = base64.b64decode(sys.argv[1])
try:
    ch.unary_unary("/fleet.v1.AgentService/Register")(req, timeout=10)
    print(json.dumps({"code": "OK"}), flush=True)
except grpc.RpcError as e:
    print(json.dumps({"code": e.code().name, "details": e.details()}), flush=True)
time.sleep(1000)
"""


@dataclass(frozen=True)
class Env:
    """Node n1's daemon, the manager's channel to it, and a scratch directory."""

    daemon: DaemonServer
    channel: aio.Channel
    root: Path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(module_pki: ModulePki) -> AsyncIterator[Env]:
    """A daemon with one sleeping agent."""
    with short_tmp() as root:
        async with (
            live_daemon(module_pki, root / "d", "n1", [agent("sleeper", SLEEP, "1000")]) as daemon,
            channels(
                daemon.port,
                {"manager": module_pki.issue("manager", "m1")},
                node_name(module_pki, "n1"),
            ) as chans,
        ):
            yield Env(daemon, chans["manager"], root)


_version = iter(range(100, 10_000))


async def push(env: Env, *specs: common_pb2.AgentSpec) -> grpc.StatusCode:
    """Push `specs` as the next version; the code the daemon answered."""
    request = daemon_pb2.PushUpdateRequest(version=next(_version), agents=specs)
    outcome = await invoke(env.channel, PUSH, request)
    assert outcome.code in OK_OR_REFUSED, outcome
    return outcome.code


@pytest.mark.parametrize("delay", [float("inf"), 1e300], ids=["inf", "1e300"])
async def test_list_agents_answers_for_an_agent_backing_off_forever(env: Env, delay: float) -> None:
    """An agent in BACKOFF with a huge accepted backoff does not make ListAgents fail."""
    spec = common_pb2.AgentSpec(
        id="crasher",
        argv=[FALSE],
        max_retries=5,
        autostart=True,
        restart=common_pb2.RESTART_POLICY_ALWAYS,
        start_secs=1.0,
        backoff=common_pb2.Backoff(initial_seconds=delay, multiplier=1.0, max_seconds=delay),
    )
    if await push(env, spec) == grpc.StatusCode.INVALID_ARGUMENT:
        return  # refusing it up front is a fine answer
    for _ in range(50):  # wait for the first early exit
        await asyncio.sleep(0.1)
        listed = await invoke(env.channel, LIST, daemon_pb2.ListAgentsRequest())
        assert listed.code == grpc.StatusCode.OK, listed
        if env.daemon.supervisor.list()[0].status.name == "BACKOFF":
            break
    else:
        raise AssertionError(f"never backed off: {env.daemon.supervisor.list()}")


@pytest.mark.parametrize("stop_timeout", [float("inf"), 1e300], ids=["inf", "1e300"])
async def test_agent_register_answers_with_a_huge_stop_timeout(
    env: Env, stop_timeout: float
) -> None:
    """An agent whose accepted spec has a huge stop timeout can still Register."""
    script = env.root / "register.py"
    script.write_text(REGISTER)
    request = agent_pb2.AgentServiceRegisterRequest(agent_id="sdk")
    encoded = base64.b64encode(request.SerializeToString()).decode()
    spec = common_pb2.AgentSpec(
        id="sdk",
        argv=[sys.executable, str(script), encoded],
        autostart=True,
        start_secs=0.0,
        stop_timeout_seconds=stop_timeout,
        stop_signal="SIGKILL",
    )
    if await push(env, spec) == grpc.StatusCode.INVALID_ARGUMENT:
        return  # refusing it up front is a fine answer
    for _ in range(300):
        await asyncio.sleep(0.1)
        log = env.daemon.supervisor.read_log("sdk", 0, 1 << 16).data.decode(errors="replace")
        lines = [json.loads(x) for x in log.splitlines() if x.startswith("{")]
        if lines:
            assert lines[0]["code"] == "OK", lines[0]
            return
    snap = env.daemon.supervisor.get("sdk")
    raise AssertionError(f"the agent printed nothing within 30 s: {snap} log={log[-500:]!r}")
