"""JobRepository.add_job (one hop to aiosqlite's thread on SQLite, a JobTx on
PostgreSQL) stores what the JobTx path stores: the job, its targets, its audit entry
and its event."""

from __future__ import annotations

import pytest

from fleet.errors import InvalidArgument
from manager.storage.audit import AuditRepository
from manager.storage.db import Database
from manager.storage.events import EventRepository, event_row
from manager.storage.jobs import JobRecord, JobRepository, JobTargetRecord, JobTx


def _job(job_id: str) -> tuple[JobRecord, list[JobTargetRecord]]:
    record = JobRecord(
        id=job_id, name="n", spec='{"a": 1}', actor="operator/t", created_ms=5, concurrency=2
    )
    targets = [
        JobTargetRecord(job_id, "n2", idx=0, stage=0, updated_ms=5),
        JobTargetRecord(job_id, "n1", idx=1, stage=1, updated_ms=5, reason="why"),
    ]
    return record, targets


def _audit(job_id: str) -> dict[str, object]:
    return {
        "actor": "operator/t",
        "action": "job.run",
        "target": job_id + "x" * 400,  # cut to the column's width, with an ellipsis
        "detail": {"name": "n", "targets": "2"},
        "outcome": "ok",
        "now_ms": 5,
    }


def _event(job_id: str) -> dict[str, object]:
    return event_row(
        "JOB_STARTED",
        now_ms=5,
        actor="operator/t",
        message=f"job {job_id} started",
        attributes={"job_id": job_id},
    )


async def test_add_job_stores_what_the_transaction_stores(database: Database) -> None:
    repo = JobRepository(database)
    # The reference: the same rows through JobTx (SQLAlchemy on both backends).
    record, targets = _job("a")

    async def body(tx: JobTx) -> None:
        await tx.add_job(record, targets)
        tx.audit(**_audit("a"))  # type: ignore[arg-type]
        tx.queued_events.append(_event("a"))

    await repo.run(body)
    record_b, targets_b = _job("b")
    await repo.add_job(record_b, targets_b, audits=[_audit("b")], events=[_event("b")])

    stored_a, read_a = await repo.job_with_targets("a")
    stored_b, read_b = await repo.job_with_targets("b")
    assert stored_b == record_b
    assert list(read_b.values()) == targets_b
    assert (stored_a, list(read_a.values())) == (record, targets)

    audits = await AuditRepository(database).list_recent()
    assert [a.target[:1] for a in audits] == ["b", "a"]
    a_entry, b_entry = audits[1], audits[0]
    assert len(b_entry.target) == len(a_entry.target) == 300
    assert b_entry.target.endswith("...")
    assert (b_entry.actor, b_entry.action, b_entry.detail, b_entry.outcome) == (
        a_entry.actor,
        a_entry.action,
        a_entry.detail,
        a_entry.outcome,
    )
    assert b_entry.timestamp_ms == a_entry.timestamp_ms == 5

    events = await EventRepository(database).list_after(0, kinds=["JOB_STARTED"])
    assert [(e.message, e.attributes) for e in events] == [
        ("job a started", {"job_id": "a"}),
        ("job b started", {"job_id": "b"}),
    ]


async def test_add_job_twice_is_refused_and_stores_nothing_more(database: Database) -> None:
    repo = JobRepository(database)
    record, targets = _job("a")
    await repo.add_job(record, targets, audits=[_audit("a")], events=[_event("a")])
    with pytest.raises(InvalidArgument, match="rejected by the database"):
        await repo.add_job(record, targets, audits=[_audit("a")], events=[_event("a")])
    assert len(await AuditRepository(database).list_recent()) == 1
    assert len(await EventRepository(database).list_after(0, kinds=["JOB_STARTED"])) == 1
