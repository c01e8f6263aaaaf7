"""Output chunks group-committed with the target changes (JobUpdates), real SQLite and PG."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from fleet.errors import FailedPrecondition, NotFound, PermissionDenied, Unavailable
from manager.service.job_updates import Change, JobUpdates, Outcome, Upload
from manager.service.jobs import OutputAccepted, TargetState
from manager.storage import Database
from manager.storage.events import EventRepository
from manager.storage.jobs import JobRecord, JobRepository, JobTargetRecord, JobTx

JOB = "20261205-120000-000-abc123"
BOUND = 1024


async def _job(repo: JobRepository) -> None:
    async def body(tx: JobTx) -> None:
        await tx.add_job(
            JobRecord(id=JOB, name="t", spec="{}", actor="operator/t", created_ms=1),
            [
                JobTargetRecord(JOB, "n1", idx=0, state="RUNNING"),
                JobTargetRecord(JOB, "n2", idx=1, state="RUNNING"),
            ],
        )

    await repo.run(body)


async def _stored(repo: JobRepository, node_id: str) -> tuple[bytes, JobTargetRecord]:
    async def body(tx: JobTx) -> tuple[bytes, JobTargetRecord]:
        chunks = await tx.output(JOB, node_id, 0, 1 << 20)
        return b"".join(c.data for c in chunks), (await tx.targets(JOB, [node_id]))[node_id]

    return await repo.run(body, write=False)


def _acked(result: object) -> int:
    assert isinstance(result, OutputAccepted), result
    return result.acked


def _up(node_id: str, offset: int, data: bytes, job_id: str = JOB, bound: int = BOUND) -> Upload:
    return Upload(job_id, node_id, offset, data, bound=bound)


async def test_a_batch_of_uploads_stores_each_in_order_and_a_refused_one_fails_alone(
    database: Database,
) -> None:
    """One commit: contiguous chunks of a target land in order, a repeat is not stored
    twice, a gap / another node / an unknown job fail alone, a report in the same
    batch is applied; listeners hear only of the target whose state changed."""
    repo = JobRepository(database)
    await _job(repo)
    updates = JobUpdates(repo, clock=lambda: 1000.0)
    heard: list[Sequence[JobTargetRecord]] = []
    updates.listen(heard.append)
    items = [
        updates.submit_output(_up("n1", 0, b"abc")),
        updates.submit_output(_up("n1", 3, b"def")),
        updates.submit_output(_up("n1", 0, b"abcdef")),
        updates.submit_output(_up("n2", 5, b"gap")),
        updates.submit_output(_up("n2", 0, b"xy")),
        updates.submit_output(_up("n3", 0, b"other")),
        updates.submit_output(_up("n1", 0, b"x", job_id="20261205-120000-000-ffffff")),
        updates.submit(Change(JOB, "n2", "report", state=TargetState.SUCCESS)),
    ]
    waiting = [asyncio.ensure_future(i) for i in items]
    await asyncio.sleep(0)  # all queued before the committer starts: one batch
    updates.start()
    try:
        results = await asyncio.gather(*waiting, return_exceptions=True)
    finally:
        await updates.stop()
    assert updates.commits == 1
    assert [_acked(r) for r in results[:3]] == [3, 6, 6]
    assert isinstance(results[3], FailedPrecondition)
    assert "send from 0" in str(results[3])
    assert _acked(results[4]) == 2
    assert isinstance(results[5], PermissionDenied)
    assert isinstance(results[6], NotFound)
    assert isinstance(results[7], Outcome)
    assert results[7].applied
    data, n1 = await _stored(repo, "n1")
    assert (data, n1.output_stored_bytes, n1.truncated) == (b"abcdef", 6, False)
    data, n2 = await _stored(repo, "n2")
    assert (data, n2.output_stored_bytes, n2.state) == (b"xy", 2, "SUCCESS")
    assert [[(r.node_id, r.state, r.output_stored_bytes) for r in rows] for rows in heard] == [
        [("n2", "SUCCESS", 2)]
    ]


async def test_the_bound_cuts_a_chunk_and_later_ones_store_nothing(database: Database) -> None:
    """Past the bound a chunk is cut and the target marked truncated; a later chunk is
    answered truncated (stop sending) and stores nothing."""
    repo = JobRepository(database)
    await _job(repo)
    updates = JobUpdates(repo, clock=lambda: 1000.0)
    updates.start()
    try:
        first = await updates.submit_output(_up("n1", 0, b"abc", bound=4))
        cut = await updates.submit_output(_up("n1", 3, b"def", bound=4))
        after = await updates.submit_output(_up("n1", 6, b"ghi", bound=4))
    finally:
        await updates.stop()
    assert (first.acked, first.truncated) == (3, False)
    assert (cut.acked, cut.truncated) == (6, True)
    assert after.truncated
    data, n1 = await _stored(repo, "n1")
    assert (data, n1.output_stored_bytes, n1.truncated) == (b"abcd", 4, True)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_too_much_output_pending_is_unavailable_and_stores_nothing(
    database: Database,
) -> None:
    """Past max_pending_bytes queued, a chunk is refused at once (retry later); the
    queued one is stored, the refused one is not."""
    repo = JobRepository(database)
    await _job(repo)
    updates = JobUpdates(repo, clock=lambda: 1000.0, max_pending_bytes=5)
    queued = asyncio.ensure_future(updates.submit_output(_up("n1", 0, b"abcd")))
    await asyncio.sleep(0)
    with pytest.raises(Unavailable, match="too much job output pending"):
        await updates.submit_output(_up("n2", 0, b"wxyz"))
    updates.start()
    try:
        assert (await queued).acked == 4
        assert (await updates.submit_output(_up("n2", 0, b"wxyz"))).acked == 4  # room again
    finally:
        await updates.stop()
    assert (await _stored(repo, "n1"))[0] == b"abcd"
    assert (await _stored(repo, "n2"))[0] == b"wxyz"


async def test_an_end_answered_twice_stores_its_output_and_event_once(database: Database) -> None:
    """An end carried by a StartJob answer, submitted twice in one batch and once more in a
    later one: its output is stored once, the target ends once with one
    JOB_TARGET_FINISHED event, and the repeats change nothing (the same on SQLite's
    one-hop commit as on PostgreSQL's)."""
    repo = JobRepository(database)
    await _job(repo)
    events = EventRepository(database)
    before = await events.latest_id()
    updates = JobUpdates(repo, clock=lambda: 1000.0)
    heard: list[Sequence[JobTargetRecord]] = []
    updates.listen(heard.append)
    end = Change(
        JOB,
        "n1",
        "ended",
        state=TargetState.SUCCESS,
        exit_code=0,
        started_ms=999_000,
        ended_ms=999_500,
        steps='[{"state":"SUCCESS"}]',
        output_bytes=5,
        output=b"hello",
        bound=BOUND,
    )
    waiting = [asyncio.ensure_future(updates.submit(end)) for _ in range(2)]
    await asyncio.sleep(0)  # both queued before the committer starts: one batch
    updates.start()
    try:
        first, second = await asyncio.gather(*waiting)
        third = await updates.submit(end)
    finally:
        await updates.stop()
    assert updates.commits == 2
    assert (first.applied, second.applied, third.applied) == (True, False, False)
    assert third.target is not None
    assert third.target.state == "SUCCESS"
    data, n1 = await _stored(repo, "n1")
    assert (data, n1.state, n1.output_stored_bytes, n1.exit_code) == (b"hello", "SUCCESS", 5, 0)
    assert (n1.started_ms, n1.ended_ms, n1.steps) == (999_000, 999_500, '[{"state":"SUCCESS"}]')
    finished = await events.list_after(before, kinds=["JOB_TARGET_FINISHED"])
    assert [(e.node_id, e.message) for e in finished] == [
        ("n1", f"job {JOB} on n1: SUCCESS (exit 0)")
    ]
    assert [[(r.node_id, r.state) for r in rows] for rows in heard] == [[("n1", "SUCCESS")]]
