"""Group commit of job target transitions and output: daemons' reports, uploads, the
driver's outcomes.

Every change of a target that comes from outside the operator's actions
goes through `JobUpdates.submit`: a daemon's ReportJobStatus, the answer
(or failure) of a StartJob the driver sent, a decision of the planner; and
every output chunk through `JobUpdates.submit_output`. One committer task
takes everything queued, and in ONE transaction reads the targets concerned
(locked), applies each item in the order it came (`merge`, pure: terminal
states are final, a stale change changes nothing; `accept_output`, pure:
offsets idempotent, a gap refused, the bound cuts), inserts the kept chunks
with one executemany, writes the changed rows with another, and appends a
`JOB_TARGET_FINISHED` event per target that ended. Each submitter then gets
its outcome; an item is acknowledged only after its transaction committed.
The committer gathers a batch before it commits (`group_commit.commit_delay`):
StartJob answers that carried their end wait up to 10 ms for others to join them
(their window slots were freed when they came), other answers up to 2 ms; a
report or an upload whose sender waits, a planner's decision the pass waits
for, and the answer that ends a job are committed at once.
An item that is refused (a gap, an unknown job, another node's target) fails
alone; the rest of its batch is stored. Listeners (the driver) hear of every
committed row whose state changed, so they never re-read a whole job per
report.

On SQLite the transaction is one synchronous function run on aiosqlite's
thread (`Database.run_sqlite`: plain sqlite3 reads by key and executemany,
one hop): the event loop, which also runs the StartJob calls, does not pay
SQLAlchemy's statements for it. The decisions are the same pure `_apply`
on both databases; PostgreSQL keeps its statements (row locks, the events
lock).

The earlier design's one transaction per target made a 500-target job 5.5x
slower than the raw StartJob calls, and one transaction per output chunk
(about 6 round trips to the database thread each, one at a time under
SQLite's write lock) held ingest to 0.12x of raw SQLite; here a batch costs
a few statements.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from fleet.errors import FailedPrecondition, FleetError, NotFound, PermissionDenied, Unavailable
from manager.service.group_commit import GroupCommitPolicy, commit_delay
from manager.service.jobs import (
    TERMINAL,
    OutputAccepted,
    TargetState,
    accept_output,
    job_state,
    transition_allowed,
)
from manager.storage.events import event_row, sqlite_insert_events
from manager.storage.jobs import (
    JobRecord,
    JobRepository,
    JobTargetRecord,
    JobTx,
    OutputRow,
    sqlite_add_outputs,
    sqlite_counts,
    sqlite_jobs,
    sqlite_put_targets,
    sqlite_targets_of,
    sqlite_update_job,
)

__all__ = [
    "Change",
    "ChangeKind",
    "JobUpdates",
    "Outcome",
    "Upload",
    "finished_message",
    "job_end",
    "merge",
]

log = logging.getLogger(__name__)

ChangeKind = Literal["report", "ended", "accepted", "unreachable", "decision"]


@dataclass(frozen=True)
class Change:
    """One change to one target."""

    job_id: str
    """The job."""
    node_id: str
    """The target's node."""
    kind: ChangeKind
    """report: the daemon says where it is; ended: StartJob answered with the job's end
    (a report, with the whole output); accepted: StartJob answered; unreachable:
    StartJob could not reach the node; decision: the planner moved it."""
    state: TargetState = TargetState.PENDING
    """The new state (report, accepted, decision)."""
    reason: str = ""
    """Why (failed, skipped, ...), or the error (unreachable)."""
    exit_code: int = 0
    """report: the deciding step's exit code."""
    started_ms: int = 0
    """report: when it started on the node."""
    ended_ms: int = 0
    """report: when it ended on the node."""
    steps: str | None = None
    """report: the step results as JSON."""
    output_bytes: int | None = None
    """report: output written so far."""
    next_attempt_ms: int = 0
    """unreachable: not before this."""
    output: bytes | None = None
    """ended: the job's whole output, stored from offset 0 in the same commit (before the
    end, so a finished target has its output)."""
    bound: int = 0
    """ended: bytes of output the manager keeps at most."""
    finish: str | None = None
    """Not None: the driver expects this to be the job's last target to end; if every
    target of the job is final once the batch is applied, the job ends in the same
    commit, with this reason if it has none (`job_end`). Else nothing more happens and
    the driver's pass ends it later."""


@dataclass(frozen=True)
class Upload:
    """A chunk of one target's output."""

    job_id: str
    """The job."""
    node_id: str
    """The target's node."""
    offset: int
    """Where `data` starts in the target's output."""
    data: bytes
    """The bytes (empty: asks where to resume)."""
    bound: int
    """Bytes of this output the manager keeps at most."""


