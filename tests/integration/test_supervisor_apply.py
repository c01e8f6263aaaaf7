"""Pushed spec sets: add/change/remove, config-only changes, stale and invalid pushes, restarts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from supervisor_helpers import Recorder, agent, alive, make_supervisor, marker, processes_with

from daemon.supervisor.spec import AgentSpec
from daemon.supervisor.states import AgentStatus
from fleet.errors import FailedPrecondition, InvalidArgument

S = AgentStatus


def _sleeper(agent_id: str, mark: str, **kw: object) -> AgentSpec:
    return agent(agent_id, "-c", "import time; time.sleep(600)", mark, **kw)


async def test_pushed_set_runs_beside_the_hosts_own_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    """Pushes add, change (restart) and remove pushed agents; the host's own keep running."""
    m = {i: marker() for i in ("a", "b", "c", "toml")}
    sup = make_supervisor(tmp_path)
    try:
        await sup.start([_sleeper("toml", m["toml"])])
        toml_pid = sup.get("toml").pid
        first = await sup.apply(1, [_sleeper("a", m["a"]), _sleeper("b", m["b"])])
        assert (first.version, first.added, first.removed, first.refused) == (1, ("a", "b"), (), ())
        pid_a = sup.get("a").pid
        pid_b = sup.get("b").pid

        second = await sup.apply(2, [_sleeper("a", m["a"], env={"V": "2"}), _sleeper("c", m["c"])])
        assert (second.added, second.changed, second.removed) == (("c",), ("a",), ("b",))
        assert sup.get("a").pid not in (0, pid_a)
        assert not alive(pid_a)
        assert not alive(pid_b)
        assert [s.id for s in sup.list()] == ["a", "c", "toml"]
        assert sup.get("toml").pid == toml_pid
        after = {s.id: s.pid for s in sup.list()}
    finally:
        await sup.stop()  # daemon restart: agents keep running

    again = make_supervisor(tmp_path)
    try:
        await again.start([_sleeper("toml", m["toml"])])
        assert again.version == 2
        assert {s.id: s.pid for s in again.list()} == after
        assert all(len(processes_with(m[i])) == 1 for i in ("a", "c", "toml"))
        with pytest.raises(FailedPrecondition, match="stale spec version 1"):
            await again.apply(1, [])
        with pytest.raises(FailedPrecondition, match="stale spec version 2"):
            await again.apply(2, [])  # the same version with other specs
    finally:
        await again.stop(stop_agents=True)


async def test_the_same_push_again_is_a_no_op(tmp_path: Path) -> None:
    """A manager retrying a push whose answer it lost gets success and nothing restarts."""
    sup = make_supervisor(tmp_path)
    specs = [_sleeper("a", marker(), revision=3)]
    try:
        await sup.start([])
        await sup.apply(4, specs)
        pid = sup.get("a").pid
        again = await sup.apply(4, list(specs))
        assert (again.version, again.added, again.changed, again.reconfigured) == (4, (), (), ())
        assert sup.get("a").pid == pid
        assert sup.get("a").revision == 3
    finally:
        await sup.stop(stop_agents=True)


async def test_a_pushed_agent_the_host_defines_is_refused_until_the_host_drops_it(
    tmp_path: Path,
) -> None:
    """The host's own agent of the same id wins and keeps running; the push says why."""
    m = {i: marker() for i in ("host", "pushed", "other")}
    sup = make_supervisor(tmp_path)
    try:
        await sup.start([_sleeper("web", m["host"])], config_name="daemon.toml")
        host_pid = sup.get("web").pid
        result = await sup.apply(
            1, [_sleeper("web", m["pushed"], revision=7), _sleeper("other", m["other"])]
        )
        assert result.added == ("other",)
        [refusal] = result.refused
        assert (refusal.agent_id, refusal.revision) == ("web", 7)
        assert "defined in this host's daemon.toml" in refusal.reason
        assert sup.refused == result.refused
        assert sup.get("web").pid == host_pid
        assert sup.get("web").revision == 0
        assert processes_with(m["pushed"]) == []

        reloaded = await sup.reload([])  # the operator removes it from the host's config
        assert (reloaded.changed, reloaded.refused) == (("web",), ())
        assert not alive(host_pid)
        assert sup.get("web").revision == 7
        assert len(processes_with(m["pushed"])) == 1
    finally:
        await sup.stop(stop_agents=True)


async def test_a_pushed_agent_this_host_cannot_run_is_refused_alone(tmp_path: Path) -> None:
    """A program, user or directory missing here refuses that agent; the rest apply."""
    sup = make_supervisor(tmp_path)
    try:
        await sup.start([])
        bad = agent("b", "-c", "pass", cwd="/no/such/dir", revision=2)
        result = await sup.apply(1, [_sleeper("a", marker()), bad])
        assert result.added == ("a",)
        [refusal] = result.refused
        assert refusal.agent_id == "b"
        assert refusal.reason.startswith("cannot run here: ")
        assert "/no/such/dir" in refusal.reason
        assert [s.id for s in sup.list()] == ["a"]
    finally:
        await sup.stop(stop_agents=True)


