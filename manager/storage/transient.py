"""Which database errors are worth retrying (pure: looks only at the exception)."""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterator
from typing import Final

from sqlalchemy import exc as sa_exc

__all__ = ["describe", "is_constraint_violation", "is_disk_full", "is_transient"]

# PostgreSQL SQLSTATEs that mean "try again": connection exceptions (class 08),
# server shutting down or starting, too many connections, the two concurrency
# aborts a retry of the whole transaction resolves, and lock_timeout (55P03).
_TRANSIENT_SQLSTATES: Final = frozenset(
    {"57P01", "57P02", "57P03", "53300", "40001", "40P01", "55P03"}
)
# SQLite: another connection holds the lock past busy_timeout; or a file (a journal,
# a temporary file) could not be opened, at run time almost always the process out of
# file descriptors in a connection storm (a missing database fails at start instead).
_SQLITE_TRANSIENT: Final = (
    "database is locked",
    "database table is locked",
    "database is busy",
    "unable to open database file",
)
_OS_TRANSIENT_ERRNOS: Final = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EMFILE,  # out of file descriptors: a connection storm passes
        errno.ENFILE,
    }
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, the DB-API error SQLAlchemy wraps, and their causes (cycle-safe)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        if isinstance(cur, sa_exc.DBAPIError):
            orig = cur.orig
            todo.append(orig if isinstance(orig, BaseException) else None)
        todo.extend((cur.__cause__, cur.__context__))


def is_transient(exc: BaseException) -> bool:
    """True if retrying the whole transaction later may succeed.

    Lock contention (SQLite "database is locked"), a server that refuses or
    drops connections, is shutting down or restarting, or aborted us to
    break a deadlock. Constraint violations, syntax errors and bad
    credentials are not transient.
    """
    for cur in _chain(exc):
        if isinstance(cur, sa_exc.DBAPIError) and cur.connection_invalidated:
            return True
        if isinstance(cur, TimeoutError | ConnectionError):
            return True
        if isinstance(cur, OSError) and (
            cur.errno in _OS_TRANSIENT_ERRNOS
            # asyncio's create_connection over several addresses raises a bare
            # OSError("Multiple exceptions: ... Connect call failed ...").
            or (cur.errno is None and "Connect call failed" in str(cur))
        ):
            return True
        sqlstate = getattr(cur, "sqlstate", None)
        if isinstance(sqlstate, str) and (
            sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith("08")
        ):
            return True
        text = str(cur).lower()
        if any(marker in text for marker in _SQLITE_TRANSIENT):
            return True
        if "connection is closed" in text or "connection was closed" in text:
            return True
    return False


def is_disk_full(exc: BaseException) -> bool:
    """True if the database could not write for want of disk space (or quota).

    SQLite says SQLITE_FULL ("database or disk is full"), PostgreSQL SQLSTATE 53100,
    a file write ENOSPC/EDQUOT. Not transient: retrying at once fails the same way
    until an operator frees space, so callers are told at once (RESOURCE_EXHAUSTED).
    """
    for cur in _chain(exc):
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if getattr(cur, "sqlstate", None) == "53100":
            return True
        if isinstance(cur, sqlite3.Error) and "database or disk is full" in str(cur).lower():
            return True
    return False


def is_constraint_violation(exc: BaseException) -> bool:
    """True for an integrity constraint violation (SQLSTATE class 23): bad input."""
    if isinstance(exc, sa_exc.IntegrityError):
        return True
    for cur in _chain(exc):
        if isinstance(cur, sqlite3.IntegrityError):  # raised by aiosqlite directly
            return True
        sqlstate = getattr(cur, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith("23"):
            return True
    return False


def describe(exc: BaseException) -> str:
    """A one-line reason for an operator, without SQL text or parameters."""
    base: BaseException = exc
    if isinstance(exc, sa_exc.DBAPIError) and isinstance(exc.orig, BaseException):
        base = exc.orig
    text = str(base).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(base).__name__}: {first}" if first else type(base).__name__
