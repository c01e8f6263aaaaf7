"""Group commit for metric batches through a bounded queue.

Callers `submit` a batch and wait; one committer task takes everything
queued (up to `max_rows_per_commit` samples), writes it with one
`MetricStore.write_batches` transaction and wakes every waiter with its own
result. A batch is acknowledged only after its transaction committed, so an
acknowledged batch survives a kill -9. When the queue holds
`max_pending_batches` the next submit fails at once with ResourceExhausted
and nothing of it is stored.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field

from fleet.errors import FleetError, InvalidArgument, ResourceExhausted, Unavailable
from manager.storage.metrics import MetricStore
from manager.storage.records import MetricBatch

__all__ = ["MetricWriter"]

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    batch: MetricBatch
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
    ) -> None:
        if max_pending_batches < 1:
            raise ValueError(f"max_pending_batches must be >= 1, got {max_pending_batches}")
        if max_rows_per_commit < 1:
            raise ValueError(f"max_rows_per_commit must be >= 1, got {max_rows_per_commit}")
        self._store = store
        self._max_pending = max_pending_batches
        self._max_rows = max_rows_per_commit
        self._queue: collections.deque[_Pending] = collections.deque()
        self._in_flight = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.last_commit_seconds: float = 0.0
        """Duration of the last write_batches transaction."""
        self.commits: int = 0
        """Transactions committed so far."""

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
        pending = _Pending(batch)
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

    async def _drain_all(self) -> None:
        while self._queue:
            await self._commit_next()

    def _take(self) -> list[_Pending]:
        group: list[_Pending] = []
        rows = 0
        while self._queue:
            size = max(len(self._queue[0].batch.samples), 1)
            if group and rows + size > self._max_rows:
                break
            group.append(self._queue.popleft())
            rows += size
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
