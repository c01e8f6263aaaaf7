"""WatchHub: a watcher keeps the latest row per target of its job only."""

from __future__ import annotations

import dataclasses

from manager.service.job_watch import WatchHub
from manager.storage.jobs import JobTargetRecord


def _row(job: str, node: str, state: str = "RUNNING", at: int = 0) -> JobTargetRecord:
    return JobTargetRecord(job_id=job, node_id=node, state=state, updated_ms=at)


async def test_a_watcher_keeps_one_row_per_target_of_its_job_the_latest() -> None:
    hub = WatchHub()
    with hub.subscribe("j1") as w, hub.subscribe("j2") as other:
        assert not w.news.is_set()
        for at in range(1000):  # a slow watcher: many commits before it looks
            hub.committed([_row("j1", "a", at=at), _row("j1", "b", at=at), _row("j3", "a")])
        assert w.news.is_set()
        assert w.take() == {"a": _row("j1", "a", at=999), "b": _row("j1", "b", at=999)}
        assert not w.news.is_set()
        assert w.take() == {}
        assert other.take() == {}
        done = dataclasses.replace(_row("j2", "a"), state="SUCCESS")
        hub.committed([done])
        assert other.take() == {"a": done}
    assert hub._watchers == {}  # left: nothing kept for them


async def test_two_watchers_of_a_job_both_hear_and_the_hub_forgets_them() -> None:
    hub = WatchHub()
    with hub.subscribe("j") as w1:
        with hub.subscribe("j") as w2:
            hub.committed([_row("j", "a")])
            assert w1.take() == w2.take() == {"a": _row("j", "a")}
        hub.committed([_row("j", "b")])
        assert w1.take() == {"b": _row("j", "b")}
    hub.committed([_row("j", "c")])  # no watcher: nothing kept
    assert hub._watchers == {}


async def test_the_hub_keeps_a_started_jobs_rows_as_committed_since() -> None:
    """A job started here is kept with its rows in their order, each commit's rows
    replacing the older ones; a forgotten or unknown job is not kept."""
    hub = WatchHub()
    assert hub.rows("j") is None
    hub.started("j", [_row("j", "a", "PENDING"), _row("j", "b", "PENDING")])
    hub.committed([_row("j", "b", "SUCCESS", at=5), _row("other", "a")])
    hub.committed([_row("j", "a", "RUNNING", at=6)])
    assert hub.rows("j") == (_row("j", "a", "RUNNING", at=6), _row("j", "b", "SUCCESS", at=5))
    assert hub.rows("other") is None
    hub.forget("j")
    assert hub.rows("j") is None
    hub.committed([_row("j", "a", "SUCCESS", at=7)])  # forgotten: not kept again
    assert hub.rows("j") is None


async def test_the_hub_keeps_the_newest_jobs_within_its_row_bound() -> None:
    """Past `max_rows` the oldest jobs are forgotten; a job larger than the bound is
    never kept (its watches read the database)."""
    hub = WatchHub(max_rows=4)
    hub.started("j1", [_row("j1", "a"), _row("j1", "b")])
    hub.started("j2", [_row("j2", "a"), _row("j2", "b")])
    hub.started("j3", [_row("j3", "a")])
    assert hub.rows("j1") is None
    assert hub.rows("j2") is not None
    assert hub.rows("j3") is not None
    hub.started("big", [_row("big", n) for n in "abcde"])
    assert hub.rows("big") is None
    assert hub.rows("j2") is not None