@dataclass(frozen=True)
class Outcome:
    """What a change did."""

    job: JobRecord | None
    """The job (None: it does not exist)."""
    target: JobTargetRecord | None
    """The target after the change (None: the node is not a target of the job)."""
    applied: bool = False
    """The change was stored (False: stale, e.g. the target had ended)."""


_STATES: dict[str, TargetState] = {s.value: s for s in TargetState}
"""A stored state's member (not TargetState(value), ~0.3 us: merge runs per change)."""


def merge(current: JobTargetRecord, change: Change, now_ms: int) -> JobTargetRecord | None:
    """`current` with `change` applied, or None if the change is stale (pure)."""
    state = _STATES[current.state]
    if change.kind == "unreachable":
        if state is not TargetState.PENDING:
            return None
        return dataclasses.replace(
            current,
            attempts=current.attempts + 1,
            last_error=change.reason,
            next_attempt_ms=change.next_attempt_ms,
            updated_ms=now_ms,
        )
    new = change.state
    if change.kind == "accepted" and new in TERMINAL and new is not TargetState.FAILED:
        # A daemon that knows the job answers where it is; its report carries the
        # details (exit code, steps) and is on its way: wait for it as RUNNING.
        new = TargetState.RUNNING
    if change.kind == "accepted" and state is TargetState.RUNNING and new is TargetState.QUEUED:
        return None  # the report that it runs came first
    if not transition_allowed(state, new):
        return None
    # One replace per change: this runs for every report and StartJob answer.
    values: dict[str, object] = {"state": new.value, "updated_ms": now_ms}
    if change.kind == "accepted":
        values.update(attempts=0, last_error="", dispatched_ms=current.dispatched_ms or now_ms)
        if new is TargetState.FAILED:
            values.update(reason=change.reason, ended_ms=now_ms)
        return dataclasses.replace(current, **values)  # type: ignore[arg-type]
    if change.kind == "decision":
        values.update(reason=change.reason, ended_ms=now_ms if new in TERMINAL else 0)
        return dataclasses.replace(current, **values)  # type: ignore[arg-type]
    # A report, or an end carried by a StartJob answer (which the node also answered).
    if change.kind == "ended":
        values.update(attempts=0, last_error="")
    values.update(
        exit_code=change.exit_code,
        started_ms=change.started_ms or current.started_ms,
        ended_ms=change.ended_ms or (now_ms if new in TERMINAL else 0),
        reason=change.reason,
        dispatched_ms=current.dispatched_ms or now_ms,
    )
    if change.steps is not None:
        values["steps"] = change.steps
    if change.output_bytes is not None:
        values["output_bytes"] = max(current.output_bytes, change.output_bytes)
    if state is new and all(
        getattr(current, k) == v for k, v in values.items() if k != "updated_ms"
    ):
        return None  # a duplicate report
    return dataclasses.replace(current, **values)  # type: ignore[arg-type]


def finished_message(job_id: str, target: JobTargetRecord) -> str:
    """The JOB_TARGET_FINISHED event's message."""
    detail = f" (exit {target.exit_code})" if target.state in ("SUCCESS", "FAILED") else ""
    why = f": {target.reason}" if target.reason and target.state != "SUCCESS" else ""
    return f"job {job_id} on {target.node_id}: {target.state}{detail}{why}"[:2000]


_FINAL = frozenset(s.value for s in TERMINAL)


def job_end(
    stored: JobRecord, counts: Mapping[str, int], reason: str, now_ms: int
) -> tuple[JobRecord, dict[str, Any]] | None:
    """The job as it ends now with its targets counted per state, and its `JOB_FINISHED`
    event row; None if it ended already or a target is not final (pure)."""
    if stored.ended_ms or any(s not in _FINAL for s in counts):
        return None
    state = job_state(
        {_STATES[s]: n for s, n in counts.items()}, cancelled=bool(stored.cancelled_ms)
    )
    after = dataclasses.replace(
        stored, state=state.value, reason=stored.reason or reason, ended_ms=now_ms
    )
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    name = f" ({stored.name})" if stored.name else ""
    event = event_row(
        "JOB_FINISHED",
        now_ms=now_ms,
        actor="manager",
        message=f"job {stored.id}{name} finished: {state.value} ({summary})"
        + (f"; {after.reason}" if after.reason else ""),
        attributes={
            "job_id": stored.id,
            "state": state.value,
            **{s.lower(): str(n) for s, n in counts.items()},
        },
    )
    return after, event


