"""Jobs: their rows, their targets' rows, and the targets' output chunks.

The service layer decides; this module reads and writes. Work that must be
atomic (a job with its targets, a batch of target transitions with their
events) runs as one `JobRepository.run(body)`: the body gets a `JobTx`
whose methods are the only SQL it uses, and whose events and audit entries
are written last in the same transaction (see `events.py`). A body may be
run again on a transient error, so it must do nothing but call the tx.
"""

from __future__ import annotations

import builtins
import operator
import sqlite3
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from sqlalchemy import Insert, Select, Update, and_, bindparam, delete, func, insert, select, update
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from manager.storage.audit import audit_row, sqlite_insert_audit
from manager.storage.db import Database
from manager.storage.events import sqlite_insert_events
from manager.storage.queued import QueuedWrites
from manager.storage.schema import job_output, job_targets, jobs
from manager.storage.sqlhelp import chunks, grouped

__all__ = [
    "JobRecord",
    "JobRepository",
    "JobTargetRecord",
    "JobTx",
    "OutputChunk",
    "OutputRow",
    "sqlite_add_outputs",
    "sqlite_job",
    "sqlite_jobs",
    "sqlite_put_targets",
    "sqlite_targets_of",
]

T = TypeVar("T")


@dataclass(frozen=True)
class JobRecord:
    """A stored job."""

    id: str
    """Unique, time-ordered."""
    name: str
    """The spec's name (for lists)."""
    spec: str
    """The JobSpec message as JSON."""
    actor: str
    """Who started it ("operator/alice")."""
    created_ms: int
    """When it started."""
    ended_ms: int = 0
    """When its last target ended (0: live)."""
    state: str = "PENDING"
    """The derived job state (JobState name without its prefix)."""
    reason: str = ""
    """Why it ended early (cancelled by whom, canary failed, max_errors)."""
    rerun_of: str = ""
    """The job this one re-runs."""
    concurrency: int = 1
    """Targets running at once (max_concurrency resolved)."""
    cancelled_ms: int = 0
    """When an operator cancelled the whole job (0: not)."""


@dataclass(frozen=True)
class JobTargetRecord:
    """One node of a job."""

    job_id: str
    """The job."""
    node_id: str
    """The node."""
    idx: int = 0
    """Its place in the job (canary targets first)."""
    stage: int = 1
    """0: the canary stage; 1: the rest."""
    state: str = "PENDING"
    """JobTargetState name without its prefix."""
    exit_code: int = 0
    """Of the step that decided the result (-N: signal N)."""
    started_ms: int = 0
    """When it started on the node (the node's clock)."""
    ended_ms: int = 0
    """When it ended."""
    reason: str = ""
    """Why it failed, timed out, was cancelled, skipped or undeliverable."""
    steps: str = "[]"
    """The step results as JSON."""
    output_bytes: int = 0
    """Output the node reported writing."""
    output_stored_bytes: int = 0
    """Stored output ends here (chunks cover [0, this))."""
    truncated: bool = False
    """The output reached the manager's bound; the rest stays on the node."""
    cancel_requested: bool = False
    """An operator asked to cancel it."""
    attempts: int = 0
    """StartJob attempts that could not reach the node in a row."""
    last_error: str = ""
    """Why the last attempt failed."""
    next_attempt_ms: int = 0
    """No new attempt before this."""
    dispatched_ms: int = 0
    """When the node accepted it (0: not yet)."""
    updated_ms: int = 0
    """When the manager last changed it or heard of it."""


@dataclass(frozen=True)
class OutputChunk:
    """Stored output bytes of one target."""

    node_id: str
    """The target's node."""
    pos: int
    """Offset of `data`'s first byte in the target's output."""
    data: bytes
    """The bytes."""


@dataclass(frozen=True)
class OutputRow:
    """A chunk of output to store."""

    job_id: str
    """The job."""
    node_id: str
    """The target's node."""
    pos: int
    """Offset of `data`'s first byte in the target's output."""
    data: bytes
    """The bytes."""


