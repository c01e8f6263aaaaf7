"""Real agent processes: start, stop, restart, crash recovery, crash loops, logs, samples."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from supervisor_helpers import Recorder, agent, alive, make_supervisor, script

from daemon.supervisor.spec import AgentSpec, BackoffSpec
from daemon.supervisor.states import AgentStatus
from daemon.supervisor.supervisor import Supervisor
from fleet.errors import InvalidArgument, NotFound

S = AgentStatus
SLEEPER = ("-c", "import time; print('up', flush=True); time.sleep(600)")


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


async def test_start_stop_restart(sup: Supervisor, rec: Recorder, tmp_path: Path) -> None:
    """An agent starts, reaches RUNNING after start_secs, stops, and restarts with a new pid."""
    await sup.start([agent("a", *SLEEPER)])
    await rec.until(lambda: sup.get("a").status is S.RUNNING)
    first = sup.get("a")
    assert first.pid > 0
    assert alive(first.pid)
    assert rec.statuses("a")[:2] == [S.STARTING, S.RUNNING]

    stopped = await sup.operate("a", "stop")
    assert (stopped.status, stopped.pid) == (S.STOPPED, 0)
    assert not alive(first.pid)
    assert "stopped by SIGTERM" in stopped.message
    again = await sup.operate("a", "stop")  # idempotent
    assert again.status is S.STOPPED

    started = await sup.operate("a", "start")
    assert started.status in (S.STARTING, S.RUNNING)
    assert started.pid > 0
    same = await sup.operate("a", "start")  # idempotent: no second process
    assert same.pid == started.pid

    restarted = await sup.operate("a", "restart")
    assert restarted.pid not in (0, started.pid)
    assert not alive(started.pid)
    assert restarted.restart_count >= 1


async def test_agent_environment_and_log_file(sup: Supervisor, rec: Recorder) -> None:
    """The agent gets FLEET_AGENT_ID / FLEET_DAEMON_SOCKET and its output lands in its log."""
    code = (
        "import os, sys, time;"
        "print('id', os.environ['FLEET_AGENT_ID'], flush=True);"
        "print('sock', os.environ['FLEET_DAEMON_SOCKET'], file=sys.stderr, flush=True);"
        "print('pgid-is-pid', os.getpgid(0) == os.getpid(), flush=True);"
        "time.sleep(600)"
    )
    await sup.start([agent("env-agent", "-c", code, env={"EXTRA": "1"})])
    await rec.until(lambda: b"pgid-is-pid" in sup.read_log("env-agent", 0, 4096).data)
    text = sup.read_log("env-agent", 0, 4096).data.decode()
    assert "id env-agent" in text
    assert "sock " + str(sup._ctx.socket_path) in text
    assert "pgid-is-pid True" in text


async def test_crash_loop_ends_fatal_with_backoff_visible(sup: Supervisor, rec: Recorder) -> None:
    """An agent that always dies at once ends FATAL, its backoff visible on the way."""
    spec = agent(
        "looper",
        "-c",
        "raise SystemExit(7)",
        start_secs=5.0,  # every exit is early, even on a loaded machine
        max_retries=3,
        backoff=BackoffSpec(initial=0.05, multiplier=2.0, max=1.0, jitter=0.0),
    )
    await sup.start([spec])
    await rec.until(lambda: sup.get("looper").status is S.FATAL)
    backoffs = [s for s in rec.changes if s.id == "looper" and s.status is S.BACKOFF]
    assert len(backoffs) == 4  # the last one goes straight on to FATAL
    assert all(s.backoff_until_ms > 0 for s in backoffs)
    delays = [s.backoff_until_ms for s in backoffs]
    assert delays == sorted(delays)
    fatal = sup.get("looper")
    assert fatal.exit_code == 7
    assert "4 times in a row; gave up" in fatal.message
    assert fatal.pid == 0
    # FATAL is final: no hot loop behind it.
    count = len(rec.changes)
    await asyncio.sleep(0.5)  # many backoff periods
    assert len(rec.changes) == count
    # an operator can start it again: retries start over
    snap = await sup.operate("looper", "start")
    assert snap.status in (S.STARTING, S.BACKOFF)


async def test_restart_policies_after_running(sup: Supervisor, rec: Recorder) -> None:
    """After RUNNING: on-failure restarts a crash, not a clean exit; always restarts both."""
    exit_after = "import sys, time; time.sleep(0.5); sys.exit({})"
    await sup.start(
        [
            agent("clean", "-c", exit_after.format(0), start_secs=0.2),
            agent("crash", "-c", exit_after.format(2), start_secs=0.2),
            agent("never", "-c", exit_after.format(2), start_secs=0.2, restart="never"),
        ]
    )
    await rec.until(lambda: sup.get("clean").status is S.EXITED)
    await rec.until(lambda: sup.get("never").status is S.EXITED)
    await rec.until(lambda: sup.get("crash").restart_count >= 1)
    assert sup.get("clean").exit_code == 0
    assert sup.get("never").exit_code == 2
    assert sup.get("clean").restart_count == 0
    assert sup.restarts_total >= 1


async def test_one_shot_that_finishes_fast_is_exited(sup: Supervisor, rec: Recorder) -> None:
    """A program that exits 0 before start_secs is EXITED, not retried as a failure."""
    await sup.start([agent("oneshot", "-c", "print('done')")])
    await rec.until(lambda: sup.get("oneshot").status is S.EXITED)
    assert S.BACKOFF not in rec.statuses("oneshot")


async def test_killed_agent_is_restarted(sup: Supervisor, rec: Recorder) -> None:
    """kill -9 of a running agent is a failure: on-failure restarts it with a new pid."""
    await sup.start([agent("victim", *SLEEPER)])
    await rec.until(lambda: sup.get("victim").status is S.RUNNING)
    old = sup.get("victim").pid
    os.kill(old, signal.SIGKILL)
    await rec.until(lambda: sup.get("victim").pid not in (0, old))
    exited = next(s for s in rec.changes if s.status is S.EXITED)
    assert exited.exit_code == -signal.SIGKILL
    assert "killed by SIGKILL" in exited.message


async def test_unknown_agent_and_bad_input(sup: Supervisor) -> None:
    """Unknown agents are NotFound; a bad op or max_bytes is InvalidArgument."""
    await sup.start([])
    with pytest.raises(NotFound, match="'ghost'"):
        await sup.operate("ghost", "start")
    with pytest.raises(NotFound):
        sup.get("ghost")
    with pytest.raises(NotFound):
        sup.read_log("ghost", 0, 10)


async def test_invalid_toml_spec_refused(tmp_path: Path) -> None:
    """start() refuses an invalid spec with a one-line error naming the field, starting nothing."""
    supervisor = make_supervisor(tmp_path)
    good = agent("good", *SLEEPER)
    bad = agent("bad", *SLEEPER, stop_timeout=-1.0)
    with pytest.raises(
        InvalidArgument, match=r"agents\[bad\]\.stop_timeout: must be 0\.\.604800 seconds"
    ):
        await supervisor.start([good, bad])
    assert supervisor.list() == []
    await supervisor.stop(stop_agents=True)


async def test_samples_cover_the_process_tree(sup: Supervisor, rec: Recorder) -> None:
    """The sampler reports the agent and its child as one tree, with memory and threads."""
    code = (
        "import subprocess, sys, time;"
        f"subprocess.Popen([{sys.executable!r}, '-c', 'import time; time.sleep(600)']);"
        "time.sleep(600)"
    )
    await sup.start([agent("tree", "-c", code)])
    await rec.until(lambda: any(s.processes == 2 for s in sup.samples("tree", 60)), within=15)
    sample = sup.samples("tree", 60)[-1]
    assert sample.rss > 1_000_000
    assert sample.vms >= sample.rss
    assert sample.threads >= 2
    assert sample.open_files >= 3
    assert sup.agent_for_pid(sup.get("tree").pid) == "tree"
    child = next(p for p in sup.sampler.tree_pids("tree") if p != sup.get("tree").pid)
    assert sup.agent_for_pid(child) == "tree"
    assert sup.agent_for_pid(os.getpid()) is None
    host = sup.host_sample()
    assert host.memory.total > 0
    assert host.disk.total > 0


async def test_log_rotation_with_a_live_writer(sup: Supervisor, rec: Recorder) -> None:
    """A chatty agent's log is rotated by size on the sampler tick; readers see `rotated`."""
    code = (
        "import itertools, time\n"
        "for i in itertools.count():\n"
        "    print(f'line {i:08d}', flush=True)\n"
        "    time.sleep(0.002)\n"
    )
    await sup.start([agent("chatty", "-c", code, log_max_bytes=2000, log_backups=2)])
    path = sup.log_path("chatty")
    backup1 = path.with_name("chatty.log.1")
    backup2 = path.with_name("chatty.log.2")
    await rec.until(lambda: backup2.exists(), within=20)
    lines = backup1.read_text().split()
    numbers = [int(n) for n in lines[1::2]]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # whole, in order
    assert len(backup1.read_bytes()) > 2000
    old_size = len(backup1.read_bytes())
    chunk = sup.read_log("chatty", old_size + 10_000_000, 100)
    assert chunk.rotated
    assert chunk.offset == 0
    assert chunk.data.startswith(b"line ")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs a root daemon")