_Result = Outcome | OutputAccepted


def _urgent(item: Change | Upload) -> bool:
    """Whether a caller blocks on `item`'s commit beyond its own answer: a daemon's report
    or upload (its sender waits for the acknowledgement), a planner's decision (the pass
    waits), the answer that ends its job. StartJob answers otherwise gather a batch."""
    if isinstance(item, Upload):
        return True
    return item.kind in ("report", "decision") or item.finish is not None


def _holds(item: Change | Upload) -> bool:
    """Whether `item`'s caller holds something until its commit (not urgent): a StartJob
    answer without the end keeps its window slot, a failed call its retry. An answer that
    carried the end freed its slot when it came; it may wait the longer bound."""
    return isinstance(item, Change) and item.kind in ("accepted", "unreachable")


@dataclass
class _Pending:
    item: Change | Upload
    at: float
    """When it was queued (the committer's monotonic clock)."""
    urgent: bool
    holds: bool
    """`_holds(item)`, and not urgent."""
    done: asyncio.Future[_Result] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class JobUpdates:
    """The bounded queue and single committer of target changes (module docstring)."""

    def __init__(
        self,
        repo: JobRepository,
        *,
        clock: Callable[[], float],
        monotonic: Callable[[], float] = time.monotonic,
        policy: GroupCommitPolicy | None = None,
        max_batch: int = 2000,
        max_pending: int = 100_000,
        max_batch_bytes: int = 8 * 1024 * 1024,
        max_pending_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self._repo = repo
        self._clock = clock
        self._monotonic = monotonic
        self._policy = policy or GroupCommitPolicy()
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._max_batch_bytes = max_batch_bytes
        self._max_pending_bytes = max_pending_bytes
        self._pending_bytes = 0  # output queued or being committed
        self._queue: collections.deque[_Pending] = collections.deque()
        self._urgent = 0  # urgent items queued
        self._holding: collections.deque[float] = collections.deque()
        """When each queued item that holds something was queued, oldest first."""
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._listeners: list[Callable[[Sequence[JobTargetRecord]], None]] = []
        self._row_listeners: list[Callable[[Sequence[JobTargetRecord]], None]] = []
        self.commits = 0
        """Transactions committed so far."""

    def listen(self, callback: Callable[[Sequence[JobTargetRecord]], None]) -> None:
        """Call `callback(rows)` with the changed rows after each commit."""
        self._listeners.append(callback)

    def listen_rows(self, callback: Callable[[Sequence[JobTargetRecord]], None]) -> None:
        """Call `callback(rows)` with every row written (output's end too) after each commit."""
        self._row_listeners.append(callback)

    def start(self) -> None:
        """Start the committer (from the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="job-updates")

    async def stop(self) -> None:
        """Commit what is queued, then end."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None
        while self._queue:
            await self._commit_next()

    async def submit(self, change: Change) -> Outcome:
        """Queue `change` and wait until it is committed; its outcome."""
        result = await self._enqueue(change)
        assert isinstance(result, Outcome)
        return result

    async def submit_output(self, upload: Upload) -> OutputAccepted:
        """Queue an output chunk and wait until it is committed; what was kept.

        NotFound (no such job), PermissionDenied (the node is not its target),
        FailedPrecondition (the chunk would leave a gap): nothing of it stored."""
        if self._pending_bytes + len(upload.data) > self._max_pending_bytes:
            raise Unavailable("too much job output pending; retry shortly")
        result = await self._enqueue(upload)
        assert isinstance(result, OutputAccepted)
        return result

    async def _enqueue(self, item: Change | Upload) -> _Result:
        if self._stopping:
            raise Unavailable("the manager is shutting down; retry on another manager")
        if len(self._queue) >= self._max_pending:
            raise Unavailable("too many job updates pending; retry shortly")
        urgent = _urgent(item)
        holds = not urgent and _holds(item)
        pending = _Pending(item, self._monotonic(), urgent, holds)
        pending.done.add_done_callback(_consume)
        if isinstance(item, Upload):
            size = len(item.data)
            self._pending_bytes += size
            pending.done.add_done_callback(lambda _: self._release(size))
        self._queue.append(pending)
        if urgent:
            self._urgent += 1
        first_holding = holds and not self._holding
        if holds:
            self._holding.append(pending.at)
        # Wake the committer only when its decision may have moved (the first item starts
        # the wait, the first that holds a slot may shorten it): not a task switch per
        # answer while it gathers a batch.
        if (
            urgent
            or first_holding
            or len(self._queue) == 1
            or len(self._queue) >= self._policy.batch
        ):
            self._wakeup.set()
        if isinstance(item, Change):
            # A caller that gives up cancels only its own future: the change stays queued
            # and is committed with its batch (the committer skips a done future). No
            # shield: one future and one loop turn less for every answer and report.
            return await pending.done
        # shield: the output's bytes are counted pending until its commit, given up or not.
        return await asyncio.shield(pending.done)

    def _release(self, size: int) -> None:
        self._pending_bytes -= size

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            delay = commit_delay(
                len(self._queue),
                self._urgent > 0 or self._stopping,
                self._queue[0].at,
                self._monotonic(),
                self._policy,
                self._holding[0] if self._holding else None,
            )
            if delay:
                # Gather a batch; an urgent item or a full batch wakes this sooner.
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wakeup.wait()
                continue
            await self._commit_next()

    async def _commit_next(self) -> None:
        group: list[_Pending] = []
        size = 0
        while self._queue and len(group) < self._max_batch:
            item = self._queue[0].item
            if isinstance(item, Upload):
                # Bound the transaction's bytes (one chunk always goes).
                if group and size + len(item.data) > self._max_batch_bytes:
                    break
                size += len(item.data)
            taken = self._queue.popleft()
            if taken.urgent:
                self._urgent -= 1
            if taken.holds:
                self._holding.popleft()  # the oldest: the queue is in order
            group.append(taken)
        now_ms = int(self._clock() * 1000)
        items = [p.item for p in group]
        keys = {(c.job_id, c.node_id) for c in items}
        # Jobs whose last target the driver expects in this batch (Change.finish).
        finishing = {
            c.job_id: c.finish for c in items if isinstance(c, Change) and c.finish is not None
        }

        async def body(tx: JobTx) -> _Applied:
            # A job to end is locked before its targets, in CancelJob's order (no deadlock).
            locked = {job_id: await tx.job(job_id, for_update=True) for job_id in sorted(finishing)}
            current = await tx.targets_of(keys, for_update=True)
            jobs = await tx.jobs({job_id for job_id, _ in keys})
            applied = _apply(items, current, jobs, now_ms, tx.queued_events)
            await tx.add_outputs(applied.output)
            await tx.put_targets(applied.changed)
            for job_id, reason in finishing.items():
                stored = locked[job_id]
                counts = (await tx.counts([job_id])).get(job_id, {})
                end = job_end(stored, counts, reason, now_ms) if stored is not None else None
                if end is not None:
                    await tx.update_job(end[0])
                    tx.queued_events.append(end[1])
                    applied.ended[job_id] = end[0]
            return applied

        def sqlite_body(db: sqlite3.Connection) -> _Applied:
            # The same transaction on aiosqlite's thread in one hop (Database.run_sqlite):
            # plain sqlite3, none of SQLAlchemy's per-statement work on the event loop.
            current = sqlite_targets_of(db, keys)
            jobs = sqlite_jobs(db, {job_id for job_id, _ in keys})
            events: list[dict[str, Any]] = []
            applied = _apply(items, current, jobs, now_ms, events)
            sqlite_add_outputs(db, applied.output)
            sqlite_put_targets(db, applied.changed)
            for job_id, reason in finishing.items():
                stored = jobs.get(job_id)  # read under this transaction's write lock
                counts = sqlite_counts(db, job_id)
                end = job_end(stored, counts, reason, now_ms) if stored is not None else None
                if end is not None:
                    sqlite_update_job(db, end[0])
                    events.append(end[1])
                    applied.ended[job_id] = end[0]
            sqlite_insert_events(db, events)
            return applied

        try:
            database = self._repo.db
            if database.dialect == "sqlite":
                applied = await database.run_sqlite(sqlite_body)
            else:
                applied = await self._repo.run(body)
        except Exception as exc:
            if not isinstance(exc, FleetError):
                log.exception("job update commit failed")
            for p in group:
                if not p.done.done():
                    p.done.set_exception(exc)
            return
        results, rows = applied.results, applied.moved
        self.commits += 1
        if rows:
            for listener in self._listeners:
                try:
                    listener(rows)
                except Exception:
                    log.exception("job update listener failed")
        if applied.changed:
            for listener in self._row_listeners:
                try:
                    listener(applied.changed)
                except Exception:
                    log.exception("job update listener failed")
        for p, result in zip(group, results, strict=True):
            if p.done.done():
                continue
            if isinstance(result, Outcome) and result.job is not None:
                ended = applied.ended.get(result.job.id)
                if ended is not None:  # the job ended in this commit
                    result = dataclasses.replace(result, job=ended)
            if isinstance(result, FleetError):
                p.done.set_exception(result)
            else:
                p.done.set_result(result)


@dataclass
class _Applied:
    """What one batch did, decided inside its transaction (`_apply`)."""

    results: list[_Result | FleetError]
    """Per item, in order: its outcome, or why it was refused."""
    changed: list[JobTargetRecord]
    """The target rows to write."""
    moved: list[JobTargetRecord]
    """Those of them whose state or delivery changed (for the listeners)."""
    output: list[OutputRow]
    """The chunks to insert."""
    ended: dict[str, JobRecord] = field(default_factory=dict)
    """Jobs ended in the same commit (`Change.finish`), as stored."""


def _apply(
    items: Sequence[Change | Upload],
    current: dict[tuple[str, str], JobTargetRecord],
    jobs: dict[str, JobRecord],
    now_ms: int,
    events: list[dict[str, Any]],
) -> _Applied:
    """Apply a batch, in order, to the targets and jobs it read (pure but for appending a
    `JOB_TARGET_FINISHED` event row to `events` per target that ended)."""
    results: list[_Result | FleetError] = []
    changed: dict[tuple[str, str], JobTargetRecord] = {}
    moved: set[tuple[str, str]] = set()  # keys whose state or delivery changed
    output: list[OutputRow] = []
    for c in items:
        key = (c.job_id, c.node_id)
        target = changed.get(key) or current.get(key)
        job = jobs.get(c.job_id)
        if isinstance(c, Upload):
            results.append(_upload(c, job, target, changed, output, now_ms))
            continue
        if job is None or target is None:
            results.append(Outcome(job, None))
            continue
        if c.output is not None:
            # Offset 0 and idempotent: an end answered twice stores it once.
            up = Upload(c.job_id, c.node_id, 0, c.output, c.bound)
            _upload(up, job, target, changed, output, now_ms)
            target = changed.get(key) or target
        after = merge(target, c, now_ms)
        if after is None:
            results.append(Outcome(job, target))
            continue
        changed[key] = after
        moved.add(key)
        results.append(Outcome(job, after, applied=True))
        if after.state in TERMINAL and target.state not in TERMINAL:
            events.append(
                event_row(
                    "JOB_TARGET_FINISHED",
                    now_ms=now_ms,
                    node_id=c.node_id,
                    actor=f"node/{c.node_id}" if c.kind in ("report", "ended") else "manager",
                    message=finished_message(c.job_id, after),
                    attributes={"job_id": c.job_id, "state": after.state},
                )
            )
    return _Applied(
        results,
        list(changed.values()),
        [r for k, r in changed.items() if k in moved],
        output,
    )


def _upload(
    up: Upload,
    job: JobRecord | None,
    target: JobTargetRecord | None,
    changed: dict[tuple[str, str], JobTargetRecord],
    output: list[OutputRow],
    now_ms: int,
) -> OutputAccepted | FleetError:
    """Apply one chunk to `target` as stored so far in the batch: the rows to insert go to
    `output`, the target's new end to `changed`; what to answer, or the refusal."""
    if job is None:
        return NotFound(f"job {up.job_id!r} does not exist (deleted, or never started)")
    if target is None:
        return PermissionDenied(f"node {up.node_id} is not a target of job {up.job_id}")
    try:
        got = accept_output(
            stored=target.output_stored_bytes,
            truncated=target.truncated,
            offset=up.offset,
            size=len(up.data),
            bound=up.bound,
        )
    except ValueError as exc:
        return FailedPrecondition(f"job {up.job_id} on {up.node_id}: {exc}")
    if got.keep:
        whole = got.skip == 0 and got.keep == len(up.data)
        data = up.data if whole else up.data[got.skip : got.skip + got.keep]  # no copy if whole
        output.append(OutputRow(up.job_id, up.node_id, target.output_stored_bytes, data))
    if got.stored != target.output_stored_bytes or got.truncated != target.truncated:
        changed[(up.job_id, up.node_id)] = dataclasses.replace(
            target, output_stored_bytes=got.stored, truncated=got.truncated, updated_ms=now_ms
        )
    return got


def dump_steps(steps: Sequence[dict[str, object]]) -> str:
    """Step results as stored JSON."""
    return json.dumps(list(steps), separators=(",", ":"))


def _consume(future: asyncio.Future[_Result]) -> None:
    if not future.cancelled():
        future.exception()
