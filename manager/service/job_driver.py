"""The job driver: sends targets to their nodes under each job's window, ends jobs.

One replica at a time drives jobs (PostgreSQL advisory lock ``fleet-jobs``;
SQLite has one manager). The leader loads every unfinished job at start
(so a manager killed mid-job resumes it) and keeps, per live job, the
targets in memory (`jobs.JobTargets`). A pass asks each job's
`JobTargets.plan` what to do and does it (that walks every target only when
a decision may have changed since its last walk, else refills the window
from the targets it found ready: O(window) a pass): skips, undeliverables
and lost nodes go to the database through `JobUpdates` (group commit),
targets to send get a StartJob through the pool (`DaemonPool.start_job`;
concurrent, bounded), and a job whose targets all ended gets its final
state and its `JOB_FINISHED` event.

Every committed target change (a daemon's report, a StartJob answer) comes
back through the `JobUpdates` listener and updates the memory in O(1); the
pass that follows fills the freed window slots. A StartJob answer carrying
the job's end (`accept_end`) frees its slot at once: the target is ended in
memory (`_Live.storing`) until its commit. Reports committed by another
replica are read every `refresh_interval` seconds (PostgreSQL only).

No target runs twice: StartJob is idempotent per job id on the daemon, so
after a crash or a failover the new leader re-sends the targets not known
to have started, and a node that had them answers where they are. A target
whose StartJob could not reach its node stays PENDING and is retried with
backoff until the delivery timeout; nodes known offline are not dialled
(registrations and the sweeper poke the driver when they change).

The lost-node rule judges a target's stored `updated` (wall clock) against
now: a pass that sees the wall clock stepped (`liveness.StepWatch`) first
moves the QUEUED and RUNNING targets' times with the step, or a +1 h step
would fail every target running for more than its timeout plus the grace
minus an hour, while its node still runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from google.protobuf import json_format

from fleet.errors import FleetError, Unavailable
from fleet.v1 import daemon_pb2, jobs_pb2
from manager.pool import DaemonPool
from manager.service.job_reports import reported_change
from manager.service.job_spec import check_spec
from manager.service.job_updates import Change, JobUpdates, job_end
from manager.service.jobs import (
    TERMINAL,
    JobLimits,
    JobState,
    JobTargets,
    NodeFacts,
    Target,
    TargetState,
    job_state,
    plan,
    replans,
    retry_delay,
    transition_allowed,
)
from manager.service.liveness import StepWatch
from manager.storage import Database, NodeReach, NodeRepository
from manager.storage.events import sqlite_insert_events
from manager.storage.jobs import (
    JobRecord,
    JobRepository,
    JobTargetRecord,
    JobTx,
    sqlite_counts,
    sqlite_jobs,
    sqlite_update_job,
)

__all__ = ["JOBS_LOCK", "JobDriver", "NodesRead", "load_spec"]

log = logging.getLogger(__name__)

JOBS_LOCK = "fleet-jobs"
SEND_BATCH = 8
"""StartJob calls started per turn of the event loop (see `JobDriver._send`)."""


def load_spec(text: str) -> jobs_pb2.JobSpec:
    """A stored spec (JSON) as its message."""
    return json_format.Parse(text, jobs_pb2.JobSpec())


_STATES: dict[str, TargetState] = {s.value: s for s in TargetState}
"""A stored state's member (not TargetState(value), ~0.3 us: this runs for every row
committed)."""


def _target(r: JobTargetRecord) -> Target:
    return Target(
        node_id=r.node_id,
        state=_STATES[r.state],
        stage=r.stage,
        attempts=r.attempts,
        next_attempt=r.next_attempt_ms / 1000,
        updated=r.updated_ms / 1000,
        cancel_requested=r.cancel_requested,
        last_error=r.last_error,
    )


@dataclass(frozen=True)
class NodesRead:
    """Every node as one read saw it (what starting a job read for its selector)."""

    nodes: Sequence[NodeReach]
    at: float
    """`time.monotonic()` taken before the read began."""


@dataclass
class _Live:
    """A job being driven."""

    record: JobRecord
    limits: JobLimits
    request: daemon_pb2.StartJobRequest
    targets: JobTargets
    in_flight: set[str] = field(default_factory=set)
    storing: set[str] = field(default_factory=set)
    """Targets whose end an answer carried, ended in memory until its commit (the job
    does not end before those commits)."""


def _node_state(state: jobs_pb2.JobTargetState.ValueType) -> TargetState:
    name = jobs_pb2.JobTargetState.Name(state).removeprefix("JOB_TARGET_STATE_")
    if name in ("UNSPECIFIED", "PENDING"):
        return TargetState.QUEUED
    return TargetState(name)


class JobDriver:
    """Drives live jobs (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        nodes: NodeRepository,
        pool: DaemonPool,
        updates: JobUpdates,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] | None = None,
        dispatch_concurrency: int = 256,
        max_output_bytes: int = 1024 * 1024,
        call_timeout: float = 10.0,
        safety_interval: float = 10.0,
        refresh_interval: float = 1.0,
        node_refresh: float = 1.0,
        lock_check: float = 1.0,
        on_leader: Callable[[bool], None] = lambda held: None,
    ) -> None:
        self._db = db
        self._repo = JobRepository(db)
        self._nodes = nodes
        self._pool = pool
        self._updates = updates
        self._clock = clock
        self._monotonic = monotonic or clock  # what a step of `clock` is measured against
        self._steps = StepWatch()
        self._sem = asyncio.Semaphore(dispatch_concurrency)
        self._call_timeout = call_timeout
        self._bound = max_output_bytes
        self._safety = safety_interval
        self._refresh = refresh_interval
        self._node_refresh = node_refresh
        self._lock_check = lock_check
        self._on_leader = on_leader
        self._jobs: dict[str, _Live] = {}
        self._load: set[str] = set()
        self._facts: dict[str, NodeFacts] = {}
        self._addresses: dict[str, str] = {}
        self._facts_at = float("-inf")
        self._facts_stale = True
        self._nodes_changed_at = float("-inf")
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.leading = False
        """True while this replica holds the lock and drives jobs."""
        self.passes = 0
        """Passes made so far (each plans every live job)."""
        updates.listen(self._committed)

    # --- lifecycle ------------------------------------------------------------------------

    def poke(self, job_id: str = "") -> None:
        """A job was started or cancelled (re-read it), or something changed: pass soon."""
        if job_id:
            self._load.add(job_id)
        self._wake.set()

    def adopt(
        self,
        record: JobRecord,
        targets: Sequence[JobTargetRecord],
        nodes: NodesRead | None = None,
    ) -> None:
        """A job was just stored with these targets: drive it without reading it back.

        `nodes`: the nodes as starting the job read them; if that read is newer than
        the driver's and than the last change it was told of, it is the driver's view,
        and the job's first targets are sent at once (their StartJob tasks started
        before this returns) when its plan decides nothing to store first; the pass
        that follows does the rest (the job's state, the window as answers come)."""
        if not self.leading:
            self.poke(record.id)  # the leader reads it (another replica's, or ours later)
            return
        fresh = nodes is not None and nodes.at > max(self._facts_at, self._nodes_changed_at)
        if fresh:
            assert nodes is not None
            self._facts_stale = False
            self._facts_at = nodes.at
            self._use_facts(nodes.nodes)
        self._install(record, {t.node_id: t for t in targets})
        live = self._jobs[record.id]
        if fresh:
            # What the first pass would do with these facts, without waiting for it: a
            # pass plans every live job and is scheduled after RunJob's answer.
            decided = live.targets.plan(
                self._facts,
                self._clock(),
                in_flight=live.in_flight | live.storing,
                cancelled=bool(live.record.cancelled_ms),
            )
            if not decided.changes:  # decisions are stored before anything is sent
                self._send(live, decided.dispatch)
        self._wake.set()

    def sending(self, job_id: str) -> frozenset[str]:
        """The targets of a job whose StartJob is in flight (for tests and tools)."""
        live = self._jobs.get(job_id)
        return frozenset(live.in_flight) if live is not None else frozenset()

    def nodes_changed(self) -> None:
        """A node registered, came back or went offline: re-read the nodes."""
        self._facts_stale = True
        self._nodes_changed_at = time.monotonic()
        self._wake.set()

    def start(self) -> None:
        """Compete for the lock and drive jobs while holding it."""
        self._stop.clear()
        self._task = asyncio.create_task(self._run(), name="job-driver")

    async def stop(self) -> None:
        """Stop after the pass in progress; StartJob calls in flight are cancelled (a new
        leader re-sends them: the daemon's StartJob is idempotent)."""
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None

    def _committed(self, rows: Sequence[JobTargetRecord]) -> None:
        woke = False
        for r in rows:
            live = self._jobs.get(r.job_id)
            if live is not None:
                was = live.targets.targets.get(r.node_id)
                if was is None:
                    continue
                now = _target(r)
                live.targets.put(now)
                # No pass for the commit of an end the memory already had (the answer
                # carrying it freed its slot when it came).
                woke = woke or replans(was, now)
        if woke:
            self._wake.set()

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                async with self._db.advisory_lock(JOBS_LOCK) as held:
                    if held:
                        await self._lead()
            except FleetError as exc:
                log.warning("job driver: %s; retrying", exc)
            except Exception:
                log.exception("job driver failed unexpectedly; retrying")
            finally:
                await self._abandon()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 1.0)

    async def _abandon(self) -> None:
        # First: StartJob calls of a window not started yet stay so (`_start_calls`).
        was, self.leading = self.leading, False
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._jobs.clear()
        if was:
            log.info("no longer driving jobs")
        self._on_leader(False)

    async def _lead(self) -> None:
        replicas = self._db.dialect == "postgresql"
        if replicas:
            # A predecessor whose lock connection died stops within `lock_check`.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._lock_check)
            if self._stop.is_set() or not await self._db.advisory_lock_held(JOBS_LOCK):
                return
        self.leading = True
        self._on_leader(True)
        await self._load_live()
        log.info("this manager drives jobs (%d unfinished)", len(self._jobs))
        checked = refreshed = time.monotonic()
        while not self._stop.is_set():
            if replicas and time.monotonic() - checked >= self._lock_check:
                if not await self._db.advisory_lock_held(JOBS_LOCK):
                    log.warning("lost the jobs lock; competing for it again")
                    return
                checked = time.monotonic()
            if replicas and time.monotonic() - refreshed >= self._refresh:
                await self._load_live()  # other replicas' reports and new jobs
                refreshed = time.monotonic()
            self._wake.clear()
            wake_at = await self.run_once()
            delay = self._safety
            if replicas:
                delay = min(delay, self._refresh, self._lock_check)
            if wake_at is not None:
                delay = min(delay, max(0.0, wake_at - self._clock()))
            # Woken during the pass already (an answer came): no timer to arm and cancel,
            # the wait would return at once. Else asyncio.timeout, not wait_for: no task.
            if not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
            if not replicas and time.monotonic() - refreshed >= self._safety:
                await self._load_live()
                refreshed = time.monotonic()

    # --- loading --------------------------------------------------------------------------

    async def _load_live(self) -> None:
        """Every unfinished job, its targets as stored."""

        async def body(tx: JobTx) -> list[tuple[JobRecord, dict[str, JobTargetRecord]]]:
            records = await tx.list_jobs(live=True, limit=100_000)
            return [(r, await tx.targets(r.id)) for r in records]

        loaded = await self._repo.run(body, write=False)
        self._load.clear()
        seen = set()
        for record, targets in loaded:
            seen.add(record.id)
            self._install(record, targets)
        for job_id in set(self._jobs) - seen:
            if not self._jobs[job_id].in_flight:
                del self._jobs[job_id]

    async def _load_one(self, job_id: str) -> None:
        record, targets = await self._repo.job_with_targets(job_id)
        if record is None or record.ended_ms:
            self._jobs.pop(job_id, None)
            return
        self._install(record, targets)

    def _install(self, record: JobRecord, targets: dict[str, JobTargetRecord]) -> None:
        live = self._jobs.get(record.id)
        if live is not None:
            live.record = record
            read = {n: _target(t) for n, t in targets.items()}
            for node_id, was in live.targets.targets.items():
                got = read.get(node_id)
                if got is None or got.state is was.state:
                    continue
                if node_id in live.storing or not transition_allowed(was.state, got.state):
                    # The memory is ahead of the read: an end whose commit is on its way,
                    # or a commit that landed while the job was read (a target ended or
                    # accepted must not look PENDING again: it would be sent again).
                    read[node_id] = was
            live.targets = JobTargets(read, live.limits)
            return
        spec = check_spec(load_spec(record.spec))
        limits = JobLimits(
            created=record.created_ms / 1000,
            concurrency=record.concurrency,
            max_errors=spec.max_errors,
            delivery_timeout=spec.delivery_timeout,
            timeout=spec.timeout,
        )
        self._jobs[record.id] = _Live(
            record=record,
            limits=limits,
            request=daemon_pb2.StartJobRequest(
                job_id=record.id,
                steps=spec.message.steps,
                timeout_seconds=spec.timeout,
                lock=spec.message.lock,
                accept_end=True,  # a fast command's end comes with the answer
            ),
            targets=JobTargets({n: _target(t) for n, t in targets.items()}, limits),
        )

    async def _node_facts(self, now: float) -> None:
        if not self._facts_stale and now - self._facts_at < self._node_refresh:
            return
        # Before the read: a change told meanwhile makes them stale again.
        self._facts_stale = False
        self._facts_at = now
        listed = await self._nodes.reach()
        if self._facts_at == now:  # not replaced meanwhile by a newer read (adopt)
            self._use_facts(listed)

    def _use_facts(self, listed: Sequence[NodeReach]) -> None:
        # A node's facts as the last read made them when they did not change: starting a
        # job reads every node, and 500 frozen NodeFacts made anew cost ~0.8 ms before
        # its first StartJob leaves, reusing them ~0.15.
        was = self._facts.get
        facts: dict[str, NodeFacts] = {}
        for n in listed:
            online = n.status == "online"
            last_seen = n.last_seen_ms / 1000
            disabled = n.jobs_disabled
            f = was(n.node_id)
            if (
                f is None
                or f.online != online
                or f.last_seen != last_seen
                or f.jobs_disabled != disabled
            ):
                f = NodeFacts(online=online, last_seen=last_seen, jobs_disabled=disabled)
            facts[n.node_id] = f
        self._facts = facts
        self._addresses = {n.node_id: n.daemon_address for n in listed}

    # --- one pass -------------------------------------------------------------------------

    async def run_once(self) -> float | None:
        """Plan and act for every live job; the earliest time a decision can change."""
        for job_id in list(self._load):
            self._load.discard(job_id)
            await self._load_one(job_id)
        # Every pass, jobs or not: a step is told from time passed since the last look.
        step = self._steps.observe(self._clock(), self._monotonic())
        if step and self._jobs:
            await self._stepped(step)
        if not self._jobs:
            return None
        self.passes += 1
        await self._node_facts(time.monotonic())
        wake: float | None = None
        for live in list(self._jobs.values()):
            at = await self._drive(live)
            if at is not None:
                wake = at if wake is None else min(wake, at)
        return wake

    async def _stepped(self, step: float) -> None:
        """The wall clock moved `step` s more than time passed: QUEUED and RUNNING targets'
        times move with it, stored (another leader reads them) and here."""
        step_ms, now_ms = int(step * 1000), int(self._clock() * 1000)

        async def body(tx: JobTx) -> int:
            return await tx.rebase_active(step_ms, now_ms)

        moved = await self._repo.run(body)
        for live in self._jobs.values():
            for t in list(live.targets.targets.values()):
                if t.state is not TargetState.QUEUED and t.state is not TargetState.RUNNING:
                    continue
                at = int(t.updated * 1000)
                if step_ms > 0 and at <= now_ms - step_ms:
                    live.targets.put(dataclasses.replace(t, updated=t.updated + step))
                elif step_ms < 0 and at > now_ms:
                    live.targets.put(dataclasses.replace(t, updated=now_ms / 1000))
            live.targets.replan()  # lost-node times moved
        log.warning(
            "the wall clock jumped %+.1f s: %d running job target(s) moved with it", step, moved
        )

    async def _drive(self, live: _Live) -> float | None:
        decided = live.targets.plan(
            self._facts,
            self._clock(),
            in_flight=live.in_flight | live.storing,  # neither is sent again
            cancelled=bool(live.record.cancelled_ms),
        )
        if decided.changes:
            await asyncio.gather(
                *(
                    self._updates.submit(
                        Change(live.record.id, node_id, "decision", state=state, reason=reason)
                    )
                    for node_id, (state, reason) in decided.changes.items()
                )
            )
        self._send(live, decided.dispatch)
        counts = live.targets.counts  # what the changes' commits left
        cancelled = bool(live.record.cancelled_ms)
        state = job_state(counts, cancelled=cancelled)
        ended = (
            sum(counts.get(s, 0) for s in TERMINAL) == len(live.targets)
            and not live.in_flight
            and not live.storing
        )
        reason = live.record.reason or decided.reason
        if ended:
            await self._finish(live, reason)
        elif live.storing:
            pass  # ends not committed yet: the job's state follows once they are
        elif state.value != live.record.state or reason != live.record.reason:
            await self._set_state(live, state, reason)
        return decided.wake_at

    def _send(self, live: _Live, node_ids: Sequence[str]) -> None:
        """Start the StartJob calls of these targets (in flight until answered), a few
        at a time (`SEND_BATCH`): the event loop runs the tasks it has before those
        they schedule, so the first call of a window of 100 would otherwise leave
        only once all 100 were set up (~35 us each under load)."""
        live.in_flight.update(node_ids)
        self._start_calls(live, list(node_ids), 0)

    def _start_calls(self, live: _Live, node_ids: list[str], start: int) -> None:
        if not self.leading or self._jobs.get(live.record.id) is not live:
            # Stopped leading or the job was dropped before these calls were started.
            live.in_flight.difference_update(node_ids[start:])
            live.targets.replan()
            return
        end = start + SEND_BATCH
        for node_id in node_ids[start:end]:
            task = asyncio.create_task(self._dispatch(live, node_id), name=f"start-job-{node_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if end < len(node_ids):
            # After these tasks' first steps, behind the calls they start.
            asyncio.get_running_loop().call_soon(self._start_calls, live, node_ids, end)

    async def _dispatch(self, live: _Live, node_id: str) -> None:
        job_id = live.record.id
        target = live.targets.targets[node_id]
        change: Change
        try:
            async with self._sem:
                response = await self._pool.start_job(
                    node_id,
                    self._addresses.get(node_id, ""),
                    live.request,
                    call_timeout=self._call_timeout,
                )
        except Unavailable as exc:
            attempts = target.attempts + 1
            change = Change(
                job_id,
                node_id,
                "unreachable",
                reason=exc.message,
                next_attempt_ms=int((self._clock() + retry_delay(attempts)) * 1000),
            )
        except FleetError as exc:
            change = Change(
                job_id,
                node_id,
                "accepted",
                state=TargetState.FAILED,
                reason=f"the node refused the job: {exc.message}",
            )
        else:
            change = self._answered(job_id, node_id, response)
        if change.kind == "ended":
            # The node is done with it: its window slot is free now, not after the commit.
            live.targets.put(
                Target(
                    node_id,
                    change.state,
                    target.stage,
                    target.attempts,
                    target.next_attempt,
                    target.updated,
                    target.cancel_requested,
                    target.last_error,
                )
            )
            live.storing.add(node_id)
            live.in_flight.discard(node_id)
            self._wake.set()
            last = self._last_reason(live)
            if last is not None:
                # The job's last end: the commit storing it ends the job too (if the
                # database agrees every target is final), not a pass and a commit later.
                change = dataclasses.replace(change, finish=last)
        stored_end = False
        try:
            outcome = await self._updates.submit(change)
            stored_end = change.kind == "ended"
        except FleetError as exc:
            log.warning(
                "job %s on %s: could not store the StartJob answer: %s", job_id, node_id, exc
            )
            if node_id in live.storing:
                live.targets.put(target)  # not stored: send it again (same end)
            return
        finally:
            live.in_flight.discard(node_id)
            live.storing.discard(node_id)
            if live.targets.targets[node_id].state is TargetState.PENDING:
                live.targets.replan()  # nothing stored moved it: sendable again
            # A stored end changes nothing a pass decides while other ends are still being
            # stored (the job's state and end wait for the last of them): no pass for it.
            if not (stored_end and live.storing):
                self._wake.set()
        if outcome.job is not None and outcome.job.ended_ms and self._jobs.get(job_id) is live:
            self._jobs.pop(job_id)  # it ended in this commit (Change.finish): nothing to drive
        stored = outcome.target
        if (
            change.kind == "ended"
            and not outcome.applied  # applied: the commit's listener installed it
            and stored is not None
            and stored.state in TERMINAL
        ):
            live.targets.put(_target(stored))  # as stored (final: nothing comes after)
        if change.kind == "accepted" and stored is not None and stored.cancel_requested:
            # Cancelled while StartJob was on its way: the node must stop it.
            await self._cancel_on_node(job_id, node_id)

    def _answered(self, job_id: str, node_id: str, response: daemon_pb2.StartJobResponse) -> Change:
        """The StartJob answer as a change: the job's end when the answer carries it
        (stored as its report would be, with its output), else where the job is."""
        if not response.HasField("end"):
            return Change(
                job_id,
                node_id,
                "accepted",
                state=_node_state(response.state),
                reason=response.reason,
            )
        end = response.end
        try:
            return reported_change(
                node_id,
                job_id,
                end,
                output_bytes=len(end.output),
                output=end.output,
                bound=self._bound,
            )
        except FleetError as exc:
            # The node will not report an end it answered: say what was wrong, and end it.
            return Change(
                job_id,
                node_id,
                "accepted",
                state=TargetState.FAILED,
                reason=f"the node's StartJob answer was invalid: {exc.message}",
            )

    def _last_reason(self, live: _Live) -> str | None:
        """The reason the job would end with if it ended now, or None if it would not:
        a target is not final in memory or a StartJob is in flight. The ends in `storing`
        were submitted before the caller's, so they are in its commit or an earlier one."""
        counts = live.targets.counts
        if live.in_flight or sum(counts[s] for s in TERMINAL) != len(live.targets):
            return None
        decided = plan(
            live.targets.targets,
            self._facts,
            live.limits,
            self._clock(),
            in_flight=live.storing,
            cancelled=bool(live.record.cancelled_ms),
        )
        if decided.changes or decided.dispatch:
            return None
        return live.record.reason or decided.reason

    async def _cancel_on_node(self, job_id: str, node_id: str) -> None:
        try:
            await self._pool.cancel_job(
                node_id, self._addresses.get(node_id, ""), job_id, call_timeout=self._call_timeout
            )
        except FleetError as exc:
            log.info(
                "job %s: cancel on %s failed (%s); its next report learns it", job_id, node_id, exc
            )

    async def _set_state(self, live: _Live, state: JobState, reason: str) -> None:
        record = live.record

        def moved(stored: JobRecord | None) -> JobRecord | None:
            if stored is None or stored.ended_ms:
                return None
            return dataclasses.replace(stored, state=state.value, reason=stored.reason or reason)

        async def body(tx: JobTx) -> JobRecord | None:
            after = moved(await tx.job(record.id, for_update=True))
            if after is not None:
                await tx.update_job(after)
            return after

        def sqlite_body(db: sqlite3.Connection) -> JobRecord | None:
            # One hop to aiosqlite's thread, not SQLAlchemy's: the pass waits for it.
            after = moved(sqlite_jobs(db, [record.id]).get(record.id))
            if after is not None:
                sqlite_update_job(db, after)
            return after

        if self._db.dialect == "sqlite":
            after = await self._db.run_sqlite(sqlite_body)
        else:
            after = await self._repo.run(body)
        if after is None:
            self._jobs.pop(record.id, None)
        else:
            live.record = after

    async def _finish(self, live: _Live, reason: str) -> None:
        job_id = live.record.id
        now_ms = int(self._clock() * 1000)

        async def body(tx: JobTx) -> bool:
            stored = await tx.job(job_id, for_update=True)
            if stored is None or stored.ended_ms:
                return True
            counts = (await tx.counts([job_id])).get(job_id, {})
            end = job_end(stored, counts, reason, now_ms)
            if end is None:
                return False  # the memory is behind the database: read it again
            await tx.update_job(end[0])
            tx.queued_events.append(end[1])
            return True

        def sqlite_body(db: sqlite3.Connection) -> bool:
            stored = sqlite_jobs(db, [job_id]).get(job_id)
            if stored is None or stored.ended_ms:
                return True
            end = job_end(stored, sqlite_counts(db, job_id), reason, now_ms)
            if end is None:
                return False
            sqlite_update_job(db, end[0])
            sqlite_insert_events(db, [end[1]])
            return True

        sqlite = self._db.dialect == "sqlite"
        if await (self._db.run_sqlite(sqlite_body) if sqlite else self._repo.run(body)):
            self._jobs.pop(job_id, None)  # ended (here or elsewhere): nothing left to drive
        else:
            await self._load_one(job_id)
