"""MetricWriter (bounded queue, group commit) against real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import func, select

from fleet.errors import ResourceExhausted, Unavailable
from manager.storage import Database, MetricBatch, MetricSample, MetricStore, MetricWriter
from manager.storage.schema import metric_samples
from manager.storage.writer import MAX_LINGER_SECONDS


def _batch(seq: int, n: int = 1, node: str = "n1") -> MetricBatch:
    return MetricBatch(
        node, seq, tuple(MetricSample("", "cpu", "usage", 1_000 + i, float(seq)) for i in range(n))
    )


async def _stored(db: Database) -> int:
    async with db.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(metric_samples)) or 0)


async def test_full_queue_is_resource_exhausted_and_stores_nothing(database: Database) -> None:
    """With the queue full the next submit fails at once and that batch never lands."""
    writer = MetricWriter(MetricStore(database), max_pending_batches=2)
    waiting = [asyncio.create_task(writer.submit(_batch(i))) for i in (1, 2)]
    await asyncio.sleep(0)  # let both enqueue (the writer is not started yet)
    assert writer.depth == 2
    with pytest.raises(ResourceExhausted, match="full"):
        await writer.submit(_batch(3))
    writer.start()
    assert await asyncio.gather(*waiting) == [True, True]
    await writer.stop()
    assert await _stored(database) == 2
    # Batch 3 was never stored: writing it now is not a duplicate.
    assert await MetricStore(database).write_batches([_batch(3)]) == [True]


async def test_concurrent_submits_share_commits_and_get_their_own_answer(
    database: Database,
) -> None:
    """Many concurrent submits are grouped into few commits; duplicates answer False."""
    writer = MetricWriter(MetricStore(database), max_rows_per_commit=1_000)
    writer.start()
    try:
        batches = [_batch(i, n=10) for i in range(200)] + [_batch(5, n=10)]
        results = await asyncio.gather(*(writer.submit(b) for b in batches))
    finally:
        await writer.stop()
    assert results.count(True) == 200
    assert results.count(False) == 1
    assert await _stored(database) == 2_000
    assert writer.commits < 100
    assert writer.depth == 0


async def test_a_batch_bigger_than_the_commit_limit_is_still_written(database: Database) -> None:
    """One batch larger than max_rows_per_commit is committed on its own."""
    writer = MetricWriter(MetricStore(database), max_rows_per_commit=5)
    writer.start()
    try:
        assert await writer.submit(_batch(1, n=12)) is True
    finally:
        await writer.stop()
    assert await _stored(database) == 12


async def test_stop_drains_everything_queued(database: Database) -> None:
    """stop() commits every queued batch before returning; later submits are refused."""
    writer = MetricWriter(MetricStore(database))
    waiting = [asyncio.create_task(writer.submit(_batch(i, n=3))) for i in range(50)]
    await asyncio.sleep(0)
    writer.start()
    await writer.stop()
    assert writer.depth == 0
    assert await _stored(database) == 150  # committed before stop() returned
    assert await asyncio.gather(*waiting) == [True] * 50
    with pytest.raises(Unavailable, match="shutting down"):
        await writer.submit(_batch(99))


async def test_stop_without_start_still_drains(database: Database) -> None:
    """A writer stopped before it ever started still commits what was queued."""
    writer = MetricWriter(MetricStore(database))
    waiting = asyncio.create_task(writer.submit(_batch(1)))
    await asyncio.sleep(0)
    await writer.stop()
    assert await waiting is True
    assert await _stored(database) == 1


async def test_linger_lets_a_trickle_of_batches_share_one_commit(database: Database) -> None:
    """Batches arriving one at a time within the linger go in one transaction, each
    acknowledged only once it is stored, and not before the first has waited the linger."""
    writer = MetricWriter(MetricStore(database), linger_seconds=MAX_LINGER_SECONDS)
    writer.start()
    try:
        started = time.monotonic()
        waiting = []
        for i in range(5):
            waiting.append(asyncio.create_task(writer.submit(_batch(i, n=2))))
            await asyncio.sleep(0)  # each queued on its own, as if from its own stream
        assert not any(t.done() for t in waiting)  # held back, not acknowledged yet
        assert await asyncio.gather(*waiting) == [True] * 5
        waited = time.monotonic() - started
    finally:
        await writer.stop()
    assert (writer.commits, writer.lingered) == (1, 1)
    assert await _stored(database) == 10
    assert waited >= MAX_LINGER_SECONDS  # the first batch waited its linger


async def test_a_full_group_does_not_wait_out_the_linger(database: Database) -> None:
    """Once the queued batches fill a commit, they go without waiting out the linger."""
    writer = MetricWriter(
        MetricStore(database), max_rows_per_commit=6, linger_seconds=MAX_LINGER_SECONDS
    )
    writer.start()
    try:
        first = asyncio.create_task(writer.submit(_batch(1, n=3)))
        await asyncio.sleep(0)
        assert not first.done()
        assert await writer.submit(_batch(2, n=3)) is True
        assert await first is True
    finally:
        await writer.stop()
    assert (writer.commits, writer.lingered) == (1, 0)


async def test_stop_does_not_wait_out_the_linger(database: Database) -> None:
    """stop() commits a lingering batch at once."""
    writer = MetricWriter(MetricStore(database), linger_seconds=MAX_LINGER_SECONDS)
    writer.start()
    waiting = asyncio.create_task(writer.submit(_batch(1)))
    await asyncio.sleep(0)
    assert not waiting.done()
    await writer.stop()
    assert await waiting is True
    assert (writer.commits, writer.lingered) == (1, 0)
    assert await _stored(database) == 1


@pytest.mark.parametrize("linger", [-0.1, 1.5])
async def test_linger_is_bounded(database: Database, linger: float) -> None:
    with pytest.raises(ValueError, match="linger_seconds"):
        MetricWriter(MetricStore(database), linger_seconds=linger)
