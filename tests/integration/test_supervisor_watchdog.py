"""The heartbeat watchdog on the manual clock: a hung agent (alive, silent) is restarted."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from supervisor_helpers import Recorder, agent, alive, make_supervisor

from daemon.supervisor.clock import ManualClock
from daemon.supervisor.policy import READOPT_GRACE, heartbeat_deadline
from daemon.supervisor.spec import AgentSpec, HealthSpec
from daemon.supervisor.states import AgentStatus
from daemon.supervisor.supervisor import Supervisor

S = AgentStatus
SLEEP = ("-c", "import time; time.sleep(600)")
PARKED = 2
"""Clock sleepers when the sampler and the agent's watchdog both wait."""


def _hb(agent_id: str = "hb", timeout: float = 5.0, **kw: object) -> AgentSpec:
    return agent(
        agent_id, *SLEEP, start_secs=0.0, health=HealthSpec(kind="heartbeat", timeout=timeout), **kw
    )


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


async def _running_and_registered(sup: Supervisor, rec: Recorder, agent_id: str = "hb") -> int:
    await rec.until(lambda: sup.get(agent_id).status is S.RUNNING and sup.get(agent_id).pid > 0)
    pid = sup.get(agent_id).pid
    snap = sup.agent_registered(agent_id, version="2.0", pid=pid)
    assert snap.health == "healthy"
    return pid


def test_deadline_counts_from_the_later_of_last_heartbeat_and_watch_start() -> None:
    """The deadline: last heartbeat + timeout, never before watch start + timeout (or grace)."""
    assert heartbeat_deadline(last_heartbeat=100.0, watched_since=90.0, timeout=5.0) == 105.0
    assert heartbeat_deadline(last_heartbeat=80.0, watched_since=90.0, timeout=5.0) == 95.0
    assert (
        heartbeat_deadline(last_heartbeat=0.0, watched_since=90.0, timeout=5.0, grace=15.0) == 105.0
    )


