"""A group commit's decisions (`job_updates._apply`) on plain records: what both the
SQLite one-hop commit and the PostgreSQL one store and answer."""

from __future__ import annotations

from fleet.errors import FailedPrecondition, NotFound, PermissionDenied
from manager.service.job_updates import Change, Outcome, Upload, _apply
from manager.service.jobs import OutputAccepted
from manager.service.jobs import TargetState as T
from manager.storage.jobs import JobRecord, JobTargetRecord

JOB = "20261206-120000-000-abc123"


def _end(node_id: str) -> Change:
    return Change(JOB, node_id, "ended", state=T.SUCCESS, output=b"out", bound=10)


def test_a_batch_applies_in_order_stores_once_and_refuses_alone() -> None:
    """In one batch: an end stores its output and ends its target with one event, its
    repeat changes nothing, a chunk after it continues the output, a gap is refused,
    another node's or an unknown job's item gets no target; rows written are the changed
    ones, and listeners hear only of those whose state moved."""
    job = JobRecord(id=JOB, name="", spec="{}", actor="a", created_ms=1)
    current = {
        (JOB, "n1"): JobTargetRecord(JOB, "n1", idx=0, state="QUEUED"),
        (JOB, "n2"): JobTargetRecord(JOB, "n2", idx=1, state="RUNNING"),
    }
    items = [
        _end("n1"),
        _end("n1"),
        Upload(JOB, "n1", 3, b"more", bound=10),
        Upload(JOB, "n2", 2, b"gap", bound=10),
        Upload(JOB, "n2", 0, b"ok", bound=10),
        Change(JOB, "n9", "report", state=T.SUCCESS),
        Upload("20261206-120000-000-ffffff", "n1", 0, b"x", bound=10),
    ]
    events: list[dict[str, object]] = []
    applied = _apply(items, current, {JOB: job}, 1000, events)
    first, again, more, gap, ok, other, unknown = applied.results
    assert isinstance(first, Outcome)
    assert first.applied
    assert first.target is not None
    assert (first.target.state, first.target.output_stored_bytes) == ("SUCCESS", 3)
    assert isinstance(again, Outcome)
    assert not again.applied
    assert isinstance(more, OutputAccepted)
    assert more.acked == 7
    assert isinstance(gap, FailedPrecondition)
    assert isinstance(ok, OutputAccepted)
    assert ok.acked == 2
    assert other == Outcome(job, None)
    assert isinstance(unknown, NotFound)
    assert [(r.job_id, r.node_id, r.pos, r.data) for r in applied.output] == [
        (JOB, "n1", 0, b"out"),
        (JOB, "n1", 3, b"more"),
        (JOB, "n2", 0, b"ok"),
    ]
    assert sorted((r.node_id, r.state, r.output_stored_bytes) for r in applied.changed) == [
        ("n1", "SUCCESS", 7),
        ("n2", "RUNNING", 2),
    ]
    assert [(r.node_id, r.state) for r in applied.moved] == [("n1", "SUCCESS")]
    assert [(e["kind"], e["node_id"], e["actor"]) for e in events] == [
        ("JOB_TARGET_FINISHED", "n1", "node/n1")
    ]


def test_another_nodes_chunk_is_refused() -> None:
    """A chunk for a node that is not a target of an existing job: PermissionDenied, and
    nothing to store."""
    job = JobRecord(id=JOB, name="", spec="{}", actor="a", created_ms=1)
    applied = _apply([Upload(JOB, "n9", 0, b"x", bound=10)], {}, {JOB: job}, 1, [])
    assert isinstance(applied.results[0], PermissionDenied)
    assert (applied.output, applied.changed, applied.moved) == ([], [], [])
