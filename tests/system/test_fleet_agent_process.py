"""`fleet-agent` as a real process against a FakeDaemon: signals, exit codes, real work."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent_runtime.testing import FakeDaemon
from fleet.errors import PermissionDenied

FLEET_AGENT = [sys.executable, "-m", "agent_runtime.cli"]


@dataclass
class AgentProcess:
    """A running fleet-agent with its stderr collected line by line."""

    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def wait_line(self, needle: str, within: float = 20.0) -> str:
        """The first stderr line containing `needle` (waits for it)."""
        async with asyncio.timeout(within):
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                if self.reader is not None and self.reader.done():
                    raise AssertionError(f"{needle!r} never logged:\n" + "\n".join(self.lines))
                await asyncio.sleep(0.02)

    async def stop(self, sig: signal.Signals = signal.SIGTERM, within: float = 20.0) -> int:
        """Send `sig` and return the exit code."""
        self.proc.send_signal(sig)
        async with asyncio.timeout(within):
            code = await self.proc.wait()
            if self.reader is not None:
                await self.reader
        return code

    @property
    def log(self) -> str:
        """Everything logged so far."""
        return "\n".join(self.lines)


async def _collect(stream: asyncio.StreamReader, lines: list[str]) -> None:
    while raw := await stream.readline():
        lines.append(raw.decode(errors="replace").rstrip())


Spawn = Callable[..., Awaitable[AgentProcess]]
"""spawn(args, env, cwd=None) -> a started AgentProcess."""


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """Start fleet-agent processes; any still running at the end are killed (by pid)."""
    started: list[AgentProcess] = []

    async def start(args: list[str], env: dict[str, str], cwd: Path | None = None) -> AgentProcess:
        proc = await asyncio.create_subprocess_exec(
            *FLEET_AGENT,
            *args,
            env={**os.environ, **env},
            cwd=cwd,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stderr is not None
        agent = AgentProcess(proc)
        agent.reader = asyncio.create_task(_collect(proc.stderr, agent.lines))
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.proc.returncode is None:
            agent.proc.kill()
            await agent.proc.wait()
        if agent.reader is not None:
            await agent.reader


async def test_probe_process_stops_gracefully_on_sigterm(spawn: Spawn) -> None:
    """SIGTERM: the probe's stop hook runs, metrics are flushed, and it exits 0."""

    async def handle(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    config = {
        "targets": [{"name": "db", "url": f"tcp://127.0.0.1:{port}"}],
        "interval_seconds": 0.2,
    }
    async with listener, FakeDaemon(agent_id="probe-1", config=config, stop_timeout=10) as daemon:
        agent = await spawn(["run", "probe"], daemon.env)
        registration = await daemon.wait_registered(timeout=20)
        assert (registration.type, registration.pid) == ("probe", agent.proc.pid)
        await agent.wait_line("db tcp://127.0.0.1")
        assert await agent.stop() == 0
        assert "SIGTERM: stopping within 10.0s" in agent.log
        assert "probe stopping after config version 1" in agent.log
        assert "stop hook main.<locals>._said_goodbye done" in agent.log
        # the samples measured before the signal were flushed on the way out
        assert any(m.type == "probe.db" and m.values["up"] == 1.0 for m in daemon.metrics)


async def test_worker_finishes_the_file_in_progress_on_sigterm(
    spawn: Spawn, tmp_path: Path
) -> None:
    """SIGTERM in the middle of a file: the worker finishes it (checksum, move), then exits 0."""
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    size = 512 * 1024 * 1024
    with (inbox / "big.bin").open("wb") as f:
        f.truncate(size)  # sparse: costs no disk, takes a while to hash
    (inbox / "later.bin").write_bytes(b"not yet")
    config = {"inbox": str(inbox), "outbox": str(outbox), "batch_size": 5, "pace_seconds": 0.1}
    async with FakeDaemon(agent_id="worker-1", config=config, stop_timeout=60) as daemon:
        agent = await spawn(["run", "worker"], daemon.env)
        await agent.wait_line("processing big.bin")
        assert await agent.stop(within=60) == 0
    assert "stop requested: finishing the file in progress" in agent.log
    assert "worker stopped after 1 file(s)" in agent.log
    record = json.loads((outbox / "checksums.jsonl").read_text())
    assert (record["name"], record["bytes"]) == ("big.bin", size)
    zeros = hashlib.sha256()
    chunk = bytes(1 << 20)
    for _ in range(size >> 20):
        zeros.update(chunk)
    assert record["sha256"] == zeros.hexdigest()
    assert (outbox / "big.bin").exists()
    assert (inbox / "later.bin").exists()  # not started: left for the next run


async def test_refused_agent_exits_2_with_the_reason(spawn: Spawn) -> None:
    """A process the daemon refuses logs why and exits 2 at once (no retry loop)."""
    async with FakeDaemon() as daemon:
        daemon.fail_register(PermissionDenied("process 99 is not an agent supervised here"))
        agent = await spawn(["run", "probe"], daemon.env)
        async with asyncio.timeout(20):
            code = await agent.proc.wait()
            assert agent.reader is not None
            await agent.reader
        assert code == 2
        assert daemon.refused_registrations == 1
        assert "process 99 is not an agent supervised here" in agent.log


async def test_outside_a_daemon_exits_2_naming_the_variable(spawn: Spawn) -> None:
    """Run by hand without the daemon's environment, fleet-agent says what is missing."""
    env = {"FLEET_AGENT_ID": "", "FLEET_DAEMON_SOCKET": ""}
    agent = await spawn(["run", "worker"], env)
    async with asyncio.timeout(20):
        code = await agent.proc.wait()
        assert agent.reader is not None
        await agent.reader
    assert code == 2
    assert "FLEET_AGENT_ID is not set" in agent.log


async def test_bad_config_argument_exits_2_with_one_line(spawn: Spawn) -> None:
    """A bad --config is one line naming the key, exit 2, before anything connects."""
    agent = await spawn(["run", "probe", "--config", '{"interval_seconds": -1}'], {})
    async with asyncio.timeout(20):
        code = await agent.proc.wait()
        assert agent.reader is not None
        await agent.reader
    assert code == 2
    assert agent.lines == ["fleet-agent: --config: interval_seconds: expected a number > 0, got -1"]


async def test_config_argument_is_used_until_the_daemon_sends_one(
    spawn: Spawn, tmp_path: Path
) -> None:
    """--config drives the worker while the daemon has no config for it."""
    inbox, outbox = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    (inbox / "a.txt").write_text("hello")
    arg = json.dumps({"inbox": str(inbox), "outbox": str(outbox), "pace_seconds": 0.1})
    async with FakeDaemon(agent_id="worker-2") as daemon:
        agent = await spawn(["run", "worker", "--config", arg], daemon.env)
        await agent.wait_line("processed a.txt: 5 bytes")
        assert await agent.stop() == 0
    assert (outbox / "a.txt").read_text() == "hello"
