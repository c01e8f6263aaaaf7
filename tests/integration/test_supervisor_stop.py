"""Stopping is final: TERM-ignoring agents and their children (even escaped ones) are gone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from supervisor_helpers import (
    Recorder,
    agent,
    alive,
    make_supervisor,
    marker,
    processes_with,
    script,
)

from daemon.supervisor.spec import BackoffSpec
from daemon.supervisor.states import AgentStatus
from daemon.supervisor.supervisor import Supervisor

S = AgentStatus


@pytest.fixture
def rec() -> Recorder:
    """Records every snapshot the supervisor reports."""
    return Recorder()


@pytest.fixture
async def sup(tmp_path: Path, rec: Recorder) -> AsyncIterator[Supervisor]:
    """A supervisor that stops its agents at the end of the test."""
    supervisor = make_supervisor(tmp_path, rec)
    yield supervisor
    await supervisor.stop(stop_agents=True)


def _stubborn(tmp_path: Path, pids: Path, mark: str) -> Path:
    """An agent ignoring SIGTERM with a child in its group and one that escaped via setsid."""
    return script(
        tmp_path,
        "stubborn",
        f"""
        import os, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = [sys.executable, "-c",
                 "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                 "time.sleep(600)", {mark!r}]
        stay = subprocess.Popen(child)
        escaped = subprocess.Popen(child, start_new_session=True)
        with open({str(pids)!r} + ".tmp", "w") as f:
            f.write(f"{{os.getpid()}} {{stay.pid}} {{escaped.pid}}")
        os.rename({str(pids)!r} + ".tmp", {str(pids)!r})
        time.sleep(600)
        """,
    )


async def test_term_ignoring_agent_with_children_is_fully_gone(
    sup: Supervisor, rec: Recorder, tmp_path: Path
) -> None:
    """After stop_timeout the group and escaped descendants are SIGKILLed; no pid survives."""
    pids_file = tmp_path / "pids"
    mark = marker()
    prog = _stubborn(tmp_path, pids_file, mark)
    await sup.start([agent("stubborn", str(prog), mark, stop_timeout=0.5)])
    await rec.until(lambda: pids_file.exists() and sup.get("stubborn").status is S.RUNNING)
    pids = [int(p) for p in pids_file.read_text().split()]
    assert len(processes_with(mark)) == 3

    snap = await sup.operate("stubborn", "stop")

    assert snap.status is S.STOPPED
    assert "killed after stop_timeout (0.5s)" in snap.message
    assert [p for p in pids if alive(p)] == []
    assert processes_with(mark) == []
    assert rec.statuses("stubborn")[-2:] == [S.STOPPING, S.STOPPED]


async def test_custom_stop_signal_is_used(sup: Supervisor, rec: Recorder, tmp_path: Path) -> None:
    """stop_signal goes to the agent; an agent that exits on it is not SIGKILLed."""
    got = tmp_path / "got"
    code = (
        "import signal, sys, time\n"
        "def on_int(*_):\n"
        f"    open({str(got)!r}, 'w').write('INT'); sys.exit(0)\n"
        "signal.signal(signal.SIGINT, on_int)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    await sup.start([agent("polite", "-c", code, stop_signal="INT", stop_timeout=5.0)])
    await rec.until(lambda: b"ready" in sup.read_log("polite", 0, 100).data)
    snap = await sup.operate("polite", "stop")
    assert snap.status is S.STOPPED
    assert snap.message == "stopped by SIGINT"
    assert snap.exit_code == 0
    assert got.read_text() == "INT"


async def test_stop_during_backoff_cancels_the_retry(sup: Supervisor, rec: Recorder) -> None:
    """Stopping an agent that is waiting out a backoff leaves it STOPPED, never respawned."""
    spec = agent(
        "loop",
        "-c",
        "raise SystemExit(1)",
        start_secs=5.0,
        backoff=BackoffSpec(initial=0.5, jitter=0.0),
    )
    await sup.start([spec])
    await rec.until(lambda: sup.get("loop").status is S.BACKOFF)
    snap = await sup.operate("loop", "stop")
    assert snap.status is S.STOPPED
    count = len([c for c in rec.changes if c.status is S.STARTING])
    await asyncio.sleep(0.8)
    assert len([c for c in rec.changes if c.status is S.STARTING]) == count
    assert sup.get("loop").status is S.STOPPED