async def test_agent_runs_as_its_user(sup: Supervisor, rec: Recorder) -> None:
    """With user set, the agent runs with that user's uid, gid and HOME, not the daemon's."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    spec = AgentSpec(
        id="asuser",
        argv=("/bin/sh", "-c", 'echo ids $(id -u) $(id -g) "$HOME"'),
        user="nobody",
        cwd="/",
        start_secs=0.0,
    )
    await sup.start([spec])
    await rec.until(lambda: b"ids" in sup.read_log("asuser", 0, 4096).data)
    line = sup.read_log("asuser", 0, 4096).data.decode().strip()
    assert line == f"ids {nobody.pw_uid} {nobody.pw_gid} {nobody.pw_dir}"


async def test_systemd_variables_are_not_inherited(
    sup: Supervisor, rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NOTIFY_SOCKET and friends address the daemon's unit; agents never see them."""
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("FLEET_TEST_INHERITED", "yes")
    code = (
        "import os;"
        "print('notify', os.environ.get('NOTIFY_SOCKET'),"
        " os.environ.get('FLEET_TEST_INHERITED'), flush=True)"
    )
    await sup.start([agent("envcheck", "-c", code)])
    await rec.until(lambda: b"notify" in sup.read_log("envcheck", 0, 4096).data)
    assert sup.read_log("envcheck", 0, 4096).data.strip() == b"notify None yes"


