"""Helpers for supervisor tests: agent programs, a supervisor fixture, waiting on changes."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil

from daemon.supervisor.spec import AgentSpec, BackoffSpec
from daemon.supervisor.states import AgentStatus
from daemon.supervisor.supervisor import AgentSnapshot, Supervisor

FAST_BACKOFF = BackoffSpec(initial=0.05, multiplier=2.0, max=0.2, jitter=0.0)


def script(tmp_path: Path, name: str, body: str) -> Path:
    """Write a python agent program to tmp_path and return its path."""
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


def agent(agent_id: str, *args: str, **kw: object) -> AgentSpec:
    """A spec running `sys.executable args...` with test-friendly timings."""
    defaults: dict[str, object] = {
        "start_secs": 0.3,
        "stop_timeout": 2.0,
        "backoff": FAST_BACKOFF,
    }
    defaults.update(kw)
    return AgentSpec(id=agent_id, argv=(sys.executable, *args), **defaults)  # type: ignore[arg-type]


def marker() -> str:
    """A unique argv marker to count an agent's processes on the host."""
    return f"fleet-test-{uuid.uuid4().hex[:12]}"


def processes_with(mark: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose argv contains `mark`."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(mark in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Recorder:
    """Collects on_change snapshots and lets a test wait for a condition."""

    def __init__(self) -> None:
        self.changes: list[AgentSnapshot] = []
        self._event = asyncio.Event()

    def __call__(self, snapshot: AgentSnapshot) -> None:
        self.changes.append(snapshot)
        self._event.set()

    def statuses(self, agent_id: str) -> list[AgentStatus]:
        """Distinct consecutive statuses `agent_id` went through."""
        out: list[AgentStatus] = []
        for snap in self.changes:
            if snap.id == agent_id and (not out or out[-1] is not snap.status):
                out.append(snap.status)
        return out

    async def until(self, condition: Callable[[], bool], within: float = 10.0) -> None:
        """Wait until `condition()` holds, re-checking on every change."""
        async with asyncio.timeout(within):
            while not condition():
                self._event.clear()
                try:
                    async with asyncio.timeout(0.5):  # also re-check on sampler ticks
                        await self._event.wait()
                except TimeoutError:
                    pass


def make_supervisor(tmp_path: Path, recorder: Recorder | None = None, **kw: object) -> Supervisor:
    """A supervisor with its dirs under tmp_path and a fast sampler."""
    return Supervisor(
        state_dir=tmp_path / "state",
        log_dir=tmp_path / "logs",
        socket_path=tmp_path / "agent.sock",
        on_change=recorder,
        sample_interval=kw.pop("sample_interval", 0.1),  # type: ignore[arg-type]
        tree_rescan_interval=0.3,
        **kw,  # type: ignore[arg-type]
    )
