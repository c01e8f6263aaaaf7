"""Daemon restarts never kill, lose or duplicate an agent; a reused pid is never adopted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest
from supervisor_helpers import Recorder, agent, alive, make_supervisor, marker, processes_with

from daemon.supervisor.persistence import PersistedAgent, StateStore
from daemon.supervisor.spec import AgentSpec, spec_to_dict
from daemon.supervisor.states import AgentStatus
from daemon.supervisor.supervisor import Supervisor
from fleet.errors import ConfigError

S = AgentStatus
ROOT = Path(__file__).resolve().parents[2]

RUNNER = """
import asyncio, json, sys
from pathlib import Path
from daemon.supervisor.spec import spec_from_dict
from daemon.supervisor.states import AgentStatus
from daemon.supervisor.supervisor import Supervisor
from fleet.errors import ConfigError

async def main() -> None:
    base = Path(sys.argv[1])
    specs = [spec_from_dict(s) for s in json.loads((base / "specs.json").read_text())]
    sup = Supervisor(state_dir=base / "state", log_dir=base / "logs",
                     socket_path=base / "agent.sock", sample_interval=0.1)
    await sup.start(specs)
    while not all(a.status is AgentStatus.RUNNING for a in sup.list()):
        await asyncio.sleep(0.05)
    pids = {a.id: a.pid for a in sup.list()}
    (base / "ready.tmp").write_text(json.dumps(pids))
    (base / "ready.tmp").rename(base / "ready.json")
    await asyncio.Event().wait()

asyncio.run(main())
"""


def _sleeper(agent_id: str, mark: str, **kw: object) -> AgentSpec:
    return agent(agent_id, "-c", "import time; time.sleep(600)", mark, **kw)


def _run_daemon_and_kill_9(tmp_path: Path, specs: list[AgentSpec]) -> dict[str, int]:
    """Run a Supervisor in a subprocess until its agents are RUNNING, then kill -9 it."""
    (tmp_path / "specs.json").write_text(json.dumps([spec_to_dict(s) for s in specs]))
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen([sys.executable, str(runner), str(tmp_path)], env=env) as daemon:
        ready = tmp_path / "ready.json"
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert daemon.poll() is None, "the supervisor subprocess died"
            assert time.monotonic() < deadline, "the supervisor subprocess never got ready"
            time.sleep(0.05)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    pids: dict[str, int] = json.loads(ready.read_text())
    return pids


@pytest.fixture
def rec() -> Recorder:
    """Records every snapshot the supervisor reports."""
    return Recorder()


@pytest.fixture
async def sup(tmp_path: Path, rec: Recorder) -> AsyncIterator[Supervisor]:
    """A supervisor on tmp_path's state dir that stops its agents at the end."""
    supervisor = make_supervisor(tmp_path, rec)
    yield supervisor
    await supervisor.stop(stop_agents=True)


async def test_kill_9_of_the_daemon_then_readoption(
    tmp_path: Path, sup: Supervisor, rec: Recorder
) -> None:
    """After kill -9 of the daemon, a new one re-adopts every agent with the same pid, no copy."""
    marks = {"one": marker(), "two": marker()}
    specs = [_sleeper(i, m) for i, m in marks.items()]
    pids = _run_daemon_and_kill_9(tmp_path, specs)
    for agent_id, mark in marks.items():
        assert [p.pid for p in processes_with(mark)] == [pids[agent_id]], "agent died with daemon"

    await sup.start(specs)

    for agent_id, mark in marks.items():
        snap = sup.get(agent_id)
        assert snap.status is S.RUNNING
        assert snap.pid == pids[agent_id]
        assert "re-adopted" in snap.message
        assert [p.pid for p in processes_with(mark)] == [pids[agent_id]]

    # The re-adopted agent is watched by pidfd: its death is noticed and it is restarted.
    os.kill(pids["one"], signal.SIGKILL)
    await rec.until(lambda: sup.get("one").pid not in (0, pids["one"]))
    exited = next(s for s in rec.changes if s.id == "one" and s.status is S.EXITED)
    assert exited.exit_code == -1
    assert "exit code unknown: agent was re-adopted" in exited.message
    assert len(processes_with(marks["one"])) == 1

    # And stopping a re-adopted (non-child) agent works too.
    snap = await sup.operate("two", "stop")
    assert snap.status is S.STOPPED
    assert not alive(pids["two"])


