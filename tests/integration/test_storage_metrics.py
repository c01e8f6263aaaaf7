"""MetricStore (dedupe, rollups, pruning, queries) against real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, func, select

from fleet.errors import InvalidArgument
from manager.storage import Database, MetricBatch, MetricSample, MetricStore
from manager.storage.schema import metric_rollups, metric_samples

M = 60_000  # one minute in ms


def _batch(seq: int, *samples: tuple[str, str, int, float], node: str = "n1") -> MetricBatch:
    """Samples as (type, name, ts_ms, value), host-level."""
    return MetricBatch(node, seq, tuple(MetricSample("", t, n, ts, v) for t, n, ts, v in samples))


async def _count(db: Database, table: Any) -> int:
    async with db.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(table)) or 0)


async def _query(store: MetricStore, step_s: int, aggregate: str, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "node_id": "n1",
        "agent_id": "",
        "type": "cpu",
        "name": "",
        "start_ms": 0,
        "end_ms": 10 * M,
        "step_s": step_s,
        "aggregate": aggregate,
    }
    args.update(kw)
    return await store.query(**args)


async def test_write_batches_dedupes_within_and_across_calls(database: Database) -> None:
    """A batch repeated in one call or retried later is stored once and reported False."""
    store = MetricStore(database)
    a = _batch(1, ("cpu", "usage", 1_000, 1.0), ("cpu", "usage", 2_000, 2.0))
    b = _batch(2, ("cpu", "usage", 3_000, 3.0))
    other_node = _batch(1, ("cpu", "usage", 1_000, 9.0), node="n2")
    assert await store.write_batches([a, b, a, other_node]) == [True, True, False, True]
    assert await store.write_batches([b, _batch(3, ("cpu", "usage", 4_000, 4.0)), a]) == [
        False,
        True,
        False,
    ]
    assert await _count(database, metric_samples) == 5
    assert await store.write_batches([]) == []


async def test_empty_batch_still_claims_its_sequence(database: Database) -> None:
    """A batch without samples is recorded, so its retry is a duplicate too."""
    store = MetricStore(database)
    assert await store.write_batches([_batch(7)]) == [True]
    assert await store.write_batches([_batch(7)]) == [False]


async def test_query_raw_buckets_by_step(database: Database) -> None:
    """Raw queries bucket by epoch-aligned steps and aggregate per name."""
    store = MetricStore(database)
    await store.write_batches(
        [
            _batch(
                1,
                ("cpu", "usage", 10_000, 1.0),
                ("cpu", "usage", 20_000, 3.0),
                ("cpu", "usage", 40_000, 10.0),
                ("cpu", "steal", 15_000, 0.5),
                ("memory", "rss", 15_000, 99.0),
            )
        ]
    )
    got = await _query(store, 30, "avg")
    assert got == {"steal": [(0, 0.5)], "usage": [(0, 2.0), (30_000, 10.0)]}
    assert await _query(store, 30, "max", name="usage") == {"usage": [(0, 3.0), (30_000, 10.0)]}
    assert await _query(store, 7, "min", name="usage", start_ms=15_000, end_ms=41_000) == {
        "usage": [(14_000, 3.0), (35_000, 10.0)]
    }
    assert await _query(store, 30, "avg", agent_id="some-agent") == {}


async def test_rollup_is_correct_and_idempotent(database: Database) -> None:
    """Closed minutes roll up to min/avg/max equal to the raw ones; a rerun adds nothing."""
    store = MetricStore(database)
    values = {0: [1.0, 5.0, 3.0], 1: [10.0, 20.0], 2: [7.0]}
    samples = [
        ("cpu", "usage", minute * M + i * 1_000, v)
        for minute, vs in values.items()
        for i, v in enumerate(vs)
    ]
    await store.write_batches([_batch(1, *samples)])
    raw = {agg: await _query(store, 60, agg) for agg in ("min", "avg", "max")}
    # Minute 2 is still open at now = 2m30s: only minutes 0 and 1 roll up.
    assert await store.rollup(now_ms=2 * M + 30_000) == 2
    assert await store.rolled_until_ms() == 2 * M
    assert await store.rollup(now_ms=2 * M + 30_000) == 0
    assert await _count(database, metric_rollups) == 2
    for agg in ("min", "avg", "max"):
        assert await _query(store, 60, agg) == raw[agg]
    assert raw["avg"] == {"usage": [(0, 3.0), (M, 15.0), (2 * M, 7.0)]}
    assert raw["min"]["usage"][0] == (0, 1.0)
    assert raw["max"]["usage"][1] == (M, 20.0)


async def test_rollups_outlive_raw_retention(database: Database) -> None:
    """After raw samples are pruned, minute-multiple steps still answer from rollups."""
    store = MetricStore(database)
    await store.write_batches(
        [
            _batch(
                1,
                ("cpu", "usage", 5_000, 2.0),
                ("cpu", "usage", 65_000, 4.0),
                ("cpu", "usage", 70_000, 8.0),
            )
        ]
    )
    await store.rollup(now_ms=3 * M)
    deleted = await store.prune(
        now_ms=10 * M, raw_retention_ms=M, rollup_retention_ms=100 * M, batch_size=100
    )
    assert deleted >= 3
    assert await _count(database, metric_samples) == 0
    assert await _query(store, 60, "avg") == {"usage": [(0, 2.0), (M, 6.0)]}
    assert await _query(store, 120, "max") == {"usage": [(0, 8.0)]}
    # A step that is not a whole number of minutes can only read raw: gone.
    assert await _query(store, 30, "avg") == {}


async def test_query_merges_rollups_with_recent_raw(database: Database) -> None:
    """A range spanning the rollup watermark combines rollups and raw into the same buckets."""
    store = MetricStore(database)
    await store.write_batches(
        [_batch(1, ("cpu", "usage", 10_000, 1.0), ("cpu", "usage", 70_000, 3.0))]
    )
    await store.rollup(now_ms=M + 1)  # only minute 0 is closed
    await store.write_batches([_batch(2, ("cpu", "usage", 80_000, 5.0))])
    assert await _query(store, 120, "avg") == {"usage": [(0, 3.0)]}
    assert await _query(store, 120, "min") == {"usage": [(0, 1.0)]}


async def test_late_samples_are_merged_into_rollups(database: Database) -> None:
    """A sample arriving after its minute was rolled up still counts in the rollup."""
    store = MetricStore(database)
    await store.write_batches([_batch(1, ("cpu", "usage", 10_000, 2.0))])
    await store.rollup(now_ms=5 * M)
    await store.write_batches(
        [_batch(2, ("cpu", "usage", 20_000, 6.0), ("cpu", "usage", 30_000, -1.0))]
    )
    await store.prune(now_ms=10 * M, raw_retention_ms=M, rollup_retention_ms=100 * M)
    assert await _count(database, metric_samples) == 0
    assert await _query(store, 60, "avg") == {"usage": [(0, 7.0 / 3)]}
    assert await _query(store, 60, "min") == {"usage": [(0, -1.0)]}
    assert await _query(store, 60, "max") == {"usage": [(0, 6.0)]}


@pytest.fixture
def deletes(database: Database) -> Iterator[list[int]]:
    """Row counts of every DELETE the engine runs during the test."""
    seen: list[int] = []

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            seen.append(cursor.rowcount)

    event.listen(database.engine.sync_engine, "after_cursor_execute", after)
    yield seen
    event.remove(database.engine.sync_engine, "after_cursor_execute", after)


async def test_prune_deletes_in_bounded_batches(database: Database, deletes: list[int]) -> None:
    """Pruning 25 old samples with batch_size 10 runs deletes of at most 10 rows each."""
    store = MetricStore(database)
    await store.write_batches([_batch(1, *[("cpu", "usage", i * 1_000, 1.0) for i in range(25)])])
    await store.write_batches([_batch(2, ("cpu", "usage", 9 * M, 1.0))], now_ms=9 * M)
    await store.rollup(now_ms=2 * M)
    deleted = await store.prune(
        now_ms=9 * M, raw_retention_ms=60_000, rollup_retention_ms=100 * M, batch_size=10
    )
    assert deleted == 25
    sample_deletes = [n for n in deletes if n > 0]
    assert sample_deletes == [10, 10, 5]
    assert await _count(database, metric_samples) == 1


async def test_prune_never_deletes_what_is_not_rolled_up(database: Database) -> None:
    """Raw samples past retention but above the rollup watermark are kept."""
    store = MetricStore(database)
    await store.write_batches([_batch(1, ("cpu", "usage", 1_000, 1.0))])
    assert await store.prune(now_ms=100 * M, raw_retention_ms=M, rollup_retention_ms=M) >= 0
    assert await _count(database, metric_samples) == 1
    await store.rollup(now_ms=100 * M)
    await store.prune(now_ms=100 * M, raw_retention_ms=M, rollup_retention_ms=200 * M)
    assert await _count(database, metric_samples) == 0
    assert await _count(database, metric_rollups) == 1
    await store.prune(now_ms=100 * M, raw_retention_ms=M, rollup_retention_ms=M)
    assert await _count(database, metric_rollups) == 0


async def test_prune_forgets_old_dedupe_keys(database: Database) -> None:
    """Dedupe keys older than raw retention are deleted; newer ones still dedupe."""
    store = MetricStore(database)
    await store.write_batches([_batch(1)], now_ms=1_000)
    await store.write_batches([_batch(2)], now_ms=50 * M)
    await store.prune(now_ms=60 * M, raw_retention_ms=30 * M, rollup_retention_ms=60 * M)
    assert await store.write_batches([_batch(1), _batch(2)], now_ms=60 * M) == [True, False]


async def test_query_rejects_bad_arguments(database: Database) -> None:
    """A zero step, an empty range or an unknown aggregate is InvalidArgument naming the field."""
    store = MetricStore(database)
    with pytest.raises(InvalidArgument, match="step_s"):
        await _query(store, 0, "avg")
    with pytest.raises(InvalidArgument, match="end_ms"):
        await _query(store, 60, "avg", start_ms=5, end_ms=5)
    with pytest.raises(InvalidArgument, match="aggregate"):
        await _query(store, 60, "median")


async def test_two_replicas_racing_on_the_same_batches_store_each_once(
    database: Database, database_url: str
) -> None:
    """Two Database handles writing the same batches at once store every batch exactly once."""
    other = await Database.open(database_url)
    try:
        batches = [_batch(seq, ("cpu", "usage", seq, 1.0)) for seq in range(200)]
        first, second = await asyncio.gather(
            MetricStore(database).write_batches(batches),
            MetricStore(other).write_batches(list(reversed(batches))),
        )
    finally:
        await other.close()
    for a, b in zip(first, reversed(second), strict=True):
        assert a != b  # exactly one of the two stored it
    assert await _count(database, metric_samples) == 200


async def test_rollup_jumps_over_gaps_in_the_data(database: Database) -> None:
    """Thirty days between two samples cost a couple of rollup transactions, not 720."""
    store = MetricStore(database)
    day = 24 * 60 * M
    await store.write_batches(
        [_batch(1, ("cpu", "usage", 1_000, 1.0), ("cpu", "usage", 30 * day, 2.0))]
    )
    marks: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE METRIC_ROLLUP_STATE"):
            marks.append(statement)

    event.listen(database.engine.sync_engine, "before_cursor_execute", record)
    try:
        assert await store.rollup(now_ms=30 * day + 5 * M) == 2
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", record)
    assert len(marks) <= 3
    assert await store.rolled_until_ms() == 30 * day + 5 * M
    assert await _query(store, 60, "avg", start_ms=30 * day, end_ms=30 * day + M) == {
        "usage": [(30 * day, 2.0)]
    }


async def test_series_lists_raw_and_rolled_up_series_with_their_newest_time(
    database: Database,
) -> None:
    """series() finds series kept only as rollups, only raw, or both, per agent, newest first."""
    store = MetricStore(database)
    await store.write_batches(
        [
            _batch(1, ("cpu", "usage", 5_000, 2.0), ("disk", "read_bytes", 70_000, 1.0)),
            MetricBatch("n1", 2, (MetricSample("web", "cpu", "usage", 75_000, 3.0),)),
            _batch(1, ("cpu", "usage", 5_000, 9.0), node="n2"),
        ]
    )
    await store.rollup(now_ms=2 * M)  # everything before 2 minutes is rolled up
    await store.prune(now_ms=10 * M, raw_retention_ms=M, rollup_retention_ms=100 * M)
    assert await _count(database, metric_samples) == 0  # only rollups are left
    await store.write_batches(
        [
            _batch(3, ("cpu", "usage", 9 * M + 1, 4.0), ("net", "bytes_sent", 9 * M + 2, 5.0)),
        ]
    )
    got = [(s.type, s.agent_id, s.name, s.newest_ms) for s in await store.series("n1")]
    assert got == [
        ("cpu", "", "usage", 9 * M + 1),  # rolled up and raw: the raw sample is newer
        ("cpu", "web", "usage", M),  # only in rollups: the start of its minute
        ("disk", "", "read_bytes", M),
        ("net", "", "bytes_sent", 9 * M + 2),  # only raw, not rolled up yet
    ]
    assert await store.series("nobody") == []
