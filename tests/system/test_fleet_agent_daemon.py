"""`fleet-agent run probe` supervised by a real `fleet-daemon` process (issue 5 acceptance).

Registration shows in ListAgents, a config-only PushUpdate reaches the running
agent without a restart, a daemon kill -9 + restart makes the same agent
process register again, and a process the daemon does not supervise is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import pytest
from daemon_helpers import client_channel, eventually, short_tmp

from daemon.config import load_daemon_config
from fleet.agentspec import spec_to_proto
from fleet.tls import TLSConfig
from fleet.v1 import common_pb2, daemon_pb2, daemon_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
DAEMON = [sys.executable, "-m", "daemon.cli"]
HEALTHY = common_pb2.AGENT_HEALTH_HEALTHY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml(root: Path, tls: TLSConfig, port: int, target_port: int) -> str:
    probe_config = json.dumps(
        {
            "targets": [{"name": "db", "url": f"tcp://127.0.0.1:{target_port}"}],
            "interval_seconds": 0.3,
        }
    )
    return f"""
listen = "127.0.0.1:{port}"
state_dir = "{root}/state"
run_dir = "{root}/run"
log_dir = "{root}/log"
metrics_listen = ""
sample_interval_seconds = 0.5
agent_heartbeat_interval_seconds = 0.5
stop_agents_on_exit = true
[tls]
ca_file = "{tls.ca_file}"
cert_file = "{tls.cert_file}"
key_file = "{tls.key_file}"
[manager]
addresses = ["127.0.0.1:1"]

[[agents]]
id = "probe"
argv = ["{sys.executable}", "-m", "agent_runtime.cli", "run", "probe"]
env = {{ PYTHONPATH = "{REPO}" }}
start_secs = 0.2
stop_timeout = 5.0
health = {{ kind = "heartbeat", timeout = 3.0 }}
config = '{probe_config}'