@pytest.fixture
def unrelated() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that has nothing to do with any agent."""
    with subprocess.Popen(["sleep", "600"]) as proc:
        yield proc
        proc.kill()


async def test_reused_pid_is_not_adopted(
    tmp_path: Path, sup: Supervisor, unrelated: subprocess.Popen[bytes]
) -> None:
    """A state file naming a live unrelated pid with another create time starts a fresh agent."""
    mark = marker()
    spec = _sleeper("a", mark)
    real = psutil.Process(unrelated.pid).create_time()
    StateStore(tmp_path / "state").save_agents(
        {
            "a": PersistedAgent(
                spec=spec,
                pid=unrelated.pid,
                create_time=real - 1000.0,
                process_hash=spec.process_hash(),
            )
        }
    )
    await sup.start([spec])
    snap = sup.get("a")
    assert snap.pid not in (0, unrelated.pid)
    assert [p.pid for p in processes_with(mark)] == [snap.pid]
    await sup.operate("a", "stop")
    assert unrelated.poll() is None, "the unrelated process was touched"


async def test_restart_with_changed_removed_and_operator_stopped_agents(tmp_path: Path) -> None:
    """Across a daemon restart: same spec keeps its pid, changed restarts, removed is stopped,
    an operator-stopped agent stays stopped."""
    marks = {i: marker() for i in ("same", "changed", "removed", "parked")}
    first = make_supervisor(tmp_path)
    await first.start([_sleeper(i, m) for i, m in marks.items()])
    await first.operate("parked", "stop")
    before = {s.id: s.pid for s in first.list()}
    await first.stop()  # the daemon goes away; agents keep running
    assert all(alive(before[i]) for i in ("same", "changed", "removed"))

    rec = Recorder()
    second = make_supervisor(tmp_path, rec)
    try:
        await second.start(
            [
                _sleeper("same", marks["same"]),
                _sleeper("changed", marks["changed"], env={"NEW": "1"}),
                _sleeper("parked", marks["parked"]),
            ]
        )
        assert second.get("same").pid == before["same"]
        changed = second.get("changed")
        assert changed.pid not in (0, before["changed"])
        assert not alive(before["changed"])
        assert [p.pid for p in processes_with(marks["changed"])] == [changed.pid]
        assert processes_with(marks["removed"]) == []
        assert [s.id for s in second.list()] == ["changed", "parked", "same"]
        assert second.get("parked").status is S.STOPPED
    finally:
        await second.stop(stop_agents=True)
    assert all(processes_with(m) == [] for m in marks.values())


async def test_state_file_is_written_atomically(tmp_path: Path, sup: Supervisor) -> None:
    """agents.json always parses and names the running pid and its create time."""
    await sup.start([_sleeper("a", marker())])
    path = tmp_path / "state" / "agents.json"
    await Recorder().until(lambda: json.loads(path.read_text())["agents"]["a"]["pid"] > 0)
    entry = json.loads(path.read_text())["agents"]["a"]
    assert entry["pid"] == sup.get("a").pid
    assert entry["create_time"] == pytest.approx(psutil.Process(entry["pid"]).create_time())
    assert not list((tmp_path / "state").glob(".*.tmp"))


@pytest.mark.parametrize("content", [b'{"agents": {"a": {"pid": 1}', b"[1, 2]", b'{"agents": 3}'])
async def test_unreadable_state_file_refuses_to_guess(
    tmp_path: Path, sup: Supervisor, content: bytes
) -> None:
    """A damaged agents.json stops start() with a clear error instead of starting second copies."""
    mark = marker()
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    (state / "agents.json").write_bytes(content)
    with pytest.raises(ConfigError, match=r"agents.json: unreadable daemon state .* move it away"):
        await sup.start([_sleeper("a", mark)])
    assert processes_with(mark) == []
