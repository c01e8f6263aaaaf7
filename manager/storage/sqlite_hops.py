"""SQLAlchemy's aiosqlite adapter with one hop to the driver's thread per statement.

aiosqlite runs sqlite3 on a thread of its own; every call is a hop there and
back (a queue put, and a wake-up of the event loop through its self-pipe).
SQLAlchemy's adapter makes four per statement (open a cursor, execute,
fetch, close it), which on a manager holding thousands of idle streams was
most of the event loop's wake-ups. `OneHopCursor` does the four in one
function run on that thread and keeps what SQLAlchemy reads afterwards
(rows, description, rowcount, lastrowid). `use_one_hop_cursors` switches a
connection over; `Database.open` does it for every SQLite connection.
`on_driver_thread` runs a function of several statements there in one hop.

It relies on aiosqlite's `_execute` and `_conn`, as SQLAlchemy's own adapter
does (its `isolation_level` setter).
"""

from __future__ import annotations

import collections
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.util import EMPTY_DICT

__all__ = ["OneHopCursor", "on_driver_thread", "use_one_hop_cursors"]

T = TypeVar("T")

_Outcome = tuple[Any, list[Any], int, int | None]


def _execute(conn: sqlite3.Connection, operation: str, parameters: Any) -> _Outcome:
    # Runs on aiosqlite's thread: the whole statement, its rows and its counts.
    cur = conn.cursor()
    try:
        if parameters is None:
            cur.execute(operation)
        else:
            cur.execute(operation, parameters)
        description = cur.description
        rows = cur.fetchall() if description else []
        return description, rows, cur.rowcount, cur.lastrowid
    finally:
        cur.close()


def _executemany(conn: sqlite3.Connection, operation: str, seq: Sequence[Any]) -> _Outcome:
    cur = conn.cursor()
    try:
        cur.executemany(operation, seq)
        return None, [], cur.rowcount, cur.lastrowid
    finally:
        cur.close()


class OneHopCursor(AsyncAdapt_aiosqlite_cursor):
    """A client-side cursor whose statement, fetch and close are one hop."""

    __slots__ = ("_description", "_lastrowid", "_rowcount")
    _awaitable_cursor_close = False  # nothing open on the thread to close

    def __init__(self, adapt_connection: Any) -> None:  # no cursor opened up front
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        self._cursor = None  # type: ignore[assignment]
        self._soft_closed_memoized = EMPTY_DICT
        self._rows = collections.deque()
        self._description: Any = None
        self._rowcount = -1
        self._lastrowid: int | None = None

    @property
    def description(self) -> Any:
        return self._description

    @property
    def rowcount(self) -> int:
        return self._rowcount

    @property
    def lastrowid(self) -> Any:
        return self._lastrowid

    @property
    def arraysize(self) -> int:
        return 1

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        pass

    async def _execute_async(self, operation: Any, parameters: Any) -> Any:
        async with self._adapt_connection._execute_mutex:
            outcome = await self._connection._execute(
                _execute, self._connection._conn, operation, parameters
            )
        self._take(outcome)

    async def _executemany_async(self, operation: Any, seq_of_parameters: Any) -> Any:
        async with self._adapt_connection._execute_mutex:
            outcome = await self._connection._execute(
                _executemany, self._connection._conn, operation, seq_of_parameters
            )
        self._take(outcome)

    def _take(self, outcome: _Outcome) -> None:
        self._description, rows, self._rowcount, self._lastrowid = outcome
        self._rows = collections.deque(rows)


class _OneHopConnection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ()
    _cursor_cls = OneHopCursor


def use_one_hop_cursors(dbapi_connection: Any) -> None:
    """Make this adapted aiosqlite connection's (non-server-side) cursors `OneHopCursor`s."""
    if type(dbapi_connection) is AsyncAdapt_aiosqlite_connection:
        dbapi_connection.__class__ = _OneHopConnection


async def on_driver_thread(conn: AsyncConnection, fn: Callable[..., T], *args: Any) -> T:
    """`fn(sqlite3_connection, *args)` run on aiosqlite's thread in one hop, inside the
    transaction `conn` holds (an SQLite connection of `Database`). Its errors are the
    sqlite3 module's, unwrapped (`manager.storage.transient` judges those too)."""
    raw = await conn.get_raw_connection()
    adapted: Any = raw.dbapi_connection  # SQLAlchemy's adapter around aiosqlite's connection
    driver: Any = raw.driver_connection
    async with adapted._execute_mutex:
        result: T = await driver._execute(fn, driver._conn, *args)
    return result