_JOB_FIELDS = (
    "name", "spec", "actor", "created_ms", "ended_ms", "state", "reason", "rerun_of",
    "concurrency", "cancelled_ms",
)  # fmt: skip
_TARGET_FIELDS = (
    "idx", "stage", "state", "exit_code", "started_ms", "ended_ms", "reason", "steps",
    "output_bytes", "output_stored_bytes", "truncated", "cancel_requested", "attempts",
    "last_error", "next_attempt_ms", "dispatched_ms", "updated_ms",
)  # fmt: skip
# Every mutable column of a target, executemany; bind names must differ from columns.
_UPDATE_TARGET = (
    update(job_targets)
    .where(
        job_targets.c.job_id == bindparam("b_job_id"),
        job_targets.c.node_id == bindparam("b_node_id"),
    )
    .values(**{f: bindparam(f"b_{f}") for f in _TARGET_FIELDS if f not in ("idx", "stage")})
)


_INSERT_TARGET = insert(job_targets).values(
    {c.name: bindparam(f"b_{c.name}") for c in job_targets.columns}
)
_Many = tuple[str, Callable[[JobTargetRecord], tuple[Any, ...]]]
_MANY: dict[tuple[str, int], _Many] = {}


def _many(stmt: Insert | Update, dialect: Dialect) -> _Many:
    """`stmt` (binds named b_<field of JobTargetRecord>) as the dialect's SQL text and a
    function making a record its positional parameters: a job's target rows go to the
    driver's executemany as tuples, without SQLAlchemy's per-row parameter processing
    (the columns are text, integers and booleans, which both drivers take as they are)."""
    key = (dialect.name, id(stmt))
    found = _MANY.get(key)
    if found is None:
        compiled = stmt.compile(dialect=dialect)
        assert compiled.positiontup is not None  # qmark (SQLite), numeric_dollar (asyncpg)
        names = [n.removeprefix("b_") for n in compiled.positiontup]
        found = _MANY[key] = (compiled.string, operator.attrgetter(*names))
    return found


def _job(row: Any) -> JobRecord:
    return JobRecord(id=row.id, **{f: getattr(row, f) for f in _JOB_FIELDS})


assert [c.name for c in jobs.columns] == ["id", *_JOB_FIELDS]
assert [f.name for f in fields(JobRecord)] == ["id", *_JOB_FIELDS]


# A job's targets are read by the hundred per commit: rows map to records by position
# (the table and the dataclass list the same columns in the same order).
_TRUNCATED = _TARGET_FIELDS.index("truncated") + 2
assert _TARGET_FIELDS.index("cancel_requested") + 2 == _TRUNCATED + 1
assert [c.name for c in job_targets.columns] == ["job_id", "node_id", *_TARGET_FIELDS]
assert [f.name for f in fields(JobTargetRecord)] == ["job_id", "node_id", *_TARGET_FIELDS]


def _target(row: Any) -> JobTargetRecord:
    """A `select(job_targets)` row as its record."""
    values = list(row)
    values[_TRUNCATED] = bool(values[_TRUNCATED])
    values[_TRUNCATED + 1] = bool(values[_TRUNCATED + 1])
    return JobTargetRecord(*values)


# The group commit reads its targets and jobs by key in every transaction: as SQL text
# compiled once per dialect and list length, the values straight to the driver as a
# tuple (an expanding IN through SQLAlchemy's execute costs a cache key and its
# rendering on every call).


def _targets_in(n: int, locked: bool) -> Select[Any]:
    query = (
        select(job_targets)
        .where(job_targets.c.job_id == bindparam("b_0"))
        .where(job_targets.c.node_id.in_([bindparam(f"b_{i + 1}") for i in range(n)]))
        .order_by(job_targets.c.idx)
    )
    return query.with_for_update() if locked else query


def _jobs_in(n: int, locked: bool) -> Select[Any]:
    return select(jobs).where(jobs.c.id.in_([bindparam(f"b_{i}") for i in range(n)]))


_IN_SQL: dict[tuple[str, Callable[[int, bool], Select[Any]], int, bool], str] = {}


def _padded(values: Sequence[str]) -> tuple[str, ...]:
    """`values` (not empty) repeating its last to the next power of two: a few list
    lengths, so a few statements to compile (a repeated value in IN changes nothing)."""
    size = 1 << (len(values) - 1).bit_length()
    return (*values, *(values[-1],) * (size - len(values)))


