"""WatchEvents: replay the event log from an id, then follow it as it grows.

A follower wakes up two ways:

- at once when *this* manager commits a transaction that wrote to the
  events table: `EventFeed.install(engine)` adds SQLAlchemy listeners that
  notice an ``INSERT INTO events`` and, once the committed connection is
  back in the pool, wake every watcher (so
  every writer is covered: registry, agent syncs, the sweeper, operations,
  without each of them having to remember to notify);
- every `poll_interval` seconds (1 s by default) it re-reads anyway, for
  events other manager replicas wrote to the shared database.

A watch is resumable from any id: it sends ids greater than `from_id` in
order (ids become visible in id order; see `manager.storage.events`).
`start` finds where a watch that wants only the newest `tail` events
begins: after the matching event just older than them (one indexed lookup
of tail + 1 rows), or, for tail 0, after the newest event of all ("from
now"), so no history is read to be skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from fleet.errors import InvalidArgument
from fleet.labels import validate_node_id
from manager.storage import EventRecord, EventRepository

__all__ = ["EventFeed", "WatchStart"]

_FLAG = "fleet_wrote_events"


@dataclass(frozen=True)
class WatchStart:
    """Where a watch begins."""

    after_id: int
    """Send events with an id greater than this."""
    older_left_out: bool
    """True when matching events older than the first one sent were left out (tail)."""


class EventFeed:
    """Streams events to watchers; woken by local commits, polling for other replicas."""

    def __init__(
        self, events: EventRepository, *, poll_interval: float = 1.0, batch_size: int = 500
    ) -> None:
        if poll_interval <= 0 or batch_size < 1:
            raise ValueError("poll_interval must be > 0 and batch_size >= 1")
        self._events = events
        self._poll_interval = poll_interval
        self._batch = batch_size
        self._changed = asyncio.Event()  # replaced on every notify (a broadcast)

    @property
    def poll_interval(self) -> float:
        """Seconds between re-reads while nothing was written locally."""
        return self._poll_interval

    def notify(self) -> None:
        """Wake every watcher now (new events may be in the database)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def install(self, engine: AsyncEngine) -> Callable[[], None]:
        """Wake watchers whenever a transaction of `engine` that wrote events commits.

        Returns a function that removes the listeners again.
        """
        loop = asyncio.get_running_loop()
        sync_engine = engine.sync_engine

        def after_execute(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            if statement.lstrip()[:18].upper() == "INSERT INTO EVENTS":
                conn.info[_FLAG] = True

        def on_rollback(conn: Any) -> None:
            if not conn.invalidated:  # a dead connection's info is gone (and touching it raises)
                conn.info.pop(_FLAG, None)

        # On check-in, not on "commit": that event fires before the commit is
        # done, and a watcher woken then could read before the rows are visible.
        def on_checkin(dbapi_connection: Any, record: Any) -> None:
            if record is not None and record.info.pop(_FLAG, False):
                loop.call_soon_threadsafe(self.notify)

        listeners: list[tuple[str, Callable[..., None]]] = [
            ("after_cursor_execute", after_execute),
            ("rollback", on_rollback),
            ("checkin", on_checkin),
        ]
        for name, fn in listeners:
            event.listen(sync_engine, name, fn)

        def remove() -> None:
            for name, fn in listeners:
                event.remove(sync_engine, name, fn)

        return remove

    async def start(
        self,
        from_id: int = 0,
        *,
        tail: int | None = None,
        kinds: Collection[str] = (),
        node_id: str = "",
    ) -> WatchStart:
        """Where a watch of events after `from_id` begins to send only the last `tail`.

        tail None: from `from_id` (everything after it); 0: from the newest
        event now, so a followed watch sends only what happens from now on.
        """
        _check(from_id, node_id)
        if tail is None:
            return WatchStart(from_id, older_left_out=False)
        if tail < 0:
            raise InvalidArgument(f"must be >= 0, got {tail}", field="tail")
        if tail == 0:
            return WatchStart(max(from_id, await self._events.latest_id()), older_left_out=False)
        before = await self._events.id_before_last(
            tail, after_id=from_id, kinds=kinds, node_id=node_id
        )
        if before is None:
            return WatchStart(from_id, older_left_out=False)
        return WatchStart(before, older_left_out=True)

    async def watch(
        self,
        from_id: int = 0,
        *,
        kinds: Collection[str] = (),
        node_id: str = "",
        follow: bool = False,
    ) -> AsyncGenerator[EventRecord, None]:
        """Events with id > `from_id` (filtered), oldest first; with `follow`, forever.

        Stop iterating (or cancel) to end a followed watch.
        """
        _check(from_id, node_id)
        last = from_id
        while True:
            # Taken before the read: a commit during the read still wakes us.
            changed = self._changed
            batch = await self._events.list_after(
                last, limit=self._batch, kinds=kinds, node_id=node_id
            )
            for record in batch:
                last = record.id
                yield record
            if len(batch) == self._batch:
                continue  # more is waiting
            if not follow:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await changed.wait()


def _check(from_id: int, node_id: str) -> None:
    if from_id < 0:
        raise InvalidArgument(f"must be >= 0, got {from_id}", field="from_event_id")
    if node_id:
        validate_node_id(node_id)