async def test_a_silent_agent_is_marked_unhealthy_and_restarted(
    sup: Supervisor, rec: Recorder, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """No heartbeat for the timeout: UNHEALTHY is reported and logged, then a new process runs."""
    caplog.set_level(logging.WARNING, logger="daemon.supervisor.agent")
    await sup.start([_hb(restart="on-failure")])
    pid = await _running_and_registered(sup, rec)
    clock.advance(4.9)
    await rec.until(lambda: clock.sleepers >= PARKED)
    assert sup.get("hb").health == "healthy"
    assert sup.get("hb").pid == pid
    clock.advance(0.2)
    await rec.until(lambda: sup.get("hb").pid not in (0, pid))
    unhealthy = [s for s in rec.changes if s.id == "hb" and s.health == "unhealthy"]
    assert unhealthy, "the unhealthy state was reported through on_change"
    assert unhealthy[0].pid == pid
    assert "no heartbeat for 5.1s (timeout 5s); restarting" in unhealthy[0].message
    assert any("hb" in r.getMessage() and "no heartbeat" in r.getMessage() for r in caplog.records)
    assert not alive(pid)
    assert sup.get("hb").restart_count == 1
    assert sup.get("hb").health == "pending", "the new process has not registered yet"
    how = sup.get("hb").last_exit
    assert how is not None
    assert (how.kind, how.reason) == (
        "unhealthy",
        "killed by the health check after 5.1 s without a heartbeat",
    )


async def test_heartbeats_keep_moving_the_deadline(
    sup: Supervisor, rec: Recorder, clock: ManualClock
) -> None:
    """An agent that heartbeats within every timeout is never restarted, however long it runs."""
    await sup.start([_hb(restart="always")])
    pid = await _running_and_registered(sup, rec)
    for _ in range(10):
        clock.advance(4.0)
        sup.agent_heartbeat("hb")
        await rec.until(lambda: clock.sleepers >= PARKED)
    assert sup.get("hb").pid == pid
    assert sup.get("hb").health == "healthy"
    assert sup.get("hb").restart_count == 0


async def test_restart_never_leaves_a_silent_agent_running_but_unhealthy(
    sup: Supervisor, rec: Recorder, clock: ManualClock
) -> None:
    """restart = "never": the hung agent is only reported; a late heartbeat makes it healthy."""
    await sup.start([_hb(restart="never")])
    pid = await _running_and_registered(sup, rec)
    clock.advance(6.0)
    await rec.until(lambda: sup.get("hb").health == "unhealthy")
    snap = sup.get("hb")
    assert (snap.status, snap.pid) == (S.RUNNING, pid)
    assert "left running (restart = never)" in snap.message
    sup.agent_heartbeat("hb")
    assert sup.get("hb").health == "healthy"
    clock.advance(6.0)  # the watchdog re-armed on that heartbeat
    await rec.until(lambda: sup.get("hb").health == "unhealthy")
    assert sup.get("hb").pid == pid


async def test_an_agent_that_never_registers_is_restarted_after_the_timeout(
    sup: Supervisor, rec: Recorder, clock: ManualClock
) -> None:
    """Without a first heartbeat the agent is pending for one timeout, then restarted."""
    await sup.start([_hb(timeout=3.0)])
    await rec.until(lambda: sup.get("hb").status is S.RUNNING and sup.get("hb").pid > 0)
    pid = sup.get("hb").pid
    assert sup.get("hb").health == "pending"
    clock.advance(3.0)
    await rec.until(lambda: sup.get("hb").pid not in (0, pid))
    assert sup.get("hb").restart_count == 1


async def test_a_sigstopped_agent_is_stopped_by_its_stop_signal_not_killed(
    sup: Supervisor, rec: Recorder, clock: ManualClock
) -> None:
    """SIGTERM to a SIGSTOPped agent comes with SIGCONT: it ends without waiting for SIGKILL."""
    await sup.start([_hb(restart="always", stop_timeout=30.0)])
    pid = await _running_and_registered(sup, rec)
    os.kill(pid, signal.SIGSTOP)
    clock.advance(5.0)
    await rec.until(lambda: sup.get("hb").pid not in (0, pid))
    stopped = [s for s in rec.changes if s.id == "hb" and s.status is S.STOPPED]
    assert stopped
    assert stopped[-1].message == "stopped by SIGTERM", "no stop_timeout wait, no SIGKILL"


async def test_the_timeout_restarts_after_a_daemon_restart_with_room_to_reconnect(
    tmp_path: Path,
) -> None:
    """Re-adopted: not restarted within READOPT_GRACE; silent after registering again, it is."""
    rec1, clock1 = Recorder(), ManualClock()
    first = make_supervisor(tmp_path, rec1, clock=clock1)
    await first.start([_hb()])
    pid = await _running_and_registered(first, rec1)
    await first.stop()  # the daemon goes away; the agent keeps running
    rec2, clock2 = Recorder(), ManualClock(start=clock1.now() + 60.0)  # it was down a minute
    second = make_supervisor(tmp_path, rec2, clock=clock2)
    try:
        await second.start([_hb()])
        assert (second.get("hb").pid, second.get("hb").health) == (pid, "pending")
        clock2.advance(READOPT_GRACE - 1.0)
        await rec2.until(lambda: clock2.sleepers >= PARKED)
        assert second.get("hb").pid == pid, "not restarted while it may still be reconnecting"
        second.agent_registered("hb", version="2.0", pid=pid)
        assert second.get("hb").health == "healthy"
        clock2.advance(5.0)
        await rec2.until(lambda: second.get("hb").pid not in (0, pid))
        assert not alive(pid)
    finally:
        await second.stop(stop_agents=True)


async def test_a_readopted_agent_keeps_the_version_it_registered_and_a_new_process_does_not(
    tmp_path: Path,
) -> None:
    """The version an SDK agent registered is its process's: a daemon restart re-adopts the
    same process and shows it from the start (not the spec's, then the registered one again:
    two spurious version changes); a restarted process shows the spec's until it registers."""
    rec1, clock1 = Recorder(), ManualClock()
    first = make_supervisor(tmp_path, rec1, clock=clock1)
    await first.start([_hb(version="1.0")])
    pid = await _running_and_registered(first, rec1)  # registers as 2.0
    assert first.get("hb").version == "2.0"
    await first.stop()  # the daemon goes away; the agent keeps running
    rec2, clock2 = Recorder(), ManualClock(start=clock1.now() + 60.0)
    second = make_supervisor(tmp_path, rec2, clock=clock2)
    try:
        await second.start([_hb(version="1.0")])
        assert (second.get("hb").pid, second.get("hb").version) == (pid, "2.0")
        assert {s.version for s in rec2.changes if s.id == "hb"} == {"2.0"}
        await second.operate("hb", "restart")
        await rec2.until(lambda: second.get("hb").pid not in (0, pid))
        assert second.get("hb").version == "1.0", "a new process has not registered yet"
    finally:
        await second.stop(stop_agents=True)


async def test_a_stall_of_the_daemon_itself_is_not_the_agents_silence(
    sup: Supervisor, rec: Recorder, clock: ManualClock
) -> None:
    """The watchdog woke a minute past the deadline (the daemon was SIGSTOPped, swapped out,
    its VM paused): nobody could heartbeat it, so the agent is pending, not restarted, and
    healthy once heard; silent for the grace after the stall, it is restarted."""
    await sup.start([_hb(restart="always")])
    pid = await _running_and_registered(sup, rec)
    await rec.until(lambda: clock.sleepers >= PARKED)
    clock.advance(60.0)  # one jump: the watchdog wakes 55 s past its deadline
    await rec.until(lambda: sup.get("hb").health == "pending")
    snap = sup.get("hb")
    assert (snap.status, snap.pid, snap.restart_count) == (S.RUNNING, pid, 0)
    sup.agent_heartbeat("hb")  # what waited in the socket arrives
    assert sup.get("hb").health == "healthy"
    for _ in range(3):  # silent again, in steps (no stall): restarted after its timeout
        await rec.until(lambda: clock.sleepers >= PARKED)
        clock.advance(2.0)
    await rec.until(lambda: sup.get("hb").pid not in (0, pid))
    assert sup.get("hb").restart_count == 1


async def test_after_a_stall_an_agent_still_silent_past_the_grace_is_restarted(
    sup: Supervisor, rec: Recorder, clock: ManualClock
) -> None:
    """The stall gives READOPT_GRACE to be heard, not forever."""
    await sup.start([_hb(restart="always")])
    pid = await _running_and_registered(sup, rec)
    await rec.until(lambda: clock.sleepers >= PARKED)
    clock.advance(60.0)
    await rec.until(lambda: sup.get("hb").health == "pending")
    for _ in range(int(READOPT_GRACE) - 1):  # in steps: no second stall
        await rec.until(lambda: clock.sleepers >= PARKED)
        clock.advance(1.0)
    assert sup.get("hb").pid == pid
    await rec.until(lambda: clock.sleepers >= PARKED)
    clock.advance(1.5)
    await rec.until(lambda: sup.get("hb").pid not in (0, pid))
    assert sup.get("hb").restart_count == 1
