"""Group commit of job target transitions: daemons' reports and the driver's outcomes.

Every change of a target that comes from outside the operator's actions
goes through `JobUpdates.submit`: a daemon's ReportJobStatus, the answer
(or failure) of a StartJob the driver sent, a decision of the planner. One
committer task takes everything queued, and in ONE transaction reads the
targets concerned (locked), merges each change (`merge`, pure: terminal
states are final, a stale change changes nothing), writes the changed rows
with one executemany, and appends a `JOB_TARGET_FINISHED` event per target
that ended. Each submitter then gets its outcome; a change is acknowledged
only after its transaction committed. Listeners (the driver) hear of every
committed row, so they never re-read a whole job per report.

The earlier design's one transaction per target made a 500-target job 5.5x
slower than the raw StartJob calls; here a batch costs a few statements.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from fleet.errors import FleetError, Unavailable
from manager.service.jobs import TERMINAL, TargetState, transition_allowed
from manager.storage.jobs import JobRecord, JobRepository, JobTargetRecord, JobTx

__all__ = ["Change", "ChangeKind", "JobUpdates", "Outcome", "finished_message", "merge"]

log = logging.getLogger(__name__)

ChangeKind = Literal["report", "accepted", "unreachable", "decision"]


@dataclass(frozen=True)
class Change:
    """One change to one target."""

    job_id: str
    """The job."""
    node_id: str
    """The target's node."""
    kind: ChangeKind
    """report: the daemon says where it is; accepted: StartJob answered; unreachable:
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


@dataclass(frozen=True)
class Outcome:
    """What a change did."""

    job: JobRecord | None
    """The job (None: it does not exist)."""
    target: JobTargetRecord | None
    """The target after the change (None: the node is not a target of the job)."""
    applied: bool = False
    """The change was stored (False: stale, e.g. the target had ended)."""


def merge(current: JobTargetRecord, change: Change, now_ms: int) -> JobTargetRecord | None:
    """`current` with `change` applied, or None if the change is stale (pure)."""
    state = TargetState(current.state)
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
    out = dataclasses.replace(current, state=new.value, updated_ms=now_ms)
    if change.kind == "accepted":
        out = dataclasses.replace(
            out, attempts=0, last_error="", dispatched_ms=current.dispatched_ms or now_ms
        )
        if new is TargetState.FAILED:
            out = dataclasses.replace(out, reason=change.reason, ended_ms=now_ms)
        return out
    if change.kind == "decision":
        return dataclasses.replace(
            out, reason=change.reason, ended_ms=now_ms if new in TERMINAL else 0
        )
    # A report.
    out = dataclasses.replace(
        out,
        exit_code=change.exit_code,
        started_ms=change.started_ms or current.started_ms,
        ended_ms=change.ended_ms or (now_ms if new in TERMINAL else 0),
        reason=change.reason,
        dispatched_ms=current.dispatched_ms or now_ms,
    )
    if change.steps is not None:
        out = dataclasses.replace(out, steps=change.steps)
    if change.output_bytes is not None:
        out = dataclasses.replace(out, output_bytes=max(current.output_bytes, change.output_bytes))
    if out == dataclasses.replace(current, updated_ms=now_ms) and state is new:
        return None  # a duplicate report
    return out


def finished_message(job_id: str, target: JobTargetRecord) -> str:
    """The JOB_TARGET_FINISHED event's message."""
    detail = f" (exit {target.exit_code})" if target.state in ("SUCCESS", "FAILED") else ""
    why = f": {target.reason}" if target.reason and target.state != "SUCCESS" else ""
    return f"job {job_id} on {target.node_id}: {target.state}{detail}{why}"[:2000]


@dataclass
class _Pending:
    change: Change
    done: asyncio.Future[Outcome] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class JobUpdates:
    """The bounded queue and single committer of target changes (module docstring)."""

    def __init__(
        self,
        repo: JobRepository,
        *,
        clock: Callable[[], float],
        max_batch: int = 2000,
        max_pending: int = 100_000,
    ) -> None:
        self._repo = repo
        self._clock = clock
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._listeners: list[Callable[[Sequence[JobTargetRecord]], None]] = []
        self.commits = 0
        """Transactions committed so far."""

    def listen(self, callback: Callable[[Sequence[JobTargetRecord]], None]) -> None:
        """Call `callback(rows)` with the changed rows after each commit."""
        self._listeners.append(callback)

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
        if self._stopping:
            raise Unavailable("the manager is shutting down; retry on another manager")
        if len(self._queue) >= self._max_pending:
            raise Unavailable("too many job updates pending; retry shortly")
        pending = _Pending(change)
        pending.done.add_done_callback(_consume)
        self._queue.append(pending)
        self._wakeup.set()
        # shield: a caller that gives up does not cancel the commit others share.
        return await asyncio.shield(pending.done)

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._commit_next()

    async def _commit_next(self) -> None:
        group: list[_Pending] = []
        while self._queue and len(group) < self._max_batch:
            group.append(self._queue.popleft())
        now_ms = int(self._clock() * 1000)

        async def body(tx: JobTx) -> tuple[list[Outcome], list[JobTargetRecord]]:
            keys = {(p.change.job_id, p.change.node_id) for p in group}
            current = await tx.targets_of(keys, for_update=True)
            jobs = await tx.jobs({job_id for job_id, _ in keys})
            outcomes: list[Outcome] = []
            changed: dict[tuple[str, str], JobTargetRecord] = {}
            for p in group:
                c = p.change
                key = (c.job_id, c.node_id)
                target = changed.get(key) or current.get(key)
                job = jobs.get(c.job_id)
                if job is None or target is None:
                    outcomes.append(Outcome(job, None))
                    continue
                after = merge(target, c, now_ms)
                if after is None:
                    outcomes.append(Outcome(job, target))
                    continue
                changed[key] = after
                outcomes.append(Outcome(job, after, applied=True))
                if after.state in TERMINAL and target.state not in TERMINAL:
                    tx.event(
                        "JOB_TARGET_FINISHED",
                        now_ms=now_ms,
                        node_id=c.node_id,
                        actor=f"node/{c.node_id}" if c.kind == "report" else "manager",
                        message=finished_message(c.job_id, after),
                        attributes={"job_id": c.job_id, "state": after.state},
                    )
            rows = list(changed.values())
            await tx.put_targets(rows)
            return outcomes, rows

        try:
            outcomes, rows = await self._repo.run(body)
        except Exception as exc:
            if not isinstance(exc, FleetError):
                log.exception("job update commit failed")
            for p in group:
                if not p.done.done():
                    p.done.set_exception(exc)
            return
        self.commits += 1
        for listener in self._listeners:
            try:
                listener(rows)
            except Exception:
                log.exception("job update listener failed")
        for p, outcome in zip(group, outcomes, strict=True):
            if not p.done.done():
                p.done.set_result(outcome)


def dump_steps(steps: Sequence[dict[str, object]]) -> str:
    """Step results as stored JSON."""
    return json.dumps(list(steps), separators=(",", ":"))


def _consume(future: asyncio.Future[Outcome]) -> None:
    if not future.cancelled():
        future.exception()