async def test_stale_and_invalid_pushes_change_nothing(tmp_path: Path) -> None:
    """A stale version or a spec invalid anywhere is refused whole and changes nothing."""
    sup = make_supervisor(tmp_path)
    try:
        await sup.start([])
        await sup.apply(5, [_sleeper("a", marker())])
        before = sup.list()
        with pytest.raises(FailedPrecondition, match="already has version 5"):
            await sup.apply(4, [])
        bad = agent("b", "-c", "pass", stop_timeout=-1.0)
        with pytest.raises(InvalidArgument, match=r"stop_timeout"):
            await sup.apply(6, [_sleeper("a", marker()), bad])
        dup = [_sleeper("a", marker()), _sleeper("a", marker())]
        with pytest.raises(InvalidArgument, match="duplicate agent id 'a'"):
            await sup.apply(6, dup)
        assert sup.version == 5
        assert [(s.id, s.pid) for s in sup.list()] == [(s.id, s.pid) for s in before]
        assert '"version": 5' in (tmp_path / "state" / "update.json").read_text()
    finally:
        await sup.stop(stop_agents=True)


async def test_config_only_change_reaches_watchers_without_restart(tmp_path: Path) -> None:
    """Changing only config/labels reconfigures in place: same pid, config_version bumps."""
    rec = Recorder()
    sup = make_supervisor(tmp_path, rec)
    mark = marker()
    try:
        await sup.start([])
        await sup.apply(1, [_sleeper("a", mark, config='{"n": 1}')])
        pid = sup.get("a").pid
        payload, version = sup.config_of("a")
        assert payload == b'{"n": 1}'

        seen: list[tuple[bytes, int]] = []

        async def watch() -> None:
            async for item in sup.watch_config("a", version):
                seen.append(item)

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0)
        result = await sup.apply(2, [_sleeper("a", mark, config='{"n": 2}', labels={"tier": "x"})])
        assert (result.reconfigured, result.changed) == (("a",), ())
        await rec.until(lambda: len(seen) == 1)
        assert seen == [(b'{"n": 2}', version + 1)]
        snap = sup.get("a")
        assert (snap.pid, snap.config_version, snap.labels) == (pid, version + 1, {"tier": "x"})

        await sup.apply(3, [])  # removal ends the watch
        await asyncio.wait_for(watcher, 5)
    finally:
        await sup.stop(stop_agents=True)


async def test_reload_from_toml(tmp_path: Path) -> None:
    """SIGHUP reload restarts changed agents only and adds/removes the others."""
    m = {i: marker() for i in ("keep", "change", "drop", "new")}
    sup = make_supervisor(tmp_path)
    try:
        await sup.start([_sleeper(i, m[i]) for i in ("keep", "change", "drop")])
        before = {s.id: s.pid for s in sup.list()}
        result = await sup.reload(
            [
                _sleeper("keep", m["keep"]),
                _sleeper("change", m["change"], version="2"),
                _sleeper("new", m["new"]),
            ]
        )
        assert (result.added, result.changed, result.removed) == (("new",), ("change",), ("drop",))
        assert sup.get("keep").pid == before["keep"]
        assert sup.get("change").pid != before["change"]
        assert processes_with(m["drop"]) == []
    finally:
        await sup.stop(stop_agents=True)


async def test_a_start_secs_zero_agent_is_running_when_the_apply_returns(
    tmp_path: Path,
) -> None:
    """start_secs = 0: the spawn makes the agent RUNNING in one change, so the apply (and
    the PushUpdate answer built right after it) says RUNNING with a live pid; an agent with
    start_secs > 0 is still STARTING then. Restarts and exits keep one RUNNING change per
    spawn, never a STARTING one."""
    rec = Recorder()
    sup = make_supervisor(tmp_path, rec)
    try:
        await sup.apply(1, [_sleeper("now", marker(), start_secs=0.0), _sleeper("slow", marker())])
        now, slow = sup.get("now"), sup.get("slow")
        assert now.status is S.RUNNING
        assert alive(now.pid)
        assert now.message == f"running with pid {now.pid}"
        assert slow.status is S.STARTING  # start_secs 0.2: not proven yet
        await rec.until(lambda: sup.get("slow").status is S.RUNNING)
        assert rec.statuses("now") == [S.RUNNING]
        spawned = [c for c in rec.changes if c.id == "now" and c.pid]
        assert len({c.pid for c in spawned}) == 1

        await sup.operate("now", "restart")
        assert sup.get("now").status is S.RUNNING
        assert rec.statuses("now") == [S.RUNNING, S.STOPPING, S.STOPPED, S.RUNNING]

        # One that exits at once: RUNNING (it was spawned), then EXITED and restarted by
        # its policy, each spawn one RUNNING change; no illegal transition.
        quick = agent(
            "quick", "-c", "import time; time.sleep(0.1)", start_secs=0.0, restart="always"
        )
        await sup.apply(2, [quick])
        await rec.until(lambda: sup.get("quick").restart_count >= 2)
        seen = rec.statuses("quick")
        assert S.STARTING not in seen
        assert seen[:3] == [S.RUNNING, S.EXITED, S.RUNNING]
        assert S.UNKNOWN not in seen
    finally:
        await sup.stop(stop_agents=True)
