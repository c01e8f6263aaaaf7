"""The event log: node/agent transitions and operations, ordered by a monotonic id.

Ids come from INTEGER PRIMARY KEY AUTOINCREMENT (SQLite) or a BIGSERIAL
(PostgreSQL), and they become visible in id order, so a watcher polling
`list_after(last_id)` never skips one. SQLite gets that for free (one writer
at a time). On PostgreSQL concurrent transactions (replicas, or one
manager's parallel calls) could commit a smaller id after a larger one is
visible; so every transaction that appends events first takes a
transaction-scoped advisory lock ("fleet-events"), and ids are drawn, and
committed, one transaction at a time. Event writes are the last statements
of their transactions, so the lock is held only for the commit.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import Select, bindparam, func, insert, select
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from fleet.errors import InvalidArgument
from manager.storage.db import Database, advisory_key
from manager.storage.records import EVENT_KINDS, EventRecord
from manager.storage.schema import events
from manager.storage.sqlite_hops import on_driver_thread

__all__ = [
    "EventRepository",
    "dump_map",
    "event_row",
    "insert_events",
    "load_map",
    "sqlite_insert_events",
]

_EVENTS_LOCK = advisory_key("fleet-events")
_Row = TypeVar("_Row", bound=tuple[Any, ...])


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
_quoted = json.encoder.encode_basestring_ascii  # what that encoder quotes a str with


def dump_map(value: Mapping[str, str]) -> str:
    """A str->str mapping as canonical JSON text (sorted keys)."""
    items = sorted(value.items())
    if all(type(k) is str and type(v) is str for k, v in items):
        # As the encoder writes it, without making one per call (`json.dumps` with these
        # arguments makes two, ~3 of its ~4 us): every target that ends writes an event.
        return "{" + ",".join([_quoted(k) + ":" + _quoted(v) for k, v in items]) + "}"
    return _CANONICAL.encode(dict(value))


_MAPS: dict[str, dict[str, str]] = {}
"""Parsed maps by their text: listing every node parsed three maps a row, and most
rows' texts are the same from one listing to the next (and often across nodes)."""
_MAPS_MAX = 100_000


def load_map(text: str) -> dict[str, str]:
    """The inverse of `dump_map` (a new dict each call: callers may change it)."""
    parsed = _MAPS.get(text)
    if parsed is None:
        loaded = json.loads(text) if text else {}
        parsed = {str(k): str(v) for k, v in loaded.items()}
        if len(_MAPS) >= _MAPS_MAX:
            _MAPS.clear()  # bounded; refilled by the next listing
        _MAPS[text] = parsed
    return parsed.copy()