def _in_sql(
    make: Callable[[int, bool], Select[Any]], n: int, dialect: Dialect, *, locked: bool = False
) -> str:
    """The SQL of `make(n, locked)` for `dialect`; its binds b_0, b_1 ... in order."""
    key = (dialect.name, make, n, locked)
    found = _IN_SQL.get(key)
    if found is None:
        compiled = make(n, locked).compile(dialect=dialect)
        # qmark (SQLite), numeric_dollar (asyncpg): the values go by position.
        names = compiled.positiontup or []
        assert names == [f"b_{i}" for i in range(len(names))]
        found = _IN_SQL[key] = compiled.string
    return found


# --- SQLite, a whole transaction in one hop (Database.run_sqlite) -----------------------------
# The group commit's reads and writes as plain sqlite3 calls on aiosqlite's thread, in the
# write transaction its connection holds (BEGIN IMMEDIATE took the write lock: nothing to
# lock row by row). The same statements as JobTx's, compiled once for SQLite.

_SQLITE = sqlite_dialect()


def sqlite_targets_of(
    db: sqlite3.Connection, keys: Collection[tuple[str, str]]
) -> dict[tuple[str, str], JobTargetRecord]:
    """`JobTx.targets_of` on aiosqlite's thread: the (job, node) targets that exist."""
    by_job = grouped(keys)
    out: dict[tuple[str, str], JobTargetRecord] = {}
    for job_id, node_ids in sorted(by_job.items()):
        for part in chunks(sorted(node_ids)):
            values = _padded(part)
            cur = db.execute(_in_sql(_targets_in, len(values), _SQLITE), (job_id, *values))
            try:
                for row in cur:
                    t = _target(row)
                    out[(job_id, t.node_id)] = t
            finally:
                cur.close()
    return out


def sqlite_jobs(db: sqlite3.Connection, job_ids: Collection[str]) -> dict[str, JobRecord]:
    """`JobTx.jobs` on aiosqlite's thread: the named jobs that exist."""
    out: dict[str, JobRecord] = {}
    for part in chunks(sorted(set(job_ids))):
        values = _padded(part)
        cur = db.execute(_in_sql(_jobs_in, len(values), _SQLITE), values)
        try:
            out.update((row[0], JobRecord(*row)) for row in cur)
        finally:
            cur.close()
    return out


def sqlite_put_targets(db: sqlite3.Connection, records: Sequence[JobTargetRecord]) -> None:
    """`JobTx.put_targets` on aiosqlite's thread (one executemany)."""
    if records:
        sql, row = _many(_UPDATE_TARGET, _SQLITE)
        db.executemany(sql, [row(t) for t in records]).close()


_JOB_SQLITE = str(select(jobs).where(jobs.c.id == bindparam("b_0")).compile(dialect=_SQLITE))
_TARGETS_SQLITE = str(
    select(job_targets)
    .where(job_targets.c.job_id == bindparam("b_0"))
    .order_by(job_targets.c.idx)
    .compile(dialect=_SQLITE)
)


def sqlite_job(
    db: sqlite3.Connection, job_id: str
) -> tuple[JobRecord | None, dict[str, JobTargetRecord]]:
    """A job and its targets by node in the job's order (`JobTx.job` and `JobTx.targets`)
    on aiosqlite's thread, for `Database.run_sqlite_read`; (None, {}) if there is no such job."""
    cur = db.execute(_JOB_SQLITE, (job_id,))
    try:
        row = cur.fetchone()
    finally:
        cur.close()
    if row is None:
        return None, {}
    cur = db.execute(_TARGETS_SQLITE, (job_id,))
    try:
        targets = {t.node_id: t for t in map(_target, cur)}
    finally:
        cur.close()
    return JobRecord(*row), targets


_INSERT_JOB_SQLITE = str(
    insert(jobs)
    .values({c.name: bindparam(f"b_{c.name}") for c in jobs.columns})
    .compile(dialect=_SQLITE)
)
_JOB_ROW = operator.attrgetter("id", *_JOB_FIELDS)  # the columns' order (asserted above)


