"""Metric samples: deduplicated batch writes, 1-minute rollups, pruning, queries.

Rollups: `metric_rollup_state.rolled_until_ms` (the watermark) says every
sample with ts_ms below it is in `metric_rollups`. `rollup()` aggregates the
closed minutes from the watermark on and moves it forward in the same
transaction, so running it twice does nothing twice. A sample that arrives
late (ts below the watermark, e.g. a daemon's buffered batch after an
outage) is merged into its rollup row by `write_batches` itself, in the
writer's transaction: PostgreSQL writers share-lock the state row and
`rollup()` takes it exclusively, so no sample falls between the two.

Pruning never deletes raw samples at or above the watermark, so nothing is
deleted before it is rolled up. Queries read rollups for whole minutes below
the watermark when the step is a multiple of 60 s, and raw samples for the
rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal

from sqlalchemy import (
    ColumnClause,
    ColumnElement,
    delete,
    func,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from fleet.errors import InvalidArgument
from manager.storage.db import Database
from manager.storage.metric_series import list_series
from manager.storage.records import MetricBatch, MetricSeries
from manager.storage.schema import (
    metric_batches,
    metric_rollup_state,
    metric_rollups,
    metric_samples,
)
from manager.storage.sqlhelp import dialect_insert
from manager.storage.sqlite_hops import on_driver_thread

__all__ = ["MINUTE_MS", "Aggregate", "MetricStore"]

MINUTE_MS: Final = 60_000
Aggregate = Literal["avg", "min", "max"]
# How many minutes one rollup transaction covers when catching up.
_ROLLUP_CHUNK_MINUTES: Final = 60
_KEY = ("node_id", "agent_id", "type", "name")
_SAMPLE_COLUMNS: Final = (*_KEY, "ts_ms", "value")
_SampleRow = tuple[str, str, str, str, int, float]
# Batch keys per INSERT on SQLite: 3 parameters each, under its 32,766 per statement.
_KEYS_PER_STATEMENT: Final = 5_000


class _LateSamples(Exception):
    """A sample older than the watermark: the commit needs the rollup merge."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class MetricStore:
    """Persists and reads metric samples."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._least = func.min if db.dialect == "sqlite" else func.least
        self._greatest = func.max if db.dialect == "sqlite" else func.greatest
        marks = ", ".join("?" for _ in _SAMPLE_COLUMNS)  # SQLite only: PostgreSQL uses COPY
        self._insert_samples_sql = (
            f"INSERT INTO {metric_samples.name} ({', '.join(_SAMPLE_COLUMNS)}) VALUES ({marks})"  # noqa: S608 (constants only)
        )
        # SQLite only (the writer's lock is the database's: no row lock to share).
        self._watermark_sql = f"SELECT rolled_until_ms FROM {metric_rollup_state.name} WHERE id = 1"  # noqa: S608 (constants only)
        self._insert_keys_sql = (
            f"INSERT INTO {metric_batches.name} (node_id, sequence, received_ms) VALUES {{values}}"  # noqa: S608 (constants only)
            " ON CONFLICT (node_id, sequence) DO NOTHING RETURNING node_id, sequence"
        )
        # The physical row id both backends can delete by without an index.
        self._rowid: ColumnClause[Any] = literal_column(
            "rowid" if db.dialect == "sqlite" else "ctid"
        )

    async def write_batches(
        self, batches: Sequence[MetricBatch], *, now_ms: int | None = None
    ) -> list[bool]:
        """Store the batches in ONE transaction; per batch True=stored, False=duplicate.

        A batch is a duplicate if its (node_id, sequence) was stored before
        or appears earlier in this call. The dedupe keys are inserted with
        ON CONFLICT DO NOTHING ... RETURNING, so concurrent replicas racing
        on the same key store it exactly once. `now_ms` stamps the keys
        (default: the wall clock) for pruning.
        """
        received = _now_ms() if now_ms is None else now_ms
        first: dict[tuple[str, int], int] = {}
        for i, batch in enumerate(batches):
            first.setdefault((batch.node_id, batch.sequence), i)
        if not first:
            return []

        def samples(indexes: Sequence[int]) -> list[_SampleRow]:
            # Tuples in _SAMPLE_COLUMNS order straight to the driver: SQLAlchemy's
            # per-row parameter processing would cost about as much as the insert.
            return [
                (node_id, s.agent_id, s.type, s.name, s.timestamp_ms, s.value)
                for i in indexes
                for node_id in (batches[i].node_id,)
                for s in batches[i].samples
            ]

        # Sorted, so two replicas inserting overlapping keys lock them in the same
        # order instead of deadlocking.
        keys = sorted(first)
        if self._db.dialect == "sqlite":
            # The whole commit in one hop to aiosqlite's thread, unless a sample is older
            # than the watermark (after an outage): then through `body`, which merges it.
            with contextlib.suppress(_LateSamples):
                _, stored_idx, _ = await self._db.run_sqlite(
                    self._sqlite_write, keys, first, received, samples, True
                )
                stored = set(stored_idx)
                return [i in stored for i in range(len(batches))]

        async def body(conn: AsyncConnection) -> list[bool]:
            if self._db.dialect == "sqlite":
                watermark, stored_idx, rows = await on_driver_thread(
                    conn, self._sqlite_write, keys, first, received, samples, False
                )
            else:
                watermark = await self._watermark(conn, lock="share")
                ins = (
                    dialect_insert(self._db.dialect, metric_batches)
                    .on_conflict_do_nothing(index_elements=["node_id", "sequence"])
                    .returning(metric_batches.c.node_id, metric_batches.c.sequence)
                )
                result = await conn.execute(
                    ins, [{"node_id": n, "sequence": s, "received_ms": received} for n, s in keys]
                )
                stored_idx = sorted(first[(row.node_id, row.sequence)] for row in result)
                rows = samples(stored_idx)
                if rows:
                    await self._insert_samples(conn, rows)
            late = [r for r in rows if r[4] < watermark]
            if late:
                await self._merge_late(conn, late)
            stored = set(stored_idx)
            return [i in stored for i in range(len(batches))]

        return await self._db.run(body)

    def _sqlite_write(
        self,
        db: sqlite3.Connection,
        keys: list[tuple[str, int]],
        first: dict[tuple[str, int], int],
        received_ms: int,
        samples: Callable[[Sequence[int]], list[_SampleRow]],
        refuse_late: bool,
    ) -> tuple[int, list[int], list[_SampleRow]]:
        """SQLite, on aiosqlite's thread in the writer's transaction: the watermark, the
        batches whose keys were not stored before (their indexes), their samples inserted.
        `refuse_late`: raise _LateSamples (before inserting any) if a sample is older
        than the watermark.

        Through SQLAlchemy (its INSERT ... RETURNING over many parameter sets, its
        SELECT) and one hop per statement, a single-batch commit cost the loop ~1 ms;
        at a steady trickle of small batches that is most of the metric writer's work.
        """
        cur = db.execute(self._watermark_sql)
        try:
            (watermark,) = cur.fetchone() or (0,)
        finally:
            cur.close()
        stored: list[int] = []
        for at in range(0, len(keys), _KEYS_PER_STATEMENT):
            part = keys[at : at + _KEYS_PER_STATEMENT]
            params = [v for n, s in part for v in (n, s, received_ms)]
            sql = self._insert_keys_sql.format(values=", ".join(["(?, ?, ?)"] * len(part)))
            cur = db.execute(sql, params)
            try:
                stored += [first[(n, s)] for n, s in cur.fetchall()]
            finally:
                cur.close()
        stored.sort()
        rows = samples(stored)
        if refuse_late and any(r[4] < watermark for r in rows):
            raise _LateSamples
        if rows:
            db.executemany(self._insert_samples_sql, rows).close()
        return int(watermark or 0), stored, rows

    async def _insert_samples(self, conn: AsyncConnection, rows: list[_SampleRow]) -> None:
        """PostgreSQL (SQLite: `_sqlite_write`): COPY is several times faster than a
        prepared executemany. The transaction is already open (earlier statements of
        this body), so the rows commit or roll back with the dedupe keys."""
        raw = await conn.get_raw_connection()
        await raw.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
            metric_samples.name, records=rows, columns=_SAMPLE_COLUMNS
        )

    async def _watermark(
        self, conn: AsyncConnection, *, lock: Literal["share", "update", "none"]
    ) -> int:
        query = select(metric_rollup_state.c.rolled_until_ms).where(metric_rollup_state.c.id == 1)
        if lock == "share":
            query = query.with_for_update(read=True)
        elif lock == "update":
            query = query.with_for_update()
        value = await conn.scalar(query)
        return int(value or 0)

    async def _merge_late(self, conn: AsyncConnection, rows: list[_SampleRow]) -> None:
        """Fold samples older than the watermark into their rollup rows."""
        agg: dict[tuple[Any, ...], list[float]] = {}
        for node_id, agent_id, type_, name, ts_ms, value in rows:
            key = (node_id, agent_id, type_, name, ts_ms // MINUTE_MS * MINUTE_MS)
            v = float(value)
            cur = agg.get(key)
            if cur is None:
                agg[key] = [v, v, v, 1.0]
            else:
                cur[0] = min(cur[0], v)
                cur[1] = max(cur[1], v)
                cur[2] += v
                cur[3] += 1
        params = [
            {
                **dict(zip((*_KEY, "bucket_ms"), key, strict=True)),
                "min": mn,
                "max": mx,
                "sum": sm,
                "count": int(n),
            }
            for key, (mn, mx, sm, n) in agg.items()
        ]
        await conn.execute(self._merge_insert(), params)

    def _merge_insert(self) -> Any:
        ins = dialect_insert(self._db.dialect, metric_rollups)
        r = metric_rollups.c
        return ins.on_conflict_do_update(
            index_elements=["node_id", "type", "agent_id", "name", "bucket_ms"],
            set_={
                "min": self._least(r.min, ins.excluded.min),
                "max": self._greatest(r.max, ins.excluded.max),
                "sum": r.sum + ins.excluded.sum,
                "count": r.count + ins.excluded.count,
            },
        )

    async def rollup(self, *, now_ms: int) -> int:
        """Roll closed minutes up to min/max/sum/count rows; returns rows written.

        Idempotent: the watermark moves in the same transaction, so a second
        call with the same `now_ms` writes nothing.
        """
        upto = now_ms // MINUTE_MS * MINUTE_MS
        total = 0
        while True:
            written, done = await self._db.run(lambda conn: self._rollup_chunk(conn, upto))
            total += written
            if done:
                return total
            await asyncio.sleep(0)  # let other writers in between chunks

    async def _rollup_chunk(self, conn: AsyncConnection, upto: int) -> tuple[int, bool]:
        start = await self._watermark(conn, lock="update")
        # Skip empty stretches (a first run, or a gap in the data) in one step
        # instead of walking them chunk by chunk.
        following = await conn.scalar(
            select(func.min(metric_samples.c.ts_ms)).where(metric_samples.c.ts_ms >= start)
        )
        if following is None:
            start = max(start, upto)
        else:
            start = max(start, min(upto, int(following) // MINUTE_MS * MINUTE_MS))
        end = min(upto, start + _ROLLUP_CHUNK_MINUTES * MINUTE_MS)
        written = 0
        if end > start:
            s = metric_samples.c
            bucket = (s.ts_ms // MINUTE_MS) * MINUTE_MS
            source = (
                select(
                    s.node_id,
                    s.agent_id,
                    s.type,
                    s.name,
                    bucket.label("bucket_ms"),
                    func.min(s.value),
                    func.max(s.value),
                    func.sum(s.value),
                    func.count(),
                )
                .where(s.ts_ms >= start, s.ts_ms < end)
                .group_by(s.node_id, s.agent_id, s.type, s.name, bucket)
            )
            stmt = self._merge_insert()
            stmt = stmt.from_select([*_KEY, "bucket_ms", "min", "max", "sum", "count"], source)
            written = max((await conn.execute(stmt)).rowcount, 0)
        new_mark = max(end, start)
        await conn.execute(
            update(metric_rollup_state)
            .where(metric_rollup_state.c.id == 1)
            .values(rolled_until_ms=new_mark)
        )
        return written, new_mark >= upto

    async def series(self, node_id: str) -> list[MetricSeries]:
        """Every (agent, type, name) `node_id` has in raw samples or rollups, with its newest
        time; a few index seeks per series (see `manager.storage.metric_series`)."""

        async def body(conn: AsyncConnection) -> list[MetricSeries]:
            return await list_series(conn, node_id, await self._watermark(conn, lock="none"))

        return await self._db.run(body, write=False)

    async def host_figures(
        self, *, since_ms: int, names: Sequence[tuple[str, str]]
    ) -> dict[str, dict[tuple[str, str], tuple[float, float]]]:
        """Per node, per host (type, name) in `names`: (average, largest) of its raw samples
        at or after `since_ms`. One grouped query over the recent end of the ts_ms index."""

        async def body(
            conn: AsyncConnection,
        ) -> dict[str, dict[tuple[str, str], tuple[float, float]]]:
            m = metric_samples.c
            pairs = [(m.type == t) & (m.name == n) for t, n in names]
            # Grouped by an expression, not the column: on the column SQLite walks the
            # whole (node_id, type, ts_ms) index to save a sort, a cost growing with
            # retention; this way it reads only the window off the ts_ms index.
            node = m.node_id.concat("")
            rows = await conn.execute(
                select(node, m.type, m.name, func.avg(m.value), func.max(m.value))
                .where(m.ts_ms >= since_ms, m.agent_id == "", or_(*pairs))
                .group_by(node, m.type, m.name)
            )
            out: dict[str, dict[tuple[str, str], tuple[float, float]]] = {}
            for node_id, type_, name, avg, largest in rows:
                out.setdefault(node_id, {})[type_, name] = (float(avg), float(largest))
            return out

        return await self._db.run(body, write=False)

    async def rolled_until_ms(self) -> int:
        """The watermark: every sample older than this is in the rollups."""
        return await self._db.run(lambda conn: self._watermark(conn, lock="none"), write=False)

    async def prune(
        self,
        *,
        now_ms: int,
        raw_retention_ms: int,
        rollup_retention_ms: int,
        batch_size: int = 5000,
    ) -> int:
        """Delete data past retention in transactions of at most `batch_size` rows.

        Raw samples older than raw_retention (but never any not yet rolled
        up), rollups older than rollup_retention, and dedupe keys older than
        raw_retention. Returns the number of rows deleted.
        """
        if batch_size < 1:
            raise InvalidArgument(f"must be >= 1, got {batch_size}", field="batch_size")
        watermark = await self.rolled_until_ms()
        raw_cutoff = min(now_ms - raw_retention_ms, watermark)
        total = 0
        total += await self._prune_table(
            metric_samples.c.ts_ms < raw_cutoff, metric_samples, batch_size
        )
        total += await self._prune_table(
            metric_rollups.c.bucket_ms < now_ms - rollup_retention_ms, metric_rollups, batch_size
        )
        total += await self._prune_table(
            metric_batches.c.received_ms < now_ms - raw_retention_ms, metric_batches, batch_size
        )
        return total

    async def _prune_table(
        self, condition: ColumnElement[bool], table: Any, batch_size: int
    ) -> int:
        victims = select(self._rowid).select_from(table).where(condition).limit(batch_size)
        stmt = delete(table).where(self._rowid.in_(victims.scalar_subquery()))

        async def body(conn: AsyncConnection) -> int:
            return max((await conn.execute(stmt)).rowcount, 0)

        total = 0
        while True:
            deleted = await self._db.run(body)
            total += deleted
            if deleted < batch_size:
                return total
            await asyncio.sleep(0)

    async def query(
        self,
        *,
        node_id: str,
        agent_id: str,
        type: str,
        name: str,
        start_ms: int,
        end_ms: int,
        step_s: int,
        aggregate: Aggregate,
    ) -> dict[str, list[tuple[int, float]]]:
        """Samples in [start_ms, end_ms) aggregated into epoch-aligned step buckets.

        agent_id "" selects host-level samples; name "" selects every name of
        the type. Returns {name: [(bucket_start_ms, value), ...]} sorted by
        time. Whole minutes below the rollup watermark come from the rollups
        when step_s is a multiple of 60 (so they outlive raw retention); the
        rest from raw samples.
        """
        if step_s < 1:
            raise InvalidArgument(f"must be >= 1, got {step_s}", field="step_s")
        if end_ms <= start_ms:
            raise InvalidArgument(
                f"end ({end_ms}) must be after start ({start_ms})", field="end_ms"
            )
        if aggregate not in ("avg", "min", "max"):
            raise InvalidArgument(f"must be avg, min or max, got {aggregate!r}", field="aggregate")
        step_ms = step_s * 1000

        async def body(conn: AsyncConnection) -> dict[tuple[str, int], list[float]]:
            watermark = await self._watermark(conn, lock="none")
            ranges: list[tuple[str, int, int]] = []
            r_start = -(-start_ms // MINUTE_MS) * MINUTE_MS
            r_end = min(end_ms // MINUTE_MS * MINUTE_MS, watermark)
            if step_ms % MINUTE_MS == 0 and r_end > r_start:
                ranges += [("raw", start_ms, r_start), ("rollup", r_start, r_end)]
                ranges.append(("raw", r_end, end_ms))
            else:
                ranges.append(("raw", start_ms, end_ms))
            acc: dict[tuple[str, int], list[float]] = {}
            for source, lo, hi in ranges:
                if hi > lo:
                    for row in await conn.execute(
                        self._bucket_query(source, node_id, agent_id, type, name, lo, hi, step_ms)
                    ):
                        _merge(acc, (row[0], int(row[1])), row[2:])
            return acc

        acc = await self._db.run(body, write=False)
        out: dict[str, list[tuple[int, float]]] = {}
        for (metric, bucket), (mn, mx, sm, n) in sorted(acc.items()):
            value = mn if aggregate == "min" else mx if aggregate == "max" else sm / n
            out.setdefault(metric, []).append((bucket * step_ms, value))
        return out

    def _bucket_query(
        self,
        source: str,
        node_id: str,
        agent_id: str,
        type_: str,
        name: str,
        lo: int,
        hi: int,
        step_ms: int,
    ) -> Any:
        if source == "raw":
            t = metric_samples.c
            ts = t.ts_ms
            cols: tuple[Any, ...] = (
                func.min(t.value),
                func.max(t.value),
                func.sum(t.value),
                func.count(),
            )
        else:
            t = metric_rollups.c
            ts = t.bucket_ms
            cols = (func.min(t.min), func.max(t.max), func.sum(t.sum), func.sum(t.count))
        bucket = ts // step_ms
        query = (
            select(t.name, bucket, *cols)
            .where(
                t.node_id == node_id,
                t.type == type_,
                t.agent_id == agent_id,
                ts >= lo,
                ts < hi,
            )
            .group_by(t.name, bucket)
        )
        if name:
            query = query.where(t.name == name)
        return query


def _merge(acc: dict[tuple[str, int], list[float]], key: tuple[str, int], row: Any) -> None:
    mn, mx, sm, n = (float(row[0]), float(row[1]), float(row[2]), float(row[3]))
    cur = acc.get(key)
    if cur is None:
        acc[key] = [mn, mx, sm, n]
        return
    cur[0] = min(cur[0], mn)
    cur[1] = max(cur[1], mx)
    cur[2] += sm
    cur[3] += n