def event_row(
    kind: str,
    *,
    now_ms: int,
    node_id: str = "",
    agent_id: str = "",
    message: str = "",
    actor: str = "",
    attributes: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One events-table row; InvalidArgument for an unknown kind."""
    if kind not in EVENT_KINDS:
        raise InvalidArgument(f"unknown event kind {kind!r}", field="kind")
    return {
        "ts_ms": now_ms,
        "kind": kind,
        "node_id": node_id,
        "agent_id": agent_id,
        "message": message,
        "actor": actor,
        "attributes": dump_map(attributes or {}),
    }


async def insert_events(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    """Append rows (from `event_row`) inside the caller's transaction.

    Call it last in the transaction: on PostgreSQL it serializes event
    writers until commit (see the module docstring).
    """
    if not rows:
        return
    if conn.dialect.name == "sqlite":
        # One hop to aiosqlite's thread (exec_driver_sql's statement set-up cost about
        # as much again as the insert of an agent state report's one event).
        await on_driver_thread(conn, sqlite_insert_events, rows)
        return
    await _serialize_event_writers(conn)
    # To the driver's executemany as tuples: SQLAlchemy's per-row parameter
    # processing cost ~6 us a row, and a 500-target job writes 500 events.
    values = [tuple(r[c] for c in _COLUMNS) for r in rows]
    await conn.exec_driver_sql(_insert_sql(conn.dialect), values)


def sqlite_insert_events(db: sqlite3.Connection, rows: Sequence[dict[str, Any]]) -> None:
    """`insert_events` on aiosqlite's thread, in the transaction `db` holds."""
    if rows:
        values = [tuple(r[c] for c in _COLUMNS) for r in rows]
        db.executemany(_insert_sql(_SQLITE), values).close()


_SQLITE = sqlite_dialect()


_COLUMNS = ("ts_ms", "kind", "node_id", "agent_id", "message", "actor", "attributes")
"""An `event_row`'s keys, in the order of `_insert_sql`'s parameters."""
_INSERT_SQL: dict[str, str] = {}


def _insert_sql(dialect: Dialect) -> str:
    """The dialect's positional INSERT of one event row (compiled once per dialect; the
    columns are text and integers, which both drivers take as they are)."""
    sql = _INSERT_SQL.get(dialect.name)
    if sql is None:
        stmt = insert(events).values({c: bindparam(f"b_{c}") for c in _COLUMNS})
        compiled = stmt.compile(dialect=dialect, for_executemany=True)  # no RETURNING
        assert compiled.positiontup == [f"b_{c}" for c in _COLUMNS]
        sql = _INSERT_SQL[dialect.name] = compiled.string
    return sql


async def _serialize_event_writers(conn: AsyncConnection) -> None:
    if conn.dialect.name == "postgresql":
        await conn.execute(select(func.pg_advisory_xact_lock(_EVENTS_LOCK)))


def _matching(
    query: Select[_Row], after_id: int, kinds: Collection[str], node_id: str
) -> Select[_Row]:
    """`query` narrowed to events after `after_id` of `kinds` (all if empty) about `node_id`."""
    unknown = sorted(set(kinds) - EVENT_KINDS)
    if unknown:
        raise InvalidArgument(f"unknown event kind(s) {', '.join(unknown)}", field="kinds")
    query = query.where(events.c.id > after_id)
    if kinds:
        query = query.where(events.c.kind.in_(sorted(set(kinds))))
    if node_id:
        query = query.where(events.c.node_id == node_id)
    return query


def _record(row: Any) -> EventRecord:
    return EventRecord(
        id=row.id,
        timestamp_ms=row.ts_ms,
        kind=row.kind,
        node_id=row.node_id,
        agent_id=row.agent_id,
        message=row.message,
        actor=row.actor,
        attributes=load_map(row.attributes),
    )


class EventRepository:
    """Appends to and reads the event log."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def append(
        self,
        kind: str,
        *,
        node_id: str = "",
        agent_id: str = "",
        message: str = "",
        actor: str = "",
        attributes: Mapping[str, str] | None = None,
        now_ms: int,
    ) -> int:
        """Append one event and return its id."""
        row = event_row(
            kind,
            now_ms=now_ms,
            node_id=node_id,
            agent_id=agent_id,
            message=message,
            actor=actor,
            attributes=attributes,
        )

        async def body(conn: AsyncConnection) -> int:
            await _serialize_event_writers(conn)
            result = await conn.execute(insert(events).values(row).returning(events.c.id))
            return int(result.scalar_one())

        return await self._db.run(body)

    async def list_after(
        self,
        after_id: int,
        *,
        limit: int = 500,
        kinds: Collection[str] = (),
        node_id: str = "",
    ) -> list[EventRecord]:
        """Events with id > after_id, oldest first, at most `limit`, optionally filtered."""
        if limit < 1:
            raise InvalidArgument(f"must be >= 1, got {limit}", field="limit")
        query = _matching(select(events), after_id, kinds, node_id)
        query = query.order_by(events.c.id).limit(limit)

        async def body(conn: AsyncConnection) -> list[EventRecord]:
            return [_record(row) for row in await conn.execute(query)]

        return await self._db.run(body, write=False)

    async def id_before_last(
        self, count: int, *, after_id: int = 0, kinds: Collection[str] = (), node_id: str = ""
    ) -> int | None:
        """The id of the newest matching event older than the last `count` of them.

        `list_after` from it gives exactly the last `count` matching events
        with id > after_id. None when there are no more than `count`. One
        backward walk over the primary key (or the (node_id, id) index) of
        count + 1 matching rows, whatever the log's length.
        """
        if count < 0:
            raise InvalidArgument(f"must be >= 0, got {count}", field="count")
        query = _matching(select(events.c.id), after_id, kinds, node_id)
        query = query.order_by(events.c.id.desc()).limit(1).offset(count)

        async def body(conn: AsyncConnection) -> int | None:
            found = await conn.scalar(query)
            return None if found is None else int(found)

        return await self._db.run(body, write=False)

    async def latest_id(self) -> int:
        """The newest event id, 0 if there is none."""

        async def body(conn: AsyncConnection) -> int:
            return int(await conn.scalar(select(func.coalesce(func.max(events.c.id), 0))) or 0)

        return await self._db.run(body, write=False)