def sqlite_add_job(
    db: sqlite3.Connection,
    job: JobRecord,
    targets: Sequence[JobTargetRecord],
    audits: Sequence[Mapping[str, Any]],
    events: Sequence[dict[str, Any]],
) -> None:
    """`JobRepository.add_job` on aiosqlite's thread: the job, its targets (one
    executemany), its audit rows and its event rows, in `Database.run_sqlite`'s
    transaction."""
    db.execute(_INSERT_JOB_SQLITE, _JOB_ROW(job)).close()
    if targets:
        sql, row = _many(_INSERT_TARGET, _SQLITE)
        db.executemany(sql, [row(t) for t in targets]).close()
    for entry in audits:
        sqlite_insert_audit(db, audit_row(**entry))
    sqlite_insert_events(db, events)


_COUNTS_SQLITE = str(
    select(job_targets.c.state, func.count())
    .where(job_targets.c.job_id == bindparam("b_0"))
    .group_by(job_targets.c.state)
    .compile(dialect=_SQLITE)
)
_UPDATE_JOB_SQLITE = (
    f"UPDATE {jobs.name} SET state = ?, reason = ?, ended_ms = ?, cancelled_ms = ?"  # noqa: S608
    " WHERE id = ?"
)


def sqlite_counts(db: sqlite3.Connection, job_id: str) -> dict[str, int]:
    """`JobTx.counts` of one job on aiosqlite's thread: its targets per state."""
    cur = db.execute(_COUNTS_SQLITE, (job_id,))
    try:
        return {state: int(n) for state, n in cur}
    finally:
        cur.close()


def sqlite_update_job(db: sqlite3.Connection, job: JobRecord) -> None:
    """`JobTx.update_job` on aiosqlite's thread."""
    db.execute(
        _UPDATE_JOB_SQLITE, (job.state, job.reason, job.ended_ms, job.cancelled_ms, job.id)
    ).close()


_INSERT_OUTPUT_SQLITE = (
    f"INSERT INTO {job_output.name} (job_id, node_id, pos, data) "  # noqa: S608 (constants only)
    "VALUES (?, ?, ?, ?)"
)


def sqlite_add_outputs(db: sqlite3.Connection, rows: Sequence[OutputRow]) -> None:
    """`JobTx.add_outputs` on aiosqlite's thread (one executemany; the bytes as they are)."""
    if rows:
        db.executemany(
            _INSERT_OUTPUT_SQLITE, [(r.job_id, r.node_id, r.pos, r.data) for r in rows]
        ).close()


