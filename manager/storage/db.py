"""The database handle: engine set-up, transactions with retry, migrations, locks.

Every repository runs its work through `Database.run(body)`, which wraps the
body in one transaction and re-runs the whole transaction when the database
is briefly unavailable (SQLite lock held past busy_timeout, PostgreSQL
refusing or dropping connections). When that lasts longer than the retry
budget the caller gets `fleet.errors.Unavailable`; the next call tries again,
so the manager recovers without a restart when the database returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event, func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import PoolResetState
from sqlalchemy.util import await_

from fleet.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from fleet.retry import Backoff, retrying
from manager.storage.sqlite_hops import on_driver_thread, use_one_hop_cursors
from manager.storage.transient import (
    describe,
    is_constraint_violation,
    is_disk_full,
    is_transient,
)

__all__ = ["Database", "Dialect", "SpaceLog", "advisory_key", "normalize_url"]

log = logging.getLogger(__name__)

Dialect = Literal["sqlite", "postgresql"]
T = TypeVar("T")

MIGRATIONS_DIR: Final = Path(__file__).parent / "migrations"
_BEGIN_OPTION: Final = "fleet_sqlite_begin"
_CLEAN: Final = "fleet_committed"  # connection info: its last transaction committed


def normalize_url(url: str) -> URL:
    """Parse a database URL, choosing the async driver; ConfigError if unusable.

    Accepts sqlite[+aiosqlite]:///path and postgresql[+asyncpg]://...
    """
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError as exc:
        raise ConfigError(f"database url {url!r} is malformed: {exc}") from exc
    backend = parsed.get_backend_name()
    # Only the explicit "+driver" part; get_driver_name() would import the
    # backend's default driver, which may not be installed.
    driver = parsed.drivername.partition("+")[2]
    if backend == "sqlite" and driver in ("", "pysqlite", "aiosqlite"):
        if not parsed.database or parsed.database == ":memory:":
            raise ConfigError(
                f"database url {url!r}: SQLite needs a file path (sqlite+aiosqlite:///path/fleet.db)"
            )
        return parsed.set(drivername="sqlite+aiosqlite")
    if backend == "postgresql" and driver in ("", "asyncpg"):
        return parsed.set(drivername="postgresql+asyncpg")
    raise ConfigError(
        f"database url {parsed.render_as_string(hide_password=True)!r}: unsupported; "
        "use sqlite+aiosqlite:///path or postgresql+asyncpg://user@host/db"
    )


def advisory_key(name: str) -> int:
    """The signed 64-bit PostgreSQL advisory-lock key for a lock name (stable)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def _alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def schema_head() -> str:
    """The newest migration revision this code needs."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


@dataclass
class SpaceLog:
    """When to log writes refused for want of disk space (pure: times are passed in).

    A nearly full disk lets some writes through and refuses others, so one line per
    refusal, or per refusal and recovery, floods the log: an episode is said once when
    it starts, again every `remind_s` while refusals go on, and ends once writes have
    succeeded for `quiet_s` with none refused.
    """

    quiet_s: float = 10.0
    """Seconds of writes without a refusal before the episode is over."""
    remind_s: float = 60.0
    """Seconds between lines while refusals go on."""
    since: float | None = None
    """When the episode's first refusal was (None: no episode)."""
    last: float = 0.0
    """When the last refusal was."""
    said: float = 0.0
    """When the log last said something about it."""
    refusals: int = 0
    """Writes refused since the log last said so."""

    def refused(self, now: float) -> str | None:
        """A write was refused at `now`: the line to log, or None."""
        self.refusals += 1
        self.last = now
        if self.since is None:
            self.since, self.said, self.refusals = now, now, 0
            return (
                "out of disk space: writes are refused with RESOURCE_EXHAUSTED, clients keep "
                "their data and retry; free space on the filesystem holding the database"
            )
        if now - self.said < self.remind_s:
            return None
        n, self.refusals, self.said = self.refusals, 0, now
        return f"still out of disk space after {now - self.since:.0f} s: {n} writes refused"

    def succeeded(self, now: float) -> str | None:
        """A write succeeded at `now`: the line to log, or None."""
        if self.since is None or now - self.last < self.quiet_s:
            return None
        took, self.since = self.last - self.since, None
        return f"writes succeed again ({took:.0f} s of writes refused for want of disk space)"


