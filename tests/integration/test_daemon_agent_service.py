"""AgentService over the real agent socket, called by real processes (SO_PEERCRED identity)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import agent, client_channel, daemon_config, eventually, short_tmp

from daemon.server import DaemonServer
from fleet.agentspec import spec_to_proto
from fleet.v1 import common_pb2, daemon_pb2, daemon_pb2_grpc

REPO = Path(__file__).resolve().parents[2]

# A stand-in for the SDK (issue 5): raw fleet.v1 stubs over FLEET_DAEMON_SOCKET.
# It prints one JSON line per step so the test can read what happened.
AGENT_SCRIPT = r"""
import json, os, sys, time, grpc
from fleet.v1 import agent_pb2, agent_pb2_grpc, common_pb2

def out(**kw):
    print(json.dumps(kw), flush=True)

me = os.environ["FLEET_AGENT_ID"]
mode = sys.argv[1]
channel = grpc.insecure_channel("unix:" + os.environ["FLEET_DAEMON_SOCKET"])
stub = agent_pb2_grpc.AgentServiceStub(channel)

def call(name, fn, *a):
    try:
        r = fn(*a, timeout=10)
        out(step=name, ok=True, reply=str(r).replace("\n", " "))
        return r
    except grpc.RpcError as e:
        out(step=name, ok=False, code=e.code().name, details=e.details())

A = agent_pb2
if mode == "child":  # a grandchild of the agent speaks for it too
    call("child-heartbeat", stub.Heartbeat, A.AgentServiceHeartbeatRequest(agent_id=me))
    sys.exit(0)
req = A.AgentServiceRegisterRequest(agent_id=me, version="9.9", pid=os.getpid())
r = call("register", stub.Register, req)
if r is not None:
    out(step="config", payload=r.config.payload.decode(), version=r.config.version,
        sha=r.config.sha256, interval=r.heartbeat_interval_ms, stop=r.stop_timeout_ms)
call("heartbeat", stub.Heartbeat, A.AgentServiceHeartbeatRequest(agent_id=me))
g = call("getconfig", stub.GetConfig, A.AgentServiceGetConfigRequest(agent_id=me))
if g is not None:
    out(step="getconfig-payload", payload=g.config.payload.decode(), version=g.config.version)
call("impersonate", stub.Heartbeat, A.AgentServiceHeartbeatRequest(agent_id="other"))
now = int(time.time() * 1000)
good = common_pb2.MetricData(type="jobs_done", timestamp=now, values={"count": 3.0})
bad = common_pb2.MetricData(type="Bad Name", timestamp=1, values={"v": 1.0})
report = A.AgentServiceReportMetricsRequest
call("metrics", stub.ReportMetrics, report(agent_id=me, metrics=[good]))
call("bad-metrics", stub.ReportMetrics, report(agent_id=me, metrics=[bad]))
import subprocess
subprocess.run([sys.executable, sys.argv[0], "child"], check=True)
out(step="watching")
watch = A.AgentServiceWatchConfigRequest(agent_id=me, after_version=r.config.version)
for w in stub.WatchConfig(watch):
    out(step="watch", payload=w.config.payload.decode(), version=w.config.version)
    break
