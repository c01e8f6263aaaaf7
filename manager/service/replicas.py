"""The stream directory: which manager replica holds each node's control stream.

With `[cluster] advertise_address` set (several replicas on PostgreSQL),
each replica

- registers itself (its manager certificate's name and the address its peers
  reach it at) and refreshes its row every `heartbeat_seconds`; a row older
  than `stale_after_seconds` means the replica is gone;
- records in `control_streams` each node whose stream it accepts, and
  deletes the record when the stream ends, only if the record is still the
  one it wrote (`epoch`): one write per stream opened or closed, those that
  happen together in one transaction, nothing per command;
- every `reconcile_seconds` compares the records naming it with the streams
  it holds and repairs the difference (a record deleted by a replica that
  lost a race, a delete that failed while the database was away);
- answers the pool's `route(node_id)`: one indexed read, judged by the pure
  `manager.pool.routing.usable_route` on this replica's clock; a peer the
  pool could not reach (`unreachable`) gets no route until it refreshes its
  row again (kept in memory, per peer).

Stopping removes the replica's row and every record naming it, so peers stop
routing to it at once; a replica killed with -9 is ignored after
`stale_after_seconds` and its records are overwritten as its nodes reconnect
elsewhere (or removed when it starts again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from fleet.errors import FleetError
from manager.pool.routing import Route, usable_route
from manager.pool.stream import ControlStreams
from manager.storage.replicas import ReplicaRepository

__all__ = ["StreamDirectory"]

log = logging.getLogger(__name__)

_RETRY_SECONDS = 1.0
_COALESCE_SECONDS = 0.1
"""After a change, wait this long for more before writing: at a reconnect storm the
streams opening within it are one transaction, and a route appears at most this
much later."""


class StreamDirectory:
    """This replica's side of the shared stream directory (see the module docstring)."""

    def __init__(
        self,
        repo: ReplicaRepository,
        streams: ControlStreams,
        *,
        replica_id: str,
        address: str,
        heartbeat: float,
        stale_after: float,
        reconcile: float,
        clock: Callable[[], float],
    ) -> None:
        self._repo = repo
        self._streams = streams
        self.replica_id = replica_id
        """This replica's name (its manager certificate's)."""
        self.address = address
        """Where its peers reach it."""
        self._heartbeat = heartbeat
        self._stale_after_ms = int(stale_after * 1000)
        self._reconcile = reconcile
        self._clock = clock
        self._mine: dict[str, int] = {}  # node -> the epoch of the record we wrote
        self._unreachable: dict[str, int] = {}  # peer -> its last-seen when it failed us
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one write of the directory at a time
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        self.writes = 0
        """Transactions written for opened/closed streams (the batching shows here)."""

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Register (FailedPrecondition if a live replica has our name elsewhere), drop
        records a previous run left, and start the writer and the heartbeat."""
        await self._repo.register(
            self.replica_id,
            self.address,
            now_ms=self._now_ms(),
            live_after_ms=self._now_ms() - self._stale_after_ms,
        )
        self._mine.clear()
        self._stop.clear()
        self._running = True
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="stream-directory-writer"),
            asyncio.create_task(self._heartbeat_loop(), name="stream-directory-heartbeat"),
        ]
        log.info("manager replica %s registered at %s", self.replica_id, self.address)

    async def stop(self) -> None:
        """Stop writing; remove this replica's row and its stream records."""
        self._running = False
        self._stop.set()
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        try:
            await self._repo.leave(self.replica_id)
        except FleetError as exc:  # peers ignore our rows once they are stale
            log.warning("could not remove replica %s from the directory: %s", self.replica_id, exc)

    # -- the pool's question -------------------------------------------------

    async def route(self, node_id: str) -> Route | None:
        """The live peer replica holding `node_id`'s stream, or None."""
        record = await self._repo.stream_of(node_id)
        if record is None:
            return None
        failed_at = self._unreachable.get(record.replica_id)
        if failed_at is not None and record.replica_last_seen_ms > failed_at:
            del self._unreachable[record.replica_id]  # it refreshed its row since: try it
        return usable_route(
            replica_id=record.replica_id,
            replica_address=record.replica_address,
            replica_last_seen_ms=record.replica_last_seen_ms,
            self_id=self.replica_id,
            now_ms=self._now_ms(),
            stale_after_ms=self._stale_after_ms,
            epoch=record.epoch,
            unreachable_seen_ms=self._unreachable.get(record.replica_id),
        )

    def unreachable(self, route: Route) -> None:
        """The pool could not reach the replica `route` names: route nothing to it until
        it refreshes its row again (never, if it died)."""
        seen = max(route.replica_seen_ms, self._unreachable.get(route.replica_id, 0))
        self._unreachable[route.replica_id] = seen
        log.warning(
            "manager replica %s at %s could not be reached: not routing to it until it "
            "refreshes its row",
            route.replica_id,
            route.address,
        )

    # -- recording -----------------------------------------------------------

    def changed(self, node_id: str) -> None:
        """A node's stream here opened, was replaced or ended (ControlStreams' hook)."""
        if self._running:
            self._dirty.add(node_id)
            self._wake.set()

    async def flush(self) -> None:
        """Write what changed since the last write, in one transaction."""
        async with self._lock:
            dirty, self._dirty = self._dirty, set()
            if not dirty:
                return
            opened = [n for n in dirty if self._streams.get(n) is not None]
            closed = {
                n: self._mine[n] for n in dirty if self._streams.get(n) is None and n in self._mine
            }
            try:
                epochs = await self._repo.record_streams(
                    self.replica_id, opened, closed, now_ms=self._now_ms()
                )
            except BaseException:
                self._dirty |= dirty  # written by the next attempt
                raise
            self.writes += 1
            for n in closed:
                self._mine.pop(n, None)
            self._mine.update(epochs)

    async def reconcile(self) -> tuple[int, int]:
        """Repair the records naming this replica: delete those of streams it no longer
        holds, claim streams it holds that nobody recorded. Returns (deleted, claimed)."""
        async with self._lock:
            recorded = await self._repo.streams_of(self.replica_id)
            held = set(self._streams.connected())
            # Nodes waiting in `_dirty` are written by the next flush; leave them to it.
            stale = {n: e for n, e in recorded.items() if n not in held and n not in self._dirty}
            missing = [n for n in held if n not in recorded and n not in self._dirty]
            if stale:
                await self._repo.record_streams(self.replica_id, [], stale, now_ms=self._now_ms())
            claimed = await self._repo.claim_missing(
                self.replica_id, missing, now_ms=self._now_ms()
            )
            self._mine = {n: e for n, e in recorded.items() if n in held} | claimed
            if stale or claimed:
                log.info(
                    "stream directory repaired: %d stale record(s) deleted, %d claimed",
                    len(stale),
                    len(claimed),
                )
            return len(stale), len(claimed)

    async def _write_loop(self) -> None:
        while not self._stop.is_set():
            await self._wake.wait()
            await self._sleep(_COALESCE_SECONDS)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                await self.flush()
            except FleetError as exc:
                log.warning("stream directory: %s; retrying", exc)
                await self._sleep(_RETRY_SECONDS)
                self._wake.set()
            except Exception:
                log.exception("stream directory write failed unexpectedly; retrying")
                await self._sleep(_RETRY_SECONDS)
                self._wake.set()

    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_reconcile = loop.time() + self._reconcile
        while not self._stop.is_set():
            await self._sleep(self._heartbeat)
            if self._stop.is_set():
                return
            try:
                if not await self._repo.touch(self.replica_id, now_ms=self._now_ms()):
                    log.warning("replica %s's row was gone; registering again", self.replica_id)
                    await self._register_again()
                if loop.time() >= next_reconcile:
                    next_reconcile = loop.time() + self._reconcile
                    await self.reconcile()
            except FleetError as exc:
                log.warning("stream directory heartbeat: %s; retrying", exc)
            except Exception:
                log.exception("stream directory heartbeat failed unexpectedly; retrying")

    async def _register_again(self) -> None:
        """Our row vanished (deleted by hand, a restored database): register and record
        every stream we hold again."""
        async with self._lock:
            await self._repo.register(
                self.replica_id, self.address, now_ms=self._now_ms(), live_after_ms=0
            )
            self._mine.clear()
            self._dirty |= set(self._streams.connected())
            self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
