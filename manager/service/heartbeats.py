"""The in-memory last-seen map and the task that flushes it.

A heartbeat only updates a dict entry; a flusher writes the whole map with
`NodeRepository.touch_many` (one batched statement) at least once a second
and on shutdown. If the database is down the entries stay in the map (newest
time wins) and are written by a later flush, so no heartbeat is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from fleet.errors import FleetError
from manager.storage import NodeRepository

__all__ = ["HeartbeatBuffer"]

log = logging.getLogger(__name__)


class HeartbeatBuffer:
    """Last-seen times waiting to be written, keyed by node id."""

    def __init__(
        self,
        nodes: NodeRepository,
        *,
        interval: float = 0.5,
        on_flush: Callable[[float, int], None] | None = None,
    ) -> None:
        self._nodes = nodes
        self._interval = interval
        self._pending: dict[str, int] = {}
        self._writing: dict[str, int] = {}  # taken by a flush that has not committed yet
        self._lock = asyncio.Lock()
        self._on_flush = on_flush
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def record(self, node_id: str, last_seen_ms: int) -> None:
        """Note a heartbeat; the newest time per node wins."""
        old = self._pending.get(node_id)
        if old is None or last_seen_ms > old:
            self._pending[node_id] = last_seen_ms

    @property
    def pending_ids(self) -> frozenset[str]:
        """Nodes whose latest heartbeat is not in the database yet."""
        return frozenset(self._pending.keys() | self._writing.keys())

    def __len__(self) -> int:
        return len(self._pending.keys() | self._writing.keys())

    async def flush(self) -> list[str]:
        """Write the map in one statement; returns nodes that came back online.

        On failure the entries are merged back and the error propagates.
        """
        async with self._lock:
            if not self._pending:
                return []
            batch, self._pending = self._pending, {}
            self._writing = batch
            started = time.perf_counter()
            try:
                back_online = await self._nodes.touch_many(batch)
            except BaseException:
                for node_id, ts in batch.items():
                    self.record(node_id, ts)
                raise
            finally:
                self._writing = {}
            if self._on_flush is not None:
                self._on_flush(time.perf_counter() - started, len(batch))
            return back_online

    def start(self) -> None:
        """Start the periodic flusher."""
        self._stop.clear()
        self._task = asyncio.create_task(self._run(), name="heartbeat-flusher")

    async def stop(self) -> None:
        """Stop the flusher and write what is left (errors propagate)."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval)
            if self._stop.is_set():
                return
            try:
                await self.flush()
            except FleetError as exc:  # e.g. Unavailable: keep the map, try again
                log.warning(
                    "heartbeat flush failed, %d nodes kept for retry: %s", len(self._pending), exc
                )
            except Exception:
                log.exception("heartbeat flush failed unexpectedly; retrying")