[[agents]]
id = "plain"
argv = ["sleep", "1077"]
start_secs = 0.2
stop_timeout = 2.0
"""


@dataclass
class Daemon:
    """A fleet-daemon process on a config file; restartable."""

    root: Path
    config: Path
    port: int
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("NOTIFY_SOCKET", None)
        with open(self.root / "daemon.err", "ab") as err:
            self.popen = subprocess.Popen(
                [*DAEMON, "--config", str(self.config)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def kill9(self) -> None:
        assert self.popen is not None
        self.popen.kill()
        self.popen.wait(30)

    @property
    def socket_path(self) -> Path:
        return self.root / "run" / "agent.sock"

    def agent_log(self, agent_id: str) -> str:
        path = self.root / "log" / f"{agent_id}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
async def target_port() -> AsyncIterator[int]:
    """A TCP listener on 127.0.0.1 for the probe to measure."""

    async def handle(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


@pytest.fixture
def daemon(pki: Any, target_port: int) -> Iterator[Daemon]:
    """A configured fleet-daemon (not started); it and its agents are gone afterwards."""
    with short_tmp() as root:
        tls = pki.issue("node", "n1")
        d = Daemon(root, root / "daemon.toml", _free_port())
        d.config.write_text(_toml(root, tls, d.port, target_port))
        agent_pids: set[int] = set()
        try:
            yield d
        finally:
            if d.popen is not None and d.popen.poll() is None:
                d.popen.send_signal(signal.SIGTERM)  # stop_agents_on_exit
                try:
                    d.popen.wait(30)
                except subprocess.TimeoutExpired:
                    d.popen.kill()
                    d.popen.wait()
            # After a kill -9 the agents outlive the daemon on purpose: find ours by their env.
            for p in psutil.process_iter(["cmdline", "environ"]):
                cmd = p.info["cmdline"] or []
                env = p.info["environ"] or {}
                if env.get("FLEET_DAEMON_SOCKET") == str(d.socket_path) or cmd == [
                    "sleep",
                    "1077",
                ]:
                    agent_pids.add(p.pid)
            for pid in agent_pids:
                with contextlib.suppress(psutil.Error):
                    psutil.Process(pid).kill()


@pytest.fixture
async def stub(pki: Any, daemon: Daemon) -> AsyncIterator[daemon_pb2_grpc.DaemonServiceStub]:
    """A manager/m client of the daemon under test."""
    tls = pki.issue("manager", "m")
    async with client_channel(tls, daemon.port, "n1", pki.trust_domain) as channel:
        yield daemon_pb2_grpc.DaemonServiceStub(channel)


async def _probe_info(
    stub: daemon_pb2_grpc.DaemonServiceStub, ok: Any, within: float = 40.0, agent_id: str = "probe"
) -> common_pb2.AgentInfo:
    async def get() -> common_pb2.AgentInfo | None:
        try:
            reply = await stub.ListAgents(daemon_pb2.ListAgentsRequest(), timeout=5)
        except Exception:
            return None
        return next((a for a in reply.agents if a.id == agent_id), None)

    info = await eventually(get, lambda a: a is not None and ok(a), within=within)
    assert info is not None
    return info


async def _log_line(
    daemon: Daemon, needle: str, within: float = 20.0, agent_id: str = "probe"
) -> None:
    async def read() -> str:
        return daemon.agent_log(agent_id)

    await eventually(read, lambda text: needle in text, within=within)


async def test_registration_shows_in_list_agents_and_config_push_arrives_live(
    daemon: Daemon, stub: daemon_pb2_grpc.DaemonServiceStub
) -> None:
    """ListAgents shows the SDK's version (or the spec's) and heartbeats; a config PushUpdate
    applies in place."""
    daemon.start()
    version = metadata.version("fleet")
    info = await _probe_info(
        stub, lambda a: a.version == version and a.last_heartbeat > 0 and a.health == HEALTHY
    )
    assert abs(info.last_heartbeat - time.time() * 1000) < 10_000
    await _log_line(daemon, "db tcp://127.0.0.1")  # the probe is measuring

    # The host's own probe cannot be replaced by a push: refused, named, untouched.
    cfg = load_daemon_config(daemon.config)
    own = next(spec_to_proto(s) for s in cfg.agents if s.id == "probe")
    reply = await stub.PushUpdate(daemon_pb2.PushUpdateRequest(version=1, agents=[own]), timeout=10)
    assert [r.agent_id for r in reply.refused] == ["probe"]
    assert "defined in this host's daemon.toml" in reply.refused[0].reason
    assert (list(reply.changed), list(reply.reconfigured)) == ([], [])

    # A pushed copy of it runs beside it, and takes a new config without a restart.
    pushed = common_pb2.AgentSpec()
    pushed.CopyFrom(own)
    pushed.id = "probe-pushed"
    pushed.version = "7.1"  # a bundled agent registers as the version its spec declares
    reply = await stub.PushUpdate(
        daemon_pb2.PushUpdateRequest(version=2, agents=[pushed]), timeout=10
    )
    assert list(reply.added) == ["probe-pushed"]
    first = await _probe_info(
        stub,
        lambda a: a.last_heartbeat > 0 and a.health == HEALTHY and a.version == "7.1",
        agent_id="probe-pushed",
    )
    pushed.config = json.dumps(
        {"targets": [{"name": "moved", "url": "tcp://127.0.0.1:9"}]}
    ).encode()
    sent = time.monotonic()
    reply = await stub.PushUpdate(
        daemon_pb2.PushUpdateRequest(version=3, agents=[pushed]), timeout=10
    )
    assert list(reply.reconfigured) == ["probe-pushed"]
    await _log_line(daemon, "probing 1 target(s) every 5s", within=10, agent_id="probe-pushed")
    assert time.monotonic() - sent < 5.0  # about a second on a quiet machine
    after = await _probe_info(
        stub, lambda a: a.config_version > first.config_version, agent_id="probe-pushed"
    )
    assert after.pid == first.pid, "a config-only change must not restart the agent"
    assert after.restart_count == first.restart_count
    # The host's own probe ran on throughout.
    still = await _probe_info(stub, lambda a: True)
    assert (still.pid, still.restart_count) == (info.pid, info.restart_count)


async def test_daemon_kill9_and_restart_the_agent_registers_again_unrestarted(
    daemon: Daemon, stub: daemon_pb2_grpc.DaemonServiceStub
) -> None:
    """kill -9 of the daemon leaves the agent running; it reconnects to the new daemon by itself."""
    daemon.start()
    info = await _probe_info(stub, lambda a: a.last_heartbeat > 0)
    daemon.kill9()
    await _log_line(daemon, "lost the daemon")
    lines_before = daemon.agent_log("probe").count("db tcp://127.0.0.1")
    await asyncio.sleep(1.0)
    assert psutil.pid_exists(info.pid)
    assert daemon.agent_log("probe").count("db tcp://127.0.0.1") > lines_before, (
        "the probe kept working while the daemon was down"
    )
    daemon.start()
    await _log_line(daemon, "registered again as agent probe", within=40)
    again = await _probe_info(stub, lambda a: a.last_heartbeat > info.last_heartbeat)
    assert again.pid == info.pid, "the agent was re-adopted, not restarted"
    log = daemon.agent_log("probe")
    assert log.count("registered as agent probe") == 1


async def test_an_unsupervised_fleet_agent_is_refused(
    daemon: Daemon, stub: daemon_pb2_grpc.DaemonServiceStub
) -> None:
    """fleet-agent started by hand with the daemon's socket is refused and exits 2."""
    daemon.start()
    await _probe_info(stub, lambda a: a.last_heartbeat > 0)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "FLEET_AGENT_ID": "probe",
        "FLEET_DAEMON_SOCKET": str(daemon.socket_path),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent_runtime.cli",
        "run",
        "probe",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 2
    text = err.decode()
    assert f"process {proc.pid} is not an agent supervised by this daemon" in text
    assert text.count("refused this process") == 1, "refused once, not retried"


async def test_a_hung_agent_is_restarted(
    daemon: Daemon, stub: daemon_pb2_grpc.DaemonServiceStub
) -> None:
    """An agent whose heartbeats stop while its process lives (SIGSTOP) is restarted."""
    daemon.start()
    info = await _probe_info(stub, lambda a: a.last_heartbeat > 0 and a.health == HEALTHY)
    os.kill(info.pid, signal.SIGSTOP)  # hung: alive, but no heartbeats
    try:
        after = await _probe_info(
            stub, lambda a: a.pid not in (0, info.pid) and a.last_heartbeat > 0, within=20
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGCONT)
    assert after.restart_count > info.restart_count
