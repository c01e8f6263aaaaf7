"""Group commit for metric batches through a bounded queue.

Callers `submit` a batch and wait; one committer task takes everything
queued (up to `max_rows_per_commit` samples), writes it with one
`MetricStore.write_batches` transaction and wakes every waiter with its own
result. A batch is acknowledged only after its transaction committed, so an
acknowledged batch survives a kill -9. When the queue holds
`max_pending_batches` the next submit fails at once with ResourceExhausted
and nothing of it is stored.

At low rates batches arrive one at a time (a fleet of daemons on 60 s
intervals is a steady trickle), so each would be its own transaction. The
committer therefore lets the oldest queued batch wait up to `linger_seconds`
for company before it commits: a batch that already waited that long (behind
a running commit) goes at once, and so does a group that reached
`max_rows_per_commit`. An acknowledgement comes at most `linger_seconds`
later than it would have.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field

from fleet.errors import FleetError, InvalidArgument, ResourceExhausted, Unavailable
from manager.storage.metrics import MetricStore
from manager.storage.records import MetricBatch

__all__ = ["MAX_LINGER_SECONDS", "MetricWriter"]

log = logging.getLogger(__name__)

MAX_LINGER_SECONDS = 1.0
"""The longest a batch may be held back for others to share its commit."""


@dataclass
class _Pending:
    batch: MetricBatch
    queued_at: float
    done: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class MetricWriter:
    """Bounded queue + single committer in front of a MetricStore."""

    def __init__(
        self,
        store: MetricStore,
        *,
        max_pending_batches: int = 10_000,
        max_rows_per_commit: int = 50_000,
        linger_seconds: float = 0.0,
    ) -> None:
        if max_pending_batches < 1:
            raise ValueError(f"max_pending_batches must be >= 1, got {max_pending_batches}")
        if max_rows_per_commit < 1:
            raise ValueError(f"max_rows_per_commit must be >= 1, got {max_rows_per_commit}")
        if not 0 <= linger_seconds <= MAX_LINGER_SECONDS:
            raise ValueError(
                f"linger_seconds must be within [0, {MAX_LINGER_SECONDS:g}], got {linger_seconds}"
            )
        self._store = store
        self._max_pending = max_pending_batches
        self._max_rows = max_rows_per_commit
        self._linger = linger_seconds
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_rows = 0
        self._in_flight = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.last_commit_seconds: float = 0.0
        """Duration of the last write_batches transaction."""
        self.commits: int = 0
        """Transactions committed so far."""
        self.lingered: int = 0
        """Groups committed because their oldest batch had waited `linger_seconds` (the
        rest went because they filled a commit or the writer stopped)."""

    @property
    def depth(self) -> int:
        """Batches submitted and not yet acknowledged (queued or being written)."""
        return len(self._queue) + self._in_flight

    def start(self) -> None:
        """Start the committer task (call from the running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="metric-writer")

    async def stop(self) -> None:
        """Stop accepting, commit everything queued, then end the committer."""
        self._stopping = True
        self._wakeup.set()
        if self._task is None:
            # Never started: drain inline so queued submitters are answered.
            await self._drain_all()
            return
        await self._task

    async def submit(self, batch: MetricBatch) -> bool:
        """Queue `batch` and wait until it is committed; True=stored, False=duplicate.

        ResourceExhausted at once if the queue is full (nothing of the batch
        is stored); Unavailable if the writer is stopping or the database
        stayed unreachable; InvalidArgument if the database rejected it.
        """
        if self._stopping:
            raise Unavailable("the metric writer is shutting down; retry on another manager")
        if self.depth >= self._max_pending:
            raise ResourceExhausted(
                f"metric queue is full ({self._max_pending} batches pending); retry later"
            )
        pending = _Pending(batch, time.monotonic())
        pending.done.add_done_callback(_consume)
        self._queue.append(pending)
        self._queued_rows += _rows(batch)
        if len(self._queue) == 1 or self._queued_rows >= self._max_rows:
            self._wakeup.set()  # the committer waits for a first batch or a full group
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
            await self._linger_for_company()
            await self._commit_next()

    async def _linger_for_company(self) -> None:
        """Until the oldest queued batch has waited `linger_seconds`, the group is full,
        or the writer is stopping."""
        while self._queue and not self._stopping and self._queued_rows < self._max_rows:
            left = self._queue[0].queued_at + self._linger - time.monotonic()
            if left <= 0:
                self.lingered += 1
                return
            self._wakeup.clear()  # set again by a submit that fills the group, or by stop()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._wakeup.wait()

    async def _drain_all(self) -> None:
        while self._queue:
            await self._commit_next()

    def _take(self) -> list[_Pending]:
        group: list[_Pending] = []
        rows = 0
        while self._queue:
            size = _rows(self._queue[0].batch)
            if group and rows + size > self._max_rows:
                break
            group.append(self._queue.popleft())
            rows += size
        self._queued_rows -= rows
        return group

    async def _commit_next(self) -> None:
        group = self._take()
        self._in_flight = len(group)
        try:
            started = time.perf_counter()
            try:
                results = await self._store.write_batches([p.batch for p in group])
            except InvalidArgument:
                if len(group) == 1:
                    raise
                # One bad batch must not fail its neighbours: write one by one.
                await self._one_by_one(group)
                return
            self.last_commit_seconds = time.perf_counter() - started
            self.commits += 1
            for p, stored in zip(group, results, strict=True):
                _resolve(p, stored)
        except Exception as exc:
            if not isinstance(exc, FleetError):  # a bug: answer the waiters, keep going
                log.exception("metric commit failed")
            for p in group:
                _fail(p, exc)
        finally:
            self._in_flight = 0

    async def _one_by_one(self, group: list[_Pending]) -> None:
        for p in group:
            try:
                (stored,) = await self._store.write_batches([p.batch])
            except FleetError as exc:
                _fail(p, exc)
            else:
                self.commits += 1
                _resolve(p, stored)


def _rows(batch: MetricBatch) -> int:
    return max(len(batch.samples), 1)


def _resolve(pending: _Pending, stored: bool) -> None:
    if not pending.done.done():
        pending.done.set_result(stored)


def _fail(pending: _Pending, exc: BaseException) -> None:
    if not pending.done.done():
        pending.done.set_exception(exc)


def _consume(future: asyncio.Future[bool]) -> None:
    # The submitter may have gone away (cancelled); retrieve the outcome so
    # asyncio does not log "exception was never retrieved".
    if not future.cancelled():
        future.exception()