class Database:
    """An open connection pool to the manager's SQLite or PostgreSQL database.

    Build with `await Database.open(url)`, close with `await db.close()`.
    """

    dialect: Dialect
    """Which backend: "sqlite" or "postgresql"."""

    def __init__(
        self,
        engine: AsyncEngine,
        dialect: Dialect,
        *,
        retry_timeout_s: float,
        backoff: Backoff,
    ) -> None:
        """Use `Database.open`."""
        self._engine = engine
        self.dialect = dialect
        self._retry_timeout_s = retry_timeout_s
        self._backoff = backoff
        # Writes refused for want of disk space: logged once an episode, not per call.
        self._space = SpaceLog()
        # SQLite allows one writer: queue our own writers here instead of
        # letting them spin in busy_timeout against each other.
        self._write_lock = asyncio.Lock()
        # PostgreSQL advisory locks we hold: key -> the connection holding it.
        self._held: dict[int, AsyncConnection] = {}
        self._held_check = asyncio.Lock()
        # run_sqlite's connection (SQLite): taken from the pool once and kept, its writes
        # serialized by _write_lock. A checkout and return through SQLAlchemy's pool costs
        # the event loop ~0.15 ms a transaction, several times SQLite's own for a small one.
        self._hop: AsyncConnection | None = None
        self._hop_driver: Any = None  # aiosqlite's Connection under it
        self.display_url: str = engine.url.render_as_string(hide_password=True)
        """The URL without its password, for messages."""
        self._file_lock: int | None = None  # `open(exclusive=True)`'s lock file descriptor

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        busy_timeout_ms: int = 5000,
        pool_size: int = 10,
        retry_timeout_s: float = 5.0,
        backoff: Backoff | None = None,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        connect_timeout_s: float = 5.0,
        exclusive: bool = False,
    ) -> Database:
        """Connect (checking the database answers) and return the handle.

        `exclusive` (SQLite, a manager's own database): hold an exclusive lock on
        `<file>.lock` until `close` (the kernel drops it if the process dies), so a
        second manager on the same file refuses to start (ConfigError naming the
        holder's pid) instead of both sweeping, converging and driving jobs.

        SQLite: the file and its directory are created; every connection gets
        WAL, busy_timeout, foreign keys and `synchronous` (NORMAL survives a
        process kill; FULL also survives power loss). PostgreSQL: asyncpg with
        a pool of `pool_size`. ConfigError for an unusable URL or credentials,
        Unavailable if the server cannot be reached within the retry budget.
        """
        parsed = normalize_url(url)
        held: int | None = None
        dialect: Dialect
        kwargs: dict[str, Any] = {"pool_size": pool_size}
        if parsed.get_backend_name() == "sqlite":
            dialect = "sqlite"
            assert parsed.database is not None
            try:
                await asyncio.to_thread(_make_parent_dir, parsed.database)
            except OSError as exc:
                raise ConfigError(
                    f"database {parsed.render_as_string()}: cannot create its directory: "
                    f"{exc.strerror or exc}"
                ) from exc
            try:
                # Here, not through the retried ping: at run time "unable to open" is
                # retried (out of file descriptors), at start it is a wrong path.
                await asyncio.to_thread(_open_once, parsed.database)
            except sqlite3.Error as exc:
                raise ConfigError(
                    f"database {parsed.render_as_string()}: cannot open the file: {exc}"
                    " (is the path a directory, or not writable by this user?)"
                ) from exc
            kwargs["connect_args"] = {"timeout": busy_timeout_ms / 1000}
            # Every transaction ends in commit or rollback before its connection goes back,
            # so the pool's unconditional rollback-on-return is one more round trip to the
            # driver's thread per transaction for nothing: _install_sqlite_hooks rolls back
            # only a connection still in a transaction.
            kwargs["pool_reset_on_return"] = None
        else:
            dialect = "postgresql"
            # A pooled connection may have died with a server restart: test
            # it at checkout (SQLite files need no such round trip).
            kwargs["pool_pre_ping"] = True
            # lock_timeout mirrors SQLite's busy_timeout: a lock held longer is
            # a transient error (55P03), retried and then Unavailable, not a hang.
            kwargs["connect_args"] = {
                "timeout": connect_timeout_s,
                "server_settings": {"lock_timeout": str(int(busy_timeout_ms))},
            }
        engine = create_async_engine(parsed, **kwargs)
        if dialect == "sqlite":
            _install_sqlite_hooks(engine, busy_timeout_ms=busy_timeout_ms, synchronous=synchronous)
        if exclusive and dialect == "sqlite":
            assert parsed.database is not None
            try:
                held = await asyncio.to_thread(_hold_sqlite_file, parsed.database)
            except BaseException:
                await engine.dispose()
                raise
        db = cls(
            engine,
            dialect,
            retry_timeout_s=retry_timeout_s,
            backoff=backoff or Backoff(initial=0.05, maximum=1.0),
        )
        db._file_lock = held
        try:
            await db.run(_ping, write=False)
        except sa_exc.DBAPIError as exc:
            await db.close()
            raise ConfigError(f"database {db.display_url}: {describe(exc)}") from exc
        except BaseException:
            await db.close()
            raise
        return db

    @property
    def engine(self) -> AsyncEngine:
        """The SQLAlchemy engine (for tests and tools; repositories use `run`)."""
        return self._engine

    async def close(self) -> None:
        """Close every pooled connection (and let go of the file lock, if held)."""
        try:
            async with self._write_lock:
                await self._drop_hop()
            await self._engine.dispose()
        finally:
            if self._file_lock is not None:
                os.close(self._file_lock)  # drops the flock
                self._file_lock = None

    async def run(
        self, body: Callable[[AsyncConnection], Awaitable[T]], *, write: bool = True
    ) -> T:
        """Run `body` in one transaction, committed when it returns.

        Transient failures re-run the whole body with backoff for up to the
        retry budget, then raise Unavailable. A constraint violation (bad
        input the repositories did not catch) raises InvalidArgument.
        `write=False` marks a read-only body (SQLite: no write lock needed).
        """
        return await self._retried(lambda: self._once(body, write=write), write=write)

    async def run_sqlite(self, fn: Callable[..., T], *args: Any) -> T:
        """SQLite: `fn(sqlite3_connection, *args)` as one write transaction (BEGIN
        IMMEDIATE, `fn`, COMMIT; ROLLBACK if it raises) in one hop to aiosqlite's thread,
        retried and its errors mapped as `run`'s. For small frequent writes (a metric
        commit): `run`'s BEGIN and COMMIT hops and SQLAlchemy's connection and
        transaction cost the event loop ~0.25 ms, more than such a write itself. `fn`
        runs on that thread: plain sqlite3 calls and pure Python only."""
        if self.dialect != "sqlite":
            raise ValueError("run_sqlite: an SQLite database only")
        return await self._retried(lambda: self._sqlite_write(fn, args), write=True)

    async def run_sqlite_read(self, fn: Callable[..., T], *args: Any) -> T:
        """`run_sqlite` for a body that only reads: a deferred transaction (BEGIN, `fn`,
        COMMIT) in one hop, without the write lock (a read does not queue behind the
        writers; WAL gives it one snapshot). `fn` must not write."""
        if self.dialect != "sqlite":
            raise ValueError("run_sqlite_read: an SQLite database only")
        return await self._retried(lambda: self._sqlite_read(fn, args), write=False)

    async def _retried(self, attempt: Callable[[], Awaitable[T]], *, write: bool) -> T:
        started = time.monotonic()
        try:
            try:
                # The first attempt outside tenacity's loop, which costs the event loop
                # ~0.1 ms a transaction: most succeed. After a transient failure the
                # loop tries again at once, then backs off, within the same budget.
                result = await attempt()
            except Exception as exc:
                if not is_transient(exc):
                    raise
            else:
                if write and self._space.since is not None:
                    self._log_space(self._space.succeeded(time.monotonic()))
                return result
            left = max(0.0, self._retry_timeout_s - (time.monotonic() - started))
            async for retry in retrying(self._backoff, retry_if=is_transient, deadline=left):
                with retry:
                    return await attempt()
        except sa_exc.IntegrityError as exc:
            raise InvalidArgument(f"rejected by the database: {describe(exc)}") from exc
        except Exception as exc:
            if is_constraint_violation(exc):  # raised by the driver directly (COPY)
                raise InvalidArgument(f"rejected by the database: {describe(exc)}") from exc
            if is_disk_full(exc):
                raise self._disk_full(exc) from exc
            if not is_transient(exc):
                raise
            elapsed = time.monotonic() - started
            raise Unavailable(
                f"database {self.display_url} is unavailable ({describe(exc)}); "
                f"gave up after {elapsed:.1f}s of retries"
            ) from exc
        raise AssertionError("unreachable: retrying() either returns or raises")

    def _disk_full(self, exc: BaseException) -> ResourceExhausted:
        """The error for a write refused for want of disk space (logged by `SpaceLog`)."""
        said = self._space.refused(time.monotonic())
        if said is not None:
            self._log_space(f"{said} ({describe(exc)})")
        return ResourceExhausted(
            f"database {self.display_url} is out of disk space ({describe(exc)}); nothing "
            "was stored: retry once an operator frees space on the manager"
        )

    def _log_space(self, said: str | None) -> None:
        if said is not None:
            level = logging.WARNING if said.startswith("writes succeed") else logging.ERROR
            log.log(level, "database %s: %s", self.display_url, said)

    async def _sqlite_write(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        async with self._write_lock:
            driver = self._hop_driver
            if driver is None:
                self._hop = await self._engine.connect()
                raw = await self._hop.get_raw_connection()
                driver = self._hop_driver = raw.driver_connection
            try:
                result: T = await driver._execute(
                    _sqlite_transaction, driver._conn, fn, args, "IMMEDIATE"
                )
            finally:
                if driver._connection is None:  # closed under us: take another next time
                    await self._drop_hop()
            # Ended on the thread, committed or rolled back, even if we were cancelled
            # meanwhile (the next hop queues behind it on the same thread).
            return result

    async def _drop_hop(self) -> None:
        hop, self._hop, self._hop_driver = self._hop, None, None
        if hop is not None:
            with contextlib.suppress(Exception):
                await hop.close()

    async def _sqlite_read(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        # A pooled connection of its own: reads run beside the writes' kept one.
        async with self._engine.connect() as conn:
            result: T = await on_driver_thread(conn, _sqlite_transaction, fn, args, "DEFERRED")
            # The transaction ended on the thread, committed or rolled back, even if we
            # were cancelled meanwhile: the pool's reset may skip its rollback.
            conn.info[_CLEAN] = True
            return result

    async def _once(self, body: Callable[[AsyncConnection], Awaitable[T]], *, write: bool) -> T:
        if self.dialect == "sqlite" and write:
            async with self._write_lock:
                return await self._transaction(body, "IMMEDIATE")
        return await self._transaction(body, "DEFERRED")

    async def _transaction(self, body: Callable[[AsyncConnection], Awaitable[T]], mode: str) -> T:
        async with self._engine.connect() as conn:
            if self.dialect == "sqlite":
                # IMMEDIATE takes the write lock at BEGIN, so a writer never
                # fails half-way on a read->write upgrade (which busy_timeout
                # cannot resolve).
                await conn.execution_options(**{_BEGIN_OPTION: mode})
            async with conn.begin():
                result = await body(conn)
            if self.dialect == "sqlite":
                # Committed, nothing of ours left queued on aiosqlite's thread: the
                # pool's reset may skip its rollback (see _install_sqlite_hooks).
                conn.info[_CLEAN] = True
            return result

    async def migrate(self) -> None:
        """Upgrade the schema to the newest revision (idempotent).

        On PostgreSQL a transaction-scoped advisory lock keeps two replicas
        starting at once from migrating concurrently.
        """

        async def body(conn: AsyncConnection) -> str | None:
            if self.dialect == "postgresql":
                await conn.execute(
                    select(func.pg_advisory_xact_lock(advisory_key("fleet-migrate")))
                )
            return await conn.run_sync(_upgrade)

        before = await self.run(body)
        head = schema_head()
        if before == head:
            log.info("database %s is at schema %s: nothing to migrate", self.display_url, head)
        else:
            log.info(
                "database %s migrated from %s to %s", self.display_url, before or "empty", head
            )

    async def schema_revision(self) -> str | None:
        """The revision the database is at, None if never migrated."""

        async def body(conn: AsyncConnection) -> str | None:
            return await conn.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision()
            )

        return await self.run(body, write=False)

    async def check_schema(self) -> None:
        """FailedPrecondition unless the schema is at the revision this code needs."""
        current = await self.schema_revision()
        head = schema_head()
        if current != head:
            shown = current if current is not None else "nothing (never migrated)"
            raise FailedPrecondition(
                f"database schema is at {shown}, needs {head}: run fleet-manager migrate"
            )

    def advisory_lock(self, name: str) -> AbstractAsyncContextManager[bool]:
        """Try to take the cluster-wide lock `name`; yields True if we hold it.

        PostgreSQL: pg_try_advisory_lock on a dedicated connection kept while
        inside; released on exit, or by the server if that connection dies
        (hold it for one unit of work, or check `advisory_lock_held` between
        units). Re-entering a lock this Database already holds yields False.
        SQLite: one manager per file, so always True. Unavailable if the
        database cannot be reached.
        """
        if self.dialect == "sqlite":
            return _always_held()
        return self._pg_advisory_lock(advisory_key(name))

    async def advisory_lock_held(self, name: str, *, timeout_s: float = 5.0) -> bool:
        """True while we still hold `name` (taken with `advisory_lock`) and its connection lives.

        A leader holding the lock for a long time should check this between
        units of work: if the server dropped the lock connection, another
        replica may already have taken the lock. SQLite: always True.
        """
        if self.dialect == "sqlite":
            return True
        conn = self._held.get(advisory_key(name))
        if conn is None:
            return False
        async with self._held_check:
            try:
                async with asyncio.timeout(timeout_s):
                    await conn.execute(select(1))
                    await conn.commit()
            except Exception as exc:
                log.warning("lost advisory lock %r: %s", name, describe(exc))
                return False
        return True

    @asynccontextmanager
    async def _pg_advisory_lock(self, key: int) -> AsyncIterator[bool]:
        conn, held = await self._try_lock(key)
        if held:
            self._held[key] = conn
        try:
            yield held
        finally:
            if held:
                self._held.pop(key, None)
            try:
                if held:
                    await conn.execute(select(func.pg_advisory_unlock(key)))
                    await conn.commit()
            except Exception as exc:  # the connection died: the server dropped the lock
                log.warning("advisory unlock failed (%s); discarding the connection", describe(exc))
                await conn.invalidate()
            finally:
                await conn.close()

    async def _try_lock(self, key: int) -> tuple[AsyncConnection, bool]:
        try:
            async for attempt in retrying(
                self._backoff, retry_if=is_transient, deadline=self._retry_timeout_s
            ):
                with attempt:
                    conn = await self._engine.connect()
                    try:
                        held = await conn.scalar(select(func.pg_try_advisory_lock(key)))
                        await conn.commit()
                    except BaseException:
                        await conn.close()
                        raise
                    return conn, bool(held)
        except Exception as exc:
            if not is_transient(exc):
                raise
            raise Unavailable(
                f"database {self.display_url} is unavailable ({describe(exc)})"
            ) from exc
        raise AssertionError("unreachable: retrying() either returns or raises")


def _make_parent_dir(path: str) -> None:
    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _hold_sqlite_file(path: str) -> int:
    """An exclusive flock on `<path>.lock`, held by the returned descriptor (which also
    holds this process's pid); ConfigError if another process holds it."""
    lock = Path(path).expanduser().with_name(Path(path).name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(
            f"database {path} is in use by another fleet-manager (pid {holder}):"
            " an SQLite database serves one manager; stop that one first, or use"
            " PostgreSQL to run several (docs/operations-manager.md)"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _open_once(path: str) -> None:
    sqlite3.connect(str(Path(path).expanduser()) if path else "").close()


def _sqlite_transaction(
    db: sqlite3.Connection, fn: Callable[..., T], args: tuple[Any, ...], mode: str
) -> T:
    # On aiosqlite's thread (Database.run_sqlite): the whole transaction, never left open.
    db.execute(f"BEGIN {mode}").close()
    try:
        result = fn(db, *args)
        db.execute("COMMIT").close()
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK").close()
        raise
    return result


async def _ping(conn: AsyncConnection) -> None:
    await conn.execute(select(1))


def _upgrade(connection: Connection) -> str | None:
    """Upgrade to head; the revision it was at before (None: never migrated)."""
    before: str | None = MigrationContext.configure(connection).get_current_revision()
    command.upgrade(_alembic_config(connection), "head")
    return before


@asynccontextmanager
async def _always_held() -> AsyncIterator[bool]:
    yield True


def _install_sqlite_hooks(engine: AsyncEngine, *, busy_timeout_ms: int, synchronous: str) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        use_one_hop_cursors(dbapi_connection)  # one hop to aiosqlite's thread per statement
        # We emit BEGIN ourselves (see _on_begin), so sqlite3 must not.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        # Straight to aiosqlite: one round trip to its thread (exec_driver_sql makes three:
        # cursor, execute, close). Its errors are the DB-API's, wrapped by SQLAlchemy as usual.
        driver = conn.connection.driver_connection
        assert driver is not None
        await_(driver.execute(f"BEGIN {mode}"))

    @event.listens_for(engine.sync_engine, "reset")
    def _on_reset(dbapi_connection: Any, record: Any, state: PoolResetState) -> None:
        # The rollback-on-return the pool no longer does (pool_reset_on_return=None),
        # skipped only after a transaction that committed (Database._transaction says
        # so). Not judged by `in_transaction`: a call cancelled while it waited for
        # aiosqlite's thread (a BEGIN) still runs there later, and only a rollback
        # queued behind it undoes it.
        if not state.asyncio_safe:
            return
        if record is not None and record.info.pop(_CLEAN, False):
            return
        dbapi_connection.rollback()
