"""Why an agent last stopped: recorded with real processes, kept while the next one runs.

The reported bug: after `kill -9` of an agent its state said exit code 0 and
"started with pid N", because each spawn reset the exit code. Now the exit
code and a `LastExit` (kind, reason, time) of the last process stay until the
next process ends, and survive a daemon restart.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from supervisor_helpers import Recorder, agent, make_supervisor, script

from daemon.convert import agent_info
from daemon.supervisor.spec import AgentSpec, BackoffSpec
from daemon.supervisor.states import AgentStatus
from daemon.supervisor.supervisor import Supervisor

S = AgentStatus
SLEEPER = ("-c", "import time; time.sleep(600)")


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


async def test_kill_9_is_recorded_while_the_restarted_process_runs(
    sup: Supervisor, rec: Recorder
) -> None:
    """After kill -9 the RUNNING agent still says exit code -9, killed by SIGKILL, and when."""
    await sup.start([agent("web", *SLEEPER)])
    await rec.until(lambda: sup.get("web").status is S.RUNNING)
    old = sup.get("web").pid
    assert sup.get("web").last_exit is None
    os.kill(old, signal.SIGKILL)
    await rec.until(lambda: sup.get("web").status is S.RUNNING and sup.get("web").pid != old)
    now = sup.get("web")
    assert now.exit_code == -signal.SIGKILL
    assert now.last_exit is not None
    assert (now.last_exit.kind, now.last_exit.code) == ("killed", -9)
    assert now.last_exit.reason == "killed by SIGKILL"
    assert now.last_exit.at > 0
    assert now.restart_count == 1


async def test_an_exit_code_and_an_operator_stop_are_told_apart(
    sup: Supervisor, rec: Recorder, tmp_path: Path
) -> None:
    """A crash with code 3 is 'exited with code 3'; an operator stop says so, with its signal."""
    prog = script(tmp_path, "crash", "import sys, time; time.sleep(0.6); sys.exit(3)")
    await sup.start([agent("c", str(prog), restart="never")])
    await rec.until(lambda: sup.get("c").status is S.EXITED)
    how = sup.get("c").last_exit
    assert how is not None
    assert (how.kind, how.code, how.reason) == ("exited", 3, "exited with code 3")
    await sup.operate("c", "start")
    await rec.until(lambda: sup.get("c").status is S.RUNNING)
    stopped = await sup.operate("c", "stop")
    assert stopped.last_exit is not None
    assert (stopped.last_exit.kind, stopped.last_exit.reason) == (
        "operator",
        "stopped by an operator",
    )
    assert stopped.exit_code == -signal.SIGTERM


async def test_a_restart_by_an_operator_is_the_reason_of_the_new_process(
    sup: Supervisor, rec: Recorder
) -> None:
    """`agents restart`: the new process shows 'restarted by an operator'."""
    await sup.start([agent("r", *SLEEPER)])
    await rec.until(lambda: sup.get("r").status is S.RUNNING)
    after = await sup.operate("r", "restart")
    assert after.last_exit is not None
    assert (after.last_exit.kind, after.last_exit.reason) == (
        "operator",
        "restarted by an operator",
    )


async def test_a_start_that_fails_says_why(sup: Supervisor, rec: Recorder, tmp_path: Path) -> None:
    """No process at all: kind start_failed, the reason names the program."""
    prog = script(tmp_path, "vanishing", "import time; time.sleep(600)")
    prog.chmod(0o755)
    runner = tmp_path / "run"
    runner.symlink_to(prog)
    spec = AgentSpec(
        id="gone", argv=(str(runner),), autostart=False, max_retries=0,
        backoff=BackoffSpec(initial=0.05, jitter=0.0),
    )  # fmt: skip
    await sup.start([spec])
    runner.unlink()
    await sup.operate("gone", "start")
    await rec.until(lambda: sup.get("gone").status is S.FATAL)
    how = sup.get("gone").last_exit
    assert how is not None
    assert how.kind == "start_failed"
    assert how.reason.startswith("start failed: program")


async def test_the_last_exit_survives_a_daemon_restart(tmp_path: Path) -> None:
    """A new supervisor on the same state dir re-adopts the agent and still knows why it
    restarted last."""
    first_rec = Recorder()
    first = make_supervisor(tmp_path, first_rec)
    await first.start([agent("web", *SLEEPER)])
    await first_rec.until(lambda: first.get("web").status is S.RUNNING)
    old = first.get("web").pid
    os.kill(old, signal.SIGKILL)
    await first_rec.until(
        lambda: first.get("web").status is S.RUNNING and first.get("web").pid != old
    )
    await first.stop()  # leaves the agent running, as a daemon restart does
    second_rec = Recorder()
    second = make_supervisor(tmp_path, second_rec)
    try:
        await second.start([agent("web", *SLEEPER)])
        snap = second.get("web")
        assert snap.status is S.RUNNING
        assert snap.last_exit is not None
        assert snap.last_exit.reason == "killed by SIGKILL"
        assert snap.exit_code == -9
    finally:
        await second.stop(stop_agents=True)


@pytest.mark.parametrize(
    "unreadable",
    [
        {"kind": "oom", "code": -9, "reason": "killed by the OOM killer", "at": 1.0},
        {"kind": "killed", "reason": "killed by SIGKILL"},
        "killed by SIGKILL",
    ],
)
async def test_an_unreadable_last_exit_does_not_stop_the_readoption(
    tmp_path: Path, unreadable: object
) -> None:
    """A record this daemon cannot read (a newer daemon's kind after a downgrade, a torn
    edit) is dropped: the agent is still re-adopted, and listing it works."""
    first_rec = Recorder()
    first = make_supervisor(tmp_path, first_rec)
    await first.start([agent("web", *SLEEPER)])
    await first_rec.until(lambda: first.get("web").status is S.RUNNING)
    await first.operate("web", "restart")
    await first_rec.until(lambda: first.get("web").status is S.RUNNING)
    pid = first.get("web").pid
    await first.stop()
    state = tmp_path / "state" / "agents.json"
    data = json.loads(state.read_text())
    assert data["agents"]["web"]["last_exit"]["reason"] == "restarted by an operator"
    data["agents"]["web"]["last_exit"] = unreadable
    state.write_text(json.dumps(data))
    second = make_supervisor(tmp_path, Recorder())
    try:
        await second.start([agent("web", *SLEEPER)])
        snap = second.get("web")
        assert (snap.pid, snap.last_exit, snap.exit_code) == (pid, None, 0)
        assert not agent_info(snap).HasField("last_exit")
    finally:
        await second.stop(stop_agents=True)


async def test_a_stop_that_needed_sigkill_says_so(sup: Supervisor, rec: Recorder) -> None:
    """A SIGTERM-ignoring agent stopped by an operator: -9, and the escalation in the reason."""
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    await sup.start([agent("stubborn", "-c", code, stop_timeout=0.5)])
    await rec.until(lambda: sup.get("stubborn").status is S.RUNNING)
    stopped = await sup.operate("stubborn", "stop")
    assert stopped.exit_code == -signal.SIGKILL
    assert stopped.last_exit is not None
    assert stopped.last_exit.reason == (
        "stopped by an operator (killed after stop_timeout (0.5s): did not exit on SIGTERM)"
    )


async def test_a_new_spec_is_the_reason_of_the_new_process(sup: Supervisor, rec: Recorder) -> None:
    """A pushed spec that needs a new process: the new one shows 'restarted for a new spec'."""
    await sup.start([])
    await sup.apply(1, [agent("app", *SLEEPER, version="1")])
    await rec.until(lambda: sup.get("app").status is S.RUNNING)
    old = sup.get("app").pid
    await sup.apply(2, [agent("app", *SLEEPER, version="2")])
    await rec.until(lambda: sup.get("app").status is S.RUNNING and sup.get("app").pid != old)
    how = sup.get("app").last_exit
    assert how is not None
    assert (how.kind, how.reason) == ("updated", "restarted for a new spec")


async def test_agents_stopped_with_the_daemon_say_so_to_the_next_one(tmp_path: Path) -> None:
    """stop_agents_on_exit: the next daemon starts the agent again and still says why it
    had stopped."""
    first_rec = Recorder()
    first = make_supervisor(tmp_path, first_rec)
    await first.start([agent("web", *SLEEPER)])
    await first_rec.until(lambda: first.get("web").status is S.RUNNING)
    await first.stop(stop_agents=True)
    second_rec = Recorder()
    second = make_supervisor(tmp_path, second_rec)
    try:
        await second.start([agent("web", *SLEEPER)])
        await second_rec.until(lambda: second.get("web").status is S.RUNNING)
        how = second.get("web").last_exit
        assert how is not None
        assert (how.kind, how.reason) == ("daemon", "stopped with the daemon (stop_agents_on_exit)")
    finally:
        await second.stop(stop_agents=True)
