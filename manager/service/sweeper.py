"""Background jobs that must run on one replica at a time.

`Sweeper` marks silent nodes offline. It holds the database advisory lock
"fleet-sweeper" for as long as it is the leader (PostgreSQL; SQLite has one
manager), and only acts `failover_grace` after it became leader, so a
restart or a failover does not mark a whole fleet down while daemons
reconnect; a step of the wall clock re-bases it (`liveness.StepWatch`).
`MetricsLifecycle` rolls up and prunes metrics under its own lock,
`ArtifactJanitor` deletes the staged chunks of uploads a crash cut short,
`JobJanitor` deletes finished jobs past their retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from fleet.errors import FleetError
from manager.service.artifacts import Artifacts
from manager.service.heartbeats import HeartbeatBuffer
from manager.service.liveness import LivenessPolicy, StepWatch, sweep_cutoff
from manager.service.registry import NodeRegistry
from manager.storage import Database, NodeRepository
from manager.storage.jobs import JobRepository, JobTx
from manager.storage.metrics import MetricStore

__all__ = ["ArtifactJanitor", "JobJanitor", "MetricsLifecycle", "SweepResult", "Sweeper"]

log = logging.getLogger(__name__)

SWEEPER_LOCK = "fleet-sweeper"
LIFECYCLE_LOCK = "fleet-metrics-lifecycle"
JANITOR_LOCK = "fleet-artifact-janitor"
JOB_JANITOR_LOCK = "fleet-job-janitor"


@dataclass(frozen=True)
class SweepResult:
    """What one sweep did."""

    offline: tuple[str, ...]
    """Nodes marked offline."""
    cutoff_ms: int | None
    """Last-seen cutoff used; None during the failover grace."""


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class Sweeper:
    """Marks nodes offline after ttl + grace without a heartbeat."""

    def __init__(
        self,
        db: Database,
        nodes: NodeRepository,
        registry: NodeRegistry,
        heartbeats: HeartbeatBuffer,
        *,
        policy: LivenessPolicy,
        interval: float,
        clock: Callable[[], float],
        monotonic: Callable[[], float] | None = None,
        on_leader: Callable[[bool], None] | None = None,
        on_offline: Callable[[int], None] | None = None,
        on_counts: Callable[[int, int], None] | None = None,
    ) -> None:
        """`clock`: the wall clock (last-seen times); `monotonic`: the clock a step of it
        is measured against (None: `clock` itself, which never sees a step)."""
        self._db = db
        self._nodes = nodes
        self._registry = registry
        self._heartbeats = heartbeats
        self._policy = policy
        self._interval = interval
        self._clock = clock
        self._monotonic = monotonic or clock
        self._steps = StepWatch()
        self._on_leader = on_leader or (lambda _: None)
        self._on_offline = on_offline or (lambda _: None)
        self._on_counts = on_counts
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.active_since: float | None = None
        """When this replica became the sweeper; None while it is not."""

    async def sweep_once(self) -> SweepResult:
        """Flush our heartbeats, then mark nodes past their deadline offline."""
        if self.active_since is None:
            self.active_since = self._clock()
        await self._heartbeats.flush()
        now = self._clock()
        step = self._steps.observe(now, self._monotonic())
        if step:
            await self._stepped(step, now)
        cutoff = sweep_cutoff(
            now=now,
            active_since=self.active_since,
            ttl=self._registry.sweep_ttl(),
            policy=self._policy,
        )
        if cutoff is None:
            return SweepResult((), None)
        cutoff_ms = int(cutoff * 1000)
        offline = await self._nodes.mark_offline(
            cutoff_ms=cutoff_ms, now_ms=int(now * 1000), exclude=self._heartbeats.pending_ids
        )
        if offline:
            log.info("marked %d node(s) offline: %s", len(offline), ", ".join(offline[:20]))
            self._on_offline(len(offline))
        return SweepResult(tuple(offline), cutoff_ms)

    async def _stepped(self, step: float, now: float) -> None:
        """Re-base after the wall clock moved `step` s more than time passed.

        Forwards, every last-seen time is suddenly `step` older: nobody is judged
        for a failover grace, as after a start (a VM resumed after an hour is one,
        to the daemons). Backwards, last-seen times lie in the future and would
        keep dead nodes online until the clock caught up: they become now, and a
        failover grace in progress keeps its length.
        """
        if step > 0:
            self.active_since = now
            log.warning(
                "the wall clock jumped %+.1f s: no node is marked offline for the failover"
                " grace (%.0f s) while the fleet is seen on the new time",
                step,
                self._policy.failover_grace,
            )
            return
        self.active_since = (self.active_since or now) + step
        clamped = await self._nodes.clamp_last_seen(int(now * 1000))
        log.warning(
            "the wall clock jumped %+.1f s: %d node(s) last seen in the future now last seen"
            " now, so silence counts from here",
            step,
            clamped,
        )

    async def refresh_counts(self) -> None:
        """Update the fleet size (ttl) and the nodes-by-status gauges."""
        online = await self._nodes.count(status="online")
        offline = await self._nodes.count(status="offline")
        self._registry.set_fleet_size(online + offline)
        if self._on_counts is not None:
            self._on_counts(online, offline)

    def start(self) -> None:
        """Start competing for the sweeper lock and sweeping."""
        self._stop.clear()
        self._task = asyncio.create_task(self._run(), name="sweeper")

    async def stop(self) -> None:
        """Stop sweeping and release the lock."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                async with self._db.advisory_lock(SWEEPER_LOCK) as held:
                    if held:
                        await self._lead()
                    else:
                        await self.refresh_counts()
            except FleetError as exc:
                log.warning("sweeper: %s; retrying", exc)
            except Exception:
                log.exception("sweeper failed unexpectedly; retrying")
            finally:
                if self.active_since is not None:
                    log.info("no longer the sweeper")
                self.active_since = None
                self._on_leader(False)
            await _sleep_or_stop(self._stop, self._interval)

    async def _lead(self) -> None:
        self.active_since = self._clock()
        self._steps = StepWatch()
        self._on_leader(True)
        log.info(
            "this manager is the sweeper; nodes get %.0f s of failover grace",
            self._policy.failover_grace,
        )
        while not self._stop.is_set():
            # If the lock's connection died, another replica may lead already.
            if not await self._db.advisory_lock_held(SWEEPER_LOCK):
                log.warning("lost the sweeper lock; competing for it again")
                return
            await self.refresh_counts()
            await self.sweep_once()
            await _sleep_or_stop(self._stop, self._interval)


