"""An agent spawned just before a daemon crash, not in agents.json, is adopted, not doubled."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from supervisor_helpers import Recorder, agent, make_supervisor, marker, processes_with

from daemon.supervisor.states import AgentStatus

S = AgentStatus
SLEEP = "import time; time.sleep(600)"


def _orphan(mark: str, agent_id: str, socket_path: Path) -> int:
    """Start `python -c SLEEP mark` detached (own session, parent gone) with an agent's env."""
    env = {**os.environ, "FLEET_AGENT_ID": agent_id, "FLEET_DAEMON_SOCKET": str(socket_path)}
    subprocess.run(["setsid", "-f", sys.executable, "-c", SLEEP, mark], env=env, check=True)
    for _ in range(200):
        found = processes_with(mark)
        if found:
            return found[0].pid
        time.sleep(0.05)  # setsid -f returns before its child runs; nothing to wait on
    raise AssertionError("the orphan did not start")


@pytest.fixture
def mark() -> Iterator[str]:
    """A marker whose processes are all killed at the end."""
    m = marker()
    yield m
    for proc in processes_with(m):
        proc.kill()


async def test_an_unrecorded_agent_process_is_adopted_instead_of_started_again(
    tmp_path: Path, mark: str
) -> None:
    """No agents.json entry, but a process with FLEET_AGENT_ID and our socket: it is adopted."""
    rec = Recorder()
    sup = make_supervisor(tmp_path, rec)
    pid = _orphan(mark, "worker", tmp_path / "agent.sock")
    try:
        await sup.start([agent("worker", "-c", SLEEP, mark, start_secs=0.0)])
        snap = sup.get("worker")
        assert (snap.status, snap.pid) == (S.RUNNING, pid)
        await asyncio.sleep(0.3)
        assert [p.pid for p in processes_with(mark)] == [pid], "no second copy was started"
        await sup.operate("worker", "restart")  # and it is really supervised
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert sup.get("worker").pid not in (0, pid)
    finally:
        await sup.stop(stop_agents=True)


async def test_an_agent_process_of_another_daemon_is_left_alone(tmp_path: Path, mark: str) -> None:
    """Same agent id but another daemon's socket: not adopted; our own copy is started."""
    rec = Recorder()
    sup = make_supervisor(tmp_path, rec)
    theirs = _orphan(mark, "worker", tmp_path / "other" / "agent.sock")
    try:
        await sup.start([agent("worker", "-c", SLEEP, mark, start_secs=0.0)])
        assert sup.get("worker").pid not in (0, theirs)
    finally:
        await sup.stop(stop_agents=True)
    assert psutil.Process(theirs).is_running(), "the other daemon's agent was not touched"