class JobTx(QueuedWrites):
    """The reads and writes of one jobs transaction (see the module docstring)."""

    def __init__(self, conn: AsyncConnection, db: Database) -> None:
        super().__init__(conn)
        self._db = db

    # --- jobs ---------------------------------------------------------------------------------

    async def add_job(self, job: JobRecord, targets: Sequence[JobTargetRecord]) -> None:
        """Store a new job and its targets."""
        await self._conn.execute(
            insert(jobs).values(id=job.id, **{f: getattr(job, f) for f in _JOB_FIELDS})
        )
        sql, row = _many(_INSERT_TARGET, self._conn.dialect)
        for part in chunks(list(targets), 1000):
            await self._conn.exec_driver_sql(sql, [row(t) for t in part])

    async def job(self, job_id: str, *, for_update: bool = False) -> JobRecord | None:
        """One job, or None."""
        query = select(jobs).where(jobs.c.id == job_id)
        row = (await self._conn.execute(query.with_for_update() if for_update else query)).first()
        return _job(row) if row is not None else None

    async def jobs(self, job_ids: Collection[str]) -> dict[str, JobRecord]:
        """The named jobs that exist."""
        out: dict[str, JobRecord] = {}
        for part in chunks(sorted(set(job_ids))):
            values = _padded(part)
            sql = _in_sql(_jobs_in, len(values), self._conn.dialect)
            rows = await self._conn.exec_driver_sql(sql, values)
            out.update((r.id, _job(r)) for r in rows)
        return out

    async def list_jobs(
        self,
        *,
        states: Collection[str] = (),
        since_ms: int = 0,
        live: bool = False,
        limit: int = 100,
    ) -> builtins.list[JobRecord]:
        """Jobs newest first (in `states`; created at or after `since_ms`; only live ones)."""
        query = select(jobs).order_by(jobs.c.created_ms.desc(), jobs.c.id.desc()).limit(limit)
        if states:
            query = query.where(jobs.c.state.in_(sorted(set(states))))
        if since_ms:
            query = query.where(jobs.c.created_ms >= since_ms)
        if live:
            query = query.where(jobs.c.ended_ms == 0)
        return [_job(r) for r in await self._conn.execute(query)]

    async def update_job(self, job: JobRecord) -> None:
        """Replace a job's state, reason, end and cancel time."""
        await self._conn.execute(
            update(jobs)
            .where(jobs.c.id == job.id)
            .values(
                state=job.state,
                reason=job.reason,
                ended_ms=job.ended_ms,
                cancelled_ms=job.cancelled_ms,
            )
        )

    async def counts(self, job_ids: Collection[str]) -> dict[str, dict[str, int]]:
        """Per job: its targets per state."""
        out: dict[str, dict[str, int]] = {}
        for part in chunks(sorted(set(job_ids))):
            rows = await self._conn.execute(
                select(job_targets.c.job_id, job_targets.c.state, func.count())
                .where(job_targets.c.job_id.in_(part))
                .group_by(job_targets.c.job_id, job_targets.c.state)
            )
            for job_id, state, n in rows:
                out.setdefault(job_id, {})[state] = int(n)
        return out

    async def delete_jobs(self, job_ids: Collection[str]) -> None:
        """Delete jobs with their targets and output."""
        for part in chunks(sorted(set(job_ids))):
            await self._conn.execute(delete(job_output).where(job_output.c.job_id.in_(part)))
            await self._conn.execute(delete(job_targets).where(job_targets.c.job_id.in_(part)))
            await self._conn.execute(delete(jobs).where(jobs.c.id.in_(part)))

    async def ended_before(self, cutoff_ms: int, limit: int) -> builtins.list[str]:
        """Ids of jobs that ended before `cutoff_ms` (oldest first, at most `limit`)."""
        rows = await self._conn.execute(
            select(jobs.c.id)
            .where(jobs.c.ended_ms > 0, jobs.c.ended_ms < cutoff_ms)
            .order_by(jobs.c.ended_ms)
            .limit(limit)
        )
        return [r.id for r in rows]

    # --- targets ------------------------------------------------------------------------------

    async def rebase_active(self, step_ms: int, now_ms: int) -> int:
        """The wall clock was stepped by `step_ms`: QUEUED and RUNNING targets' `updated_ms`
        written before the step move with it (forwards: those at or before `now_ms - step_ms`;
        backwards: those after `now_ms`, which become `now_ms`), so the lost-node rule
        counts the time that passed. Returns how many moved."""
        active = job_targets.c.state.in_(("QUEUED", "RUNNING"))
        if step_ms > 0:
            stmt = (
                update(job_targets)
                .where(active, job_targets.c.updated_ms <= now_ms - step_ms)
                .values(updated_ms=job_targets.c.updated_ms + step_ms)
            )
        else:
            stmt = (
                update(job_targets)
                .where(active, job_targets.c.updated_ms > now_ms)
                .values(updated_ms=now_ms)
            )
        result = await self._conn.execute(stmt)
        return int(result.rowcount or 0)

    async def targets(
        self,
        job_id: str,
        node_ids: Collection[str] | None = None,
        *,
        for_update: bool = False,
    ) -> dict[str, JobTargetRecord]:
        """A job's targets by node in the job's order (all, or those named)."""
        query = select(job_targets).where(job_targets.c.job_id == job_id)
        query = query.order_by(job_targets.c.idx)
        if for_update:
            query = query.with_for_update()
        if node_ids is None:
            return {r.node_id: _target(r) for r in await self._conn.execute(query)}
        out: dict[str, JobTargetRecord] = {}
        for part in chunks(sorted(set(node_ids))):
            values = _padded(part)
            sql = _in_sql(_targets_in, len(values), self._conn.dialect, locked=for_update)
            rows = await self._conn.exec_driver_sql(sql, (job_id, *values))
            out.update((r.node_id, _target(r)) for r in rows)
        return out

    async def targets_of(
        self, keys: Collection[tuple[str, str]], *, for_update: bool = False
    ) -> dict[tuple[str, str], JobTargetRecord]:
        """The (job, node) targets that exist, by key."""
        by_job = grouped(keys)
        out: dict[tuple[str, str], JobTargetRecord] = {}
        for job_id, node_ids in sorted(by_job.items()):
            found = await self.targets(job_id, node_ids, for_update=for_update)
            out.update(((job_id, n), t) for n, t in found.items())
        return out

    async def put_targets(self, records: Sequence[JobTargetRecord]) -> None:
        """Replace stored targets' mutable fields (one statement, executemany)."""
        if records:
            sql, row = _many(_UPDATE_TARGET, self._conn.dialect)
            await self._conn.exec_driver_sql(sql, [row(t) for t in records])

    # --- output -------------------------------------------------------------------------------

    async def add_outputs(self, rows: Sequence[OutputRow]) -> None:
        """Store chunks (one statement, executemany; the caller keeps them contiguous)."""
        if rows:
            await self._conn.execute(
                insert(job_output),
                [
                    {"job_id": r.job_id, "node_id": r.node_id, "pos": r.pos, "data": r.data}
                    for r in rows
                ],
            )

    async def output(
        self, job_id: str, node_id: str, offset: int, max_bytes: int
    ) -> builtins.list[OutputChunk]:
        """Stored chunks covering bytes from `offset`, about `max_bytes` of them (at least
        one chunk if there is one); the first may start before `offset`."""
        first = await self._conn.scalar(
            select(func.max(job_output.c.pos)).where(
                job_output.c.job_id == job_id,
                job_output.c.node_id == node_id,
                job_output.c.pos <= offset,
            )
        )
        start = offset if first is None else int(first)
        rows = await self._conn.stream(
            select(job_output.c.pos, job_output.c.data)
            .where(
                and_(
                    job_output.c.job_id == job_id,
                    job_output.c.node_id == node_id,
                    job_output.c.pos >= start,
                )
            )
            .order_by(job_output.c.pos)
        )
        out: builtins.list[OutputChunk] = []
        size = 0
        async for pos, data in rows:
            out.append(OutputChunk(node_id, int(pos), bytes(data)))
            size += len(data)
            if size >= max_bytes:
                break
        await rows.close()
        return out