class _LockedJob:
    """A job run every `interval` seconds by one replica at a time (an advisory lock).

    Subclasses set `name` (the task's, and the log's) and `lock`, and define
    `_pass`. The first pass runs one interval after `start`.
    """

    name = ""
    lock = ""

    def __init__(self, db: Database, *, interval: float) -> None:
        self._db = db
        self._interval = interval
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _pass(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        """Start the periodic job."""
        self._stop.clear()
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        """Stop the job (a pass in progress finishes first)."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            await _sleep_or_stop(self._stop, self._interval)
            if self._stop.is_set():
                return
            try:
                async with self._db.advisory_lock(self.lock) as held:
                    if held:
                        await self._pass()
            except FleetError as exc:
                log.warning("%s: %s; retrying next time", self.name, exc)
            except Exception:
                log.exception("%s failed unexpectedly", self.name)


class MetricsLifecycle(_LockedJob):
    """Rolls raw samples up into 1-minute buckets and prunes old data."""

    name = "metrics-lifecycle"
    lock = LIFECYCLE_LOCK

    def __init__(
        self,
        db: Database,
        store: MetricStore,
        *,
        raw_retention_ms: int,
        rollup_retention_ms: int,
        interval: float,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(db, interval=interval)
        self._store = store
        self._raw_ms = raw_retention_ms
        self._rollup_ms = rollup_retention_ms
        self._clock = clock

    async def run_once(self) -> tuple[int, int]:
        """Roll up closed minutes, then prune; returns (buckets, rows deleted)."""
        now_ms = int(self._clock() * 1000)
        buckets = await self._store.rollup(now_ms=now_ms)
        deleted = await self._store.prune(
            now_ms=now_ms, raw_retention_ms=self._raw_ms, rollup_retention_ms=self._rollup_ms
        )
        return buckets, deleted

    async def _pass(self) -> None:
        buckets, deleted = await self.run_once()
        log.debug("metrics lifecycle: %d buckets, %d rows pruned", buckets, deleted)


class ArtifactJanitor(_LockedJob):
    """Deletes the staged chunks that crashed uploads left behind, on one replica at a time."""

    name = "artifact-janitor"
    lock = JANITOR_LOCK

    def __init__(
        self,
        db: Database,
        artifacts: Artifacts,
        *,
        interval: float,
        stale_after: float,
    ) -> None:
        super().__init__(db, interval=interval)
        self._artifacts = artifacts
        self._stale_after = stale_after

    async def run_once(self) -> int:
        """One pass; how many staged uploads were removed."""
        removed = await self._artifacts.expire_uploads(stale_after=self._stale_after)
        if removed:
            log.info("removed the staged bytes of %d abandoned artifact upload(s)", removed)
        return removed

    async def _pass(self) -> None:
        await self.run_once()


class JobJanitor(_LockedJob):
    """Deletes finished jobs past the retention, with their targets and output."""

    name = "job-janitor"
    lock = JOB_JANITOR_LOCK

    def __init__(
        self,
        db: Database,
        repo: JobRepository,
        *,
        retention_ms: int,
        interval: float,
        clock: Callable[[], float],
        batch: int = 100,
    ) -> None:
        super().__init__(db, interval=interval)
        self._repo = repo
        self._retention_ms = retention_ms
        self._clock = clock
        self._batch = batch

    async def run_once(self) -> int:
        """One pass; how many jobs were deleted (a batch per transaction)."""
        cutoff = int(self._clock() * 1000) - self._retention_ms
        deleted = 0
        while True:

            async def body(tx: JobTx) -> int:
                ids = await tx.ended_before(cutoff, self._batch)
                await tx.delete_jobs(ids)
                return len(ids)

            n = await self._repo.run(body)
            deleted += n
            if n < self._batch:
                break
        if deleted:
            log.info("deleted %d job(s) finished more than the retention ago", deleted)
        return deleted

    async def _pass(self) -> None:
        await self.run_once()