async def test_program_gone_at_spawn_time_backs_off_with_reason(
    sup: Supervisor, rec: Recorder, tmp_path: Path
) -> None:
    """A program deleted after validation fails to start: BACKOFF/FATAL saying why, no crash."""
    prog = script(tmp_path, "vanishing", "import time; time.sleep(600)")
    prog.chmod(0o755)
    runner = tmp_path / "run"
    runner.symlink_to(prog)
    spec = AgentSpec(
        id="gone",
        argv=(str(runner),),
        autostart=False,
        max_retries=1,
        backoff=BackoffSpec(initial=0.05, jitter=0.0),
    )
    await sup.start([spec])
    assert sup.get("gone").status is S.STOPPED
    runner.unlink()
    snap = await sup.operate("gone", "start")
    assert snap.status is S.BACKOFF
    assert snap.message.startswith("cannot start: program")
    await rec.until(lambda: sup.get("gone").status is S.FATAL)
    assert "2 times in a row; gave up" in sup.get("gone").message


async def test_a_chatty_log_is_rotated_within_seconds_of_a_slow_sample(
    tmp_path: Path, rec: Recorder
) -> None:
    """Log sizes are checked every second, not on the (here 30 s) sample tick: bounded disk."""
    sup = make_supervisor(tmp_path, rec, sample_interval=30.0)
    code = (
        "import sys, time\n"
        "sys.stdout.write(('y' * 99 + '\\n') * 3000)\n"  # 300 kB at once
        "sys.stdout.flush()\n"
        "time.sleep(60)\n"
    )
    try:
        await sup.start([agent("burst", "-c", code, log_max_bytes=20_000, log_backups=1)])
        backup = sup.log_path("burst").with_name("burst.log.1")
        await rec.until(backup.exists, within=5)
        assert backup.stat().st_size <= 2 * 20_000 + 200  # the newest 2x limit and a marker
        assert sup.log_path("burst").stat().st_size <= 20_000
    finally:
        await sup.stop(stop_agents=True)


