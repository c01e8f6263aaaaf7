"""Timers run on the injected clock: backoff and health are exact under a manual clock."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
from supervisor_helpers import Recorder, agent, make_supervisor, script

from daemon.sampler import Sampler
from daemon.supervisor.clock import ManualClock
from daemon.supervisor.spec import BackoffSpec, HealthSpec
from daemon.supervisor.states import AgentStatus
from daemon.supervisor.supervisor import Supervisor

S = AgentStatus


@pytest.fixture
def clock() -> ManualClock:
    """Time that moves only when the test says so."""
    return ManualClock()


@pytest.fixture
def rec() -> Recorder:
    """Records every snapshot the supervisor reports."""
    return Recorder()


@pytest.fixture
async def sup(tmp_path: Path, rec: Recorder, clock: ManualClock) -> AsyncIterator[Supervisor]:
    """A supervisor on the manual clock that stops its agents at the end."""
    supervisor = make_supervisor(tmp_path, rec, clock=clock)
    yield supervisor
    await supervisor.stop(stop_agents=True)


async def test_backoff_waits_exactly_its_delay(
    sup: Supervisor, rec: Recorder, clock: ManualClock
) -> None:
    """A crashed start is retried only once the clock passes backoff_until, not before."""
    spec = agent(
        "crasher",
        "-c",
        "raise SystemExit(1)",
        start_secs=5.0,
        backoff=BackoffSpec(initial=10.0, multiplier=3.0, max=100.0, jitter=0.0),
    )
    await sup.start([spec])
    await rec.until(lambda: sup.get("crasher").status is S.BACKOFF)
    snap = sup.get("crasher")
    assert snap.backoff_until_ms == int((clock.now() + 10.0) * 1000)
    assert "retry 1/5 in 10.00s" in snap.message
    clock.advance(9.9)
    await rec.until(lambda: clock.sleepers >= 1)
    assert sup.get("crasher").status is S.BACKOFF
    clock.advance(0.1)
    await rec.until(lambda: sup.get("crasher").restart_count == 1)
    await rec.until(lambda: sup.get("crasher").status is S.BACKOFF)
    assert sup.get("crasher").backoff_until_ms == int((clock.now() + 30.0) * 1000)


async def test_running_only_after_start_secs(
    sup: Supervisor, rec: Recorder, clock: ManualClock
) -> None:
    """A live agent stays STARTING until start_secs of clock time have passed."""
    await sup.start([agent("slow", "-c", "import time; time.sleep(600)", start_secs=30.0)])
    clock.advance(29.0)
    await rec.until(lambda: clock.sleepers >= 2)  # the agent's start timer and the sampler
    assert sup.get("slow").status is S.STARTING
    clock.advance(1.0)
    await rec.until(lambda: sup.get("slow").status is S.RUNNING)


async def test_heartbeat_health(sup: Supervisor, rec: Recorder, clock: ManualClock) -> None:
    """Heartbeat health is pending until the first heartbeat, then unhealthy after the timeout."""
    spec = agent(
        "hb",
        "-c",
        "import time; time.sleep(600)",
        start_secs=0.0,
        health=HealthSpec(kind="heartbeat", timeout=5.0),
    )
    await sup.start([spec])
    await rec.until(lambda: sup.get("hb").status is S.RUNNING)
    assert sup.get("hb").health == "pending"
    snap = sup.agent_registered("hb", version="1.2.3", pid=sup.get("hb").pid)
    assert (snap.health, snap.version) == ("healthy", "1.2.3")
    assert snap.last_heartbeat_ms == int(clock.now() * 1000)
    clock.advance(6.0)
    await rec.until(lambda: sup.get("hb").health == "unhealthy")
    sup.agent_heartbeat("hb")
    assert sup.get("hb").health == "healthy"


async def test_crash_then_backoff_then_running(
    sup: Supervisor, rec: Recorder, clock: ManualClock, tmp_path: Path
) -> None:
    """An agent that crashes on its first start goes BACKOFF, is retried, and ends RUNNING."""
    flag = tmp_path / "crashed-once"
    prog = script(
        tmp_path,
        "crash_once",
        f"""
        import pathlib, sys, time
        flag = pathlib.Path({str(flag)!r})
        if not flag.exists():
            flag.write_text("x")
            sys.exit(3)
        time.sleep(600)
        """,
    )
    await sup.start([agent("flaky", str(prog), start_secs=5.0)])
    await rec.until(lambda: sup.get("flaky").status is S.BACKOFF)
    backoff = sup.get("flaky")
    assert "exited too quickly (exit code 3)" in backoff.message
    assert backoff.backoff_until_ms > 0

    def running_after_a_tick() -> bool:
        clock.advance(1.0)
        return sup.get("flaky").status is S.RUNNING

    await rec.until(running_after_a_tick)
    assert rec.statuses("flaky") == [S.STARTING, S.BACKOFF, S.STARTING, S.RUNNING]
    assert sup.get("flaky").restart_count == 1
    assert sup.get("flaky").message.startswith("running with pid")


async def test_a_backward_step_of_the_wall_clock_does_not_stop_sampling(
    sup: Supervisor, rec: Recorder, clock: ManualClock
) -> None:
    """Samples follow the sample interval in time passed: ten minutes back on the wall
    clock is not ten minutes without resource figures."""
    await sup.start([agent("s", "-c", "import time; time.sleep(600)", start_secs=0.0)])
    await rec.until(lambda: sup.sampler.latest("s") is not None)
    clock.step(-600)
    clock.advance(0.1)
    # An agent's samples are stamped with the wall clock, so the new one reads 10 min back.
    now_ms = int(clock.now() * 1000)
    await rec.until(lambda: any(s.timestamp_ms == now_ms for s in sup.sampler.samples("s")))


async def test_a_backward_step_of_the_wall_clock_does_not_stop_tree_rescans(
    rec: Recorder,
) -> None:
    """The sampler looks for an agent's new children every rescan interval: stepped ten
    minutes back, it still finds a child started after the step."""
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import subprocess, sys, time; sys.stdin.readline();"
        " subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        " time.sleep(60)",
        stdin=asyncio.subprocess.PIPE,
    )
    try:
        sampler = Sampler(rescan_interval=5.0)
        sampler.track("a", parent.pid)
        t0 = 1_700_000_000_000
        sampler.sample(t0)
        assert sampler.tree_pids("a") == {parent.pid}
        back = t0 - 600_000
        sampler.sample(back)
        assert parent.stdin is not None
        parent.stdin.write(b"go\n")
        await parent.stdin.drain()
        await rec.until(lambda: bool(psutil.Process(parent.pid).children()))
        sampler.sample(back + 6000)  # a rescan interval after the step
        (child,) = psutil.Process(parent.pid).children()
        assert sampler.tree_pids("a") == {parent.pid, child.pid}
    finally:
        for proc in psutil.Process(parent.pid).children():
            proc.kill()
        parent.kill()
        await parent.wait()