class JobRepository:
    """Runs jobs transactions (see the module docstring)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @property
    def db(self) -> Database:
        """The database (for its dialect and locks)."""
        return self._db

    async def run(self, body: Callable[[JobTx], Awaitable[T]], *, write: bool = True) -> T:
        """`body(tx)` in one transaction; its queued events and audit entries last."""

        async def wrapped(conn: AsyncConnection) -> T:
            tx = JobTx(conn, self._db)
            result = await body(tx)
            if write:
                await tx._finish()
            return result

        return await self._db.run(wrapped, write=write)

    async def add_job(
        self,
        job: JobRecord,
        targets: Sequence[JobTargetRecord],
        *,
        audits: Sequence[Mapping[str, Any]] = (),
        events: Sequence[dict[str, Any]] = (),
    ) -> None:
        """Store a new job, its targets, audit entries (`JobTx.audit`'s arguments) and
        events (`event_row`s) in one transaction; on SQLite in one hop to aiosqlite's
        thread (`sqlite_add_job`): starting a job on 500 nodes is otherwise ~6 hops
        and SQLAlchemy's statements on the event loop before the first target is sent."""
        if self._db.dialect == "sqlite":
            await self._db.run_sqlite(sqlite_add_job, job, targets, audits, events)
            return

        async def body(tx: JobTx) -> None:
            await tx.add_job(job, targets)
            for entry in audits:
                tx.audit(**entry)
            tx.queued_events.extend(events)

        await self.run(body)

    async def job_with_targets(
        self, job_id: str
    ) -> tuple[JobRecord | None, dict[str, JobTargetRecord]]:
        """A job and its targets by node, in one read transaction; (None, {}) if there is
        no such job. On SQLite in one hop, the rows made records on aiosqlite's thread
        (`sqlite_job`): a watch reads every target of a job while it runs."""
        if self._db.dialect == "sqlite":
            return await self._db.run_sqlite_read(sqlite_job, job_id)

        async def body(tx: JobTx) -> tuple[JobRecord | None, dict[str, JobTargetRecord]]:
            record = await tx.job(job_id)
            return record, (await tx.targets(job_id) if record is not None else {})

        return await self.run(body, write=False)