_DAEMONIZES = (
    "sleep 300 & echo group $!; "  # a background child: stays in the agent's group
    "setsid sh -c 'sleep 301 & echo escaped $!'; "  # a double fork into a session of its own
    "sleep 0.5; {then}"
)


def _pids_in_log(sup: Supervisor, agent_id: str) -> list[int]:
    words = sup.read_log(agent_id, 0, 4096).data.decode().split()
    return [int(words[i + 1]) for i, w in enumerate(words) if w in ("group", "escaped")]


def _kill_leaked(pids: list[int]) -> None:
    """Clean up after a failing run: the sleeps would otherwise outlive the test."""
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


async def test_what_an_exited_agent_left_running_is_ended_and_named(
    sup: Supervisor, rec: Recorder
) -> None:
    """A program that daemonizes and exits leaks nothing: its group and setsid escapees end."""
    spec = AgentSpec(
        id="forker",
        argv=("/bin/sh", "-c", _DAEMONIZES.format(then="exit 0")),
        restart="never",
        start_secs=0.2,
        stop_timeout=2.0,
    )
    await sup.start([spec])
    await rec.until(lambda: sup.get("forker").status is S.EXITED)
    pids = _pids_in_log(sup, "forker")
    assert len(pids) == 2
    try:
        assert not any(alive(pid) for pid in pids)
    finally:
        _kill_leaked(pids)
    last_exit = sup.get("forker").last_exit
    assert last_exit is not None
    assert last_exit.reason.startswith("exited with code 0; it left 2 process(es) running, ended")
    assert all(f"{pid} (sleep)" in last_exit.reason for pid in pids)


async def test_stop_ends_a_setsid_escapee_too(sup: Supervisor, rec: Recorder) -> None:
    """An operator stop ends what escaped the agent's process group, not only the group."""
    spec = AgentSpec(
        id="keeper",
        argv=("/bin/sh", "-c", _DAEMONIZES.format(then="exec sleep 300")),
        start_secs=0.2,
        stop_timeout=2.0,
    )
    await sup.start([spec])
    await rec.until(lambda: len(_pids_in_log(sup, "keeper")) == 2)
    pids = _pids_in_log(sup, "keeper")
    stopped = await sup.operate("keeper", "stop")
    assert stopped.status is S.STOPPED
    try:
        assert not any(alive(pid) for pid in pids)
    finally:
        _kill_leaked(pids)
    assert stopped.last_exit is not None
    assert "it left 1 process(es) running" in stopped.last_exit.reason  # the escapee


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs a root daemon")
async def test_a_working_directory_its_user_may_not_enter_is_named(
    sup: Supervisor, rec: Recorder, tmp_path: Path
) -> None:
    """user = nobody in a 0700 root directory: start failed naming the directory, not a run."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    spec = AgentSpec(
        id="locked", argv=("/bin/pwd",), user="nobody", cwd=str(private), max_retries=0
    )
    await sup.start([spec])
    await rec.until(lambda: sup.get("locked").status is S.FATAL)
    last_exit = sup.get("locked").last_exit
    assert last_exit is not None
    assert last_exit.kind == "start_failed"
    # The first directory on the way it may not enter: pytest's own dirs are 0700 too.
    assert f"working directory {str(private)!r}: user 'nobody' may not enter '/tmp/" in (
        last_exit.reason
    )
    assert last_exit.reason.endswith(" (mode 0700, owner uid 0)")
    assert sup.read_log("locked", 0, 4096).data == b""  # it never ran