time.sleep(1000)
"""


def _steps(log: bytes) -> dict[str, dict[str, Any]]:
    steps: dict[str, dict[str, Any]] = {}
    for line in log.decode(errors="replace").splitlines():
        if line.startswith("{"):
            item = json.loads(line)
            steps[item["step"]] = item
    return steps


@pytest.fixture
async def daemon_with_sdk_agent(pki: Any) -> AsyncIterator[tuple[DaemonServer, Any]]:
    """A daemon supervising one agent that talks AgentService, plus a manager client stub."""
    with short_tmp() as root:
        script = root / "agent.py"
        script.write_text(AGENT_SCRIPT)
        env = {"PYTHONPATH": str(REPO)}
        cfg = daemon_config(
            root,
            pki.issue("node", "n1"),
            (
                agent("sdk", sys.executable, str(script), "main", env=env, config='{"a": 1}'),
                agent("other", "sleep", "1000"),
            ),
            stop_agents_on_exit=True,
        )
        server = DaemonServer(cfg)
        await server.start()
        channel = client_channel(pki.issue("manager", "m"), server.port, "n1", pki.trust_domain)
        try:
            yield server, daemon_pb2_grpc.DaemonServiceStub(channel)
        finally:
            await channel.close()
            await server.stop(1.0)


async def test_supervised_agent_registers_and_is_confined_to_itself(
    daemon_with_sdk_agent: tuple[DaemonServer, Any],
) -> None:
    """A supervised process registers, heartbeats, reports metrics, and cannot speak for another."""
    server, _ = daemon_with_sdk_agent

    async def steps() -> dict[str, dict[str, Any]]:
        return _steps(server.supervisor.read_log("sdk", 0, 1 << 20).data)

    got = await eventually(steps, lambda s: "watching" in s, within=30)
    assert got["register"]["ok"], got["register"]
    assert got["config"]["payload"] == '{"a": 1}'
    assert got["config"]["interval"] == 5000
    assert got["config"]["stop"] == 2000
    assert len(got["config"]["sha"]) == 64
    assert got["heartbeat"]["ok"]
    assert got["getconfig-payload"]["payload"] == '{"a": 1}'
    assert got["getconfig-payload"]["version"] == got["config"]["version"]
    assert got["impersonate"]["code"] == "PERMISSION_DENIED"
    assert "may not speak for agent other" in got["impersonate"]["details"]
    assert got["metrics"]["ok"]
    assert got["bad-metrics"]["code"] == "INVALID_ARGUMENT"
    assert "metrics[0].type" in got["bad-metrics"]["details"]
    assert got["child-heartbeat"]["ok"], "a descendant of the agent is part of the agent"
    snap = server.supervisor.get("sdk")
    assert snap.version == "9.9"
    assert snap.last_heartbeat_ms > 0
    # The custom metric waits in the manager link, tagged with the agent's id.
    pending = [m for m in server.link._custom if m.type == "jobs_done"]
    assert [(m.agent_id, dict(m.values)) for m in pending] == [("sdk", {"count": 3.0})]


async def test_watch_config_delivers_a_pushed_config_without_restart(
    daemon_with_sdk_agent: tuple[DaemonServer, Any],
) -> None:
    """A config-only PushUpdate reaches a pushed agent's WatchConfig stream; same pid."""
    server, stub = daemon_with_sdk_agent

    async def steps() -> dict[str, dict[str, Any]]:
        return _steps(server.supervisor.read_log("pushed", 0, 1 << 20).data)

    pushed = spec_to_proto(dataclasses.replace(server.supervisor.spec("sdk"), id="pushed"))
    await stub.PushUpdate(daemon_pb2.PushUpdateRequest(version=2, agents=[pushed]))
    await eventually(steps, lambda s: "watching" in s, within=30)
    pid = server.supervisor.get("pushed").pid
    pushed.config = b'{"a": 2}'
    reply = await stub.PushUpdate(daemon_pb2.PushUpdateRequest(version=3, agents=[pushed]))
    assert list(reply.reconfigured) == ["pushed"]
    got = await eventually(steps, lambda s: "watch" in s, within=15)
    assert got["watch"]["payload"] == '{"a": 2}'
    assert got["watch"]["version"] > got["config"]["version"]
    assert server.supervisor.get("pushed").pid == pid


UNSUPERVISED = r"""
import os, sys, grpc
from fleet.v1 import agent_pb2, agent_pb2_grpc
ch = grpc.insecure_channel("unix:" + sys.argv[1])
try:
    agent_pb2_grpc.AgentServiceStub(ch).Register(
        agent_pb2.AgentServiceRegisterRequest(agent_id="other", pid=os.getpid()), timeout=10)
    print("ACCEPTED")
except grpc.RpcError as e:
    print(e.code().name, e.details())
"""


async def test_an_unsupervised_process_is_refused(
    daemon_with_sdk_agent: tuple[DaemonServer, Any],
) -> None:
    """A process the daemon does not supervise gets PERMISSION_DENIED, even naming a real agent."""
    server, _ = daemon_with_sdk_agent
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        UNSUPERVISED,
        str(server.socket_path),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    text = out.decode()
    assert text.startswith("PERMISSION_DENIED"), text
    assert f"process {proc.pid} is not an agent supervised by this daemon" in text
    assert server.supervisor.get("other").last_heartbeat_ms == 0


async def test_agent_socket_mode_is_0660(daemon_with_sdk_agent: tuple[DaemonServer, Any]) -> None:
    """The agent socket in run_dir has mode 0660 and the raw gRPC socket is in a 0700 dir."""
    server, _ = daemon_with_sdk_agent
    assert server.socket_path.stat().st_mode & 0o777 == 0o660
    assert server.proxy.upstream_path.parent.stat().st_mode & 0o777 == 0o700
    assert common_pb2  # the generated module is importable for agents too
