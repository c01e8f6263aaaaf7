"""Database: migrations, schema checks, URLs, transient failures, advisory locks."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import make_url

from fleet.errors import ConfigError, FailedPrecondition, InvalidArgument, Unavailable
from manager.storage import AuditRepository, Database, NodeRecord, NodeRepository
from manager.storage.db import schema_head
from manager.storage.schema import metadata


async def test_migrate_empty_database_then_schema_matches_the_code(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """migrate() on an empty database reaches head, is idempotent, and equals schema.py;
    its log says what it did (and that a second run had nothing to do)."""
    caplog.set_level("INFO", logger="manager.storage.db")
    db = await Database.open(database_url)
    try:
        assert await db.schema_revision() is None
        await db.migrate()
        await db.migrate()
        assert await db.schema_revision() == schema_head()
        said = [r.getMessage() for r in caplog.records if r.name == "manager.storage.db"]
        assert said[-2].endswith(f" migrated from empty to {schema_head()}"), said
        assert said[-1].endswith(f" is at schema {schema_head()}: nothing to migrate"), said
        await db.check_schema()
        async with db.engine.connect() as conn:
            diff = await conn.run_sync(
                lambda c: compare_metadata(
                    MigrationContext.configure(c, opts={"compare_type": True}), metadata
                )
            )
        assert diff == []
    finally:
        await db.close()


async def test_check_schema_on_unmigrated_database_says_what_to_do(database_url: str) -> None:
    """check_schema() before migrate names the needed revision and the command to run."""
    db = await Database.open(database_url)
    try:
        with pytest.raises(FailedPrecondition) as err:
            await db.check_schema()
    finally:
        await db.close()
    assert str(err.value) == (
        f"database schema is at nothing (never migrated), needs {schema_head()}: "
        "run fleet-manager migrate"
    )


async def test_data_survives_reopening(database_url: str) -> None:
    """What one Database wrote, a new Database on the same URL reads."""
    first = await Database.open(database_url)
    try:
        await first.migrate()
        await NodeRepository(first).upsert(
            NodeRecord("n1", "h", "10.0.0.1", "linux", "x86_64", {}, "1", "1", "h:1"), now_ms=5
        )
    finally:
        await first.close()
    second = await Database.open(database_url)
    try:
        await second.check_schema()
        assert await NodeRepository(second).known_ids() == {"n1"}
    finally:
        await second.close()


async def test_sqlite_connections_use_wal_and_busy_timeout(tmp_path: Any) -> None:
    """Every SQLite connection runs in WAL mode with the configured busy timeout."""
    db = await Database.open(f"sqlite:///{tmp_path}/sub/dir/m.db", busy_timeout_ms=1234)
    try:
        async with db.engine.connect() as conn:
            mode = await conn.scalar(text("PRAGMA journal_mode"))
            timeout = await conn.scalar(text("PRAGMA busy_timeout"))
            sync = await conn.scalar(text("PRAGMA synchronous"))
            fks = await conn.scalar(text("PRAGMA foreign_keys"))
        assert (mode, timeout, sync, fks) == ("wal", 1234, 1, 1)  # 1 = NORMAL
        assert db.dialect == "sqlite"
    finally:
        await db.close()


async def test_sqlite_cancelled_writer_leaves_no_transaction_open(tmp_path: Any) -> None:
    """A write transaction cancelled mid-body is rolled back and its lock released: the
    pool no longer rolls back every returned connection, only one left in a transaction."""
    db = await Database.open(f"sqlite:///{tmp_path}/m.db", busy_timeout_ms=200)
    await db.migrate()
    inside = asyncio.Event()
    insert = text("INSERT INTO metric_batches (node_id, sequence, received_ms) VALUES ('n', :s, 1)")

    async def stuck(conn: Any) -> None:
        await conn.execute(insert, {"s": 1})
        inside.set()
        await asyncio.sleep(60)

    async def write(conn: Any) -> None:
        await conn.execute(insert, {"s": 2})

    try:
        task = asyncio.create_task(db.run(stuck))
        await inside.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The write lock is free (busy_timeout is 0.2 s) and nothing of the body stayed.
        await db.run(write)
        async with db.engine.connect() as conn:
            assert not (await conn.get_raw_connection()).driver_connection.in_transaction
            assert await conn.scalar(text("SELECT sequence FROM metric_batches")) == 2
    finally:
        await db.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://u@h/db", "unsupported"),
        ("sqlite+aiosqlite://", "needs a file path"),
        ("not a url", "malformed"),
    ],
)
async def test_unusable_urls_are_config_errors(url: str, message: str) -> None:
    """A URL of an unsupported backend or without a file is a one-line ConfigError."""
    with pytest.raises(ConfigError, match=message):
        await Database.open(url)


async def test_unreachable_postgres_is_unavailable_without_the_password() -> None:
    """A server that refuses connections gives Unavailable after the retry budget."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+asyncpg://fleet:s3cret@127.0.0.1:{port}/fleet"
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Unavailable) as err:
        await Database.open(url, retry_timeout_s=0.5)
    assert loop.time() - started < 5  # bounded by the retry budget, not a hang
    assert f"127.0.0.1:{port}" in str(err.value)
    assert "s3cret" not in str(err.value)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_postgres_recovers_after_its_connections_are_killed(database_url: str) -> None:
    """After the server drops every connection, the next call reconnects by itself."""
    db = await Database.open(database_url)
    try:
        await db.migrate()
        nodes = NodeRepository(db)
        await nodes.upsert(
            NodeRecord("n1", "h", "10.0.0.1", "linux", "x86_64", {}, "1", "1", "h:1"), now_ms=5
        )
        await _terminate_backends(database_url)
        assert await nodes.count() == 1
        assert (
            await AuditRepository(db).record(
                actor="operator/a", action="x", target="y", detail={}, outcome="ok", now_ms=1
            )
            >= 1
        )
    finally:
        await db.close()


async def _admin(database_url: str) -> asyncpg.Connection:
    dsn = make_url(database_url).set(drivername="postgresql", database="postgres")
    return await asyncpg.connect(dsn.render_as_string(hide_password=False))


async def _terminate_backends(database_url: str, *, advisory_only: bool = False) -> int:
    name = make_url(database_url).database
    admin = await _admin(database_url)
    try:
        if advisory_only:
            query = (
                "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l "
                "JOIN pg_database d ON d.oid = l.database "
                "WHERE l.locktype = 'advisory' AND l.granted AND d.datname = $1"
            )
        else:
            query = (
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()"
            )
        return int(await admin.fetchval(query, name))
    finally:
        await admin.close()


async def test_advisory_lock_is_held_by_one_database_at_a_time(database_url: str) -> None:
    """Two Databases on one PostgreSQL: only one holds a lock until it lets go (SQLite: always)."""
    first, second = await Database.open(database_url), await Database.open(database_url)
    try:
        async with first.advisory_lock("fleet-sweeper") as held_first:
            assert held_first is True
            async with second.advisory_lock("fleet-sweeper") as held_second:
                assert held_second is (first.dialect == "sqlite")
                assert await second.advisory_lock_held("fleet-sweeper") is held_second
            assert await first.advisory_lock_held("fleet-sweeper") is True
            async with second.advisory_lock("another-lock") as held_other:
                assert held_other is True
        async with second.advisory_lock("fleet-sweeper") as held_after:
            assert held_after is True
    finally:
        await first.close()
        await second.close()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_advisory_lock_passes_on_when_the_holder_connection_dies(database_url: str) -> None:
    """If the holder's connection dies the other Database gets the lock; the holder exits fine."""
    first, second = await Database.open(database_url), await Database.open(database_url)
    try:
        async with first.advisory_lock("fleet-sweeper") as held_first:
            assert held_first is True
            assert await first.advisory_lock_held("fleet-sweeper") is True
            assert await _terminate_backends(database_url, advisory_only=True) == 1
            assert await first.advisory_lock_held("fleet-sweeper") is False
            for _ in range(50):  # the server releases it when the backend exits
                async with second.advisory_lock("fleet-sweeper") as held_second:
                    if held_second:
                        break
                await asyncio.sleep(0.05)
            assert held_second is True
        # The first one still works afterwards (its dead connection was discarded).
        async with first.advisory_lock("fleet-sweeper") as again:
            assert again is True
    finally:
        await first.close()
        await second.close()


async def test_audit_records_round_trip(database: Database) -> None:
    """Audit entries come back newest first with every field."""
    audit = AuditRepository(database)
    a = await audit.record(
        actor="operator/alice",
        action="agents.restart",
        target="zone=a",
        detail={"agents": "web"},
        outcome="ok",
        now_ms=10,
    )
    b = await audit.record(
        actor="operator/bob",
        action="nodes.label",
        target="n1",
        detail={},
        outcome="denied",
        now_ms=20,
    )
    got = await audit.list_recent(limit=10)
    assert [r.id for r in got] == [b, a]
    assert (got[1].actor, got[1].action, got[1].target, got[1].detail, got[1].outcome) == (
        "operator/alice",
        "agents.restart",
        "zone=a",
        {"agents": "web"},
        "ok",
    )
    assert got[0].timestamp_ms == 20


async def test_sqlite_file_in_an_uncreatable_directory_is_a_config_error(tmp_path: Any) -> None:
    """A SQLite path whose directory cannot be created is a ConfigError naming the path."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot create its directory"):
        await Database.open(f"sqlite:///{blocker}/sub/m.db")


async def test_sqlite_path_that_is_a_directory_is_a_config_error_at_once(tmp_path: Any) -> None:
    """A SQLite path that cannot be opened (here a directory) is a ConfigError naming the
    path, not retried: at run time "unable to open database file" is retried (a process
    out of file descriptors), at start it is a wrong path."""
    (tmp_path / "m.db").mkdir()
    with pytest.raises(ConfigError, match=r"m\.db: cannot open the file: unable to open"):
        await Database.open(f"sqlite:///{tmp_path}/m.db", retry_timeout_s=30)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_missing_postgres_database_is_a_config_error(database_url: str) -> None:
    """A PostgreSQL database that does not exist is a ConfigError, not a retry loop."""
    url = make_url(database_url).set(database="fleet_no_such_database")
    with pytest.raises(ConfigError, match="fleet_no_such_database"):
        await Database.open(url.render_as_string(hide_password=False), retry_timeout_s=30)


async def test_sqlite_statements_are_one_hop_each_and_keep_their_results(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through SQLAlchemy, a statement is one hop to aiosqlite's thread, and rows,
    rowcount, errors come back as before."""
    import aiosqlite

    db = await Database.open(f"sqlite:///{tmp_path}/m.db")
    await db.migrate()
    hops = 0
    real = aiosqlite.Connection._execute

    async def counted(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal hops
        hops += 1
        return await real(self, fn, *args, **kwargs)

    monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
    insert = text("INSERT INTO metric_batches (node_id, sequence, received_ms) VALUES (:n, :s, 1)")

    async def body(conn: Any) -> tuple[int, list[Any]]:
        await conn.execute(insert, [{"n": "a", "s": 1}, {"n": "b", "s": 1}, {"n": "c", "s": 2}])
        updated = await conn.execute(
            text("UPDATE metric_batches SET received_ms = 2 WHERE sequence = 1")
        )
        rows = await conn.execute(text("SELECT node_id FROM metric_batches ORDER BY node_id"))
        return updated.rowcount, [r.node_id for r in rows]

    try:
        assert await db.run(body) == (2, ["a", "b", "c"])
        assert hops == 5  # BEGIN, three statements, COMMIT
        with pytest.raises(InvalidArgument):  # a constraint violation, as before
            await db.run(lambda conn: conn.execute(insert, {"n": "a", "s": 1}))
    finally:
        await db.close()


async def test_sqlite_transactions_cancelled_at_any_point_leave_no_connection_in_a_transaction(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction cancelled anywhere, even while its BEGIN waits for aiosqlite's
    thread (which then runs it anyway), must not leave a pooled connection inside a
    transaction: the next transaction on it would fail "cannot start a transaction
    within a transaction" (seen under a reconnect storm)."""
    import time

    import aiosqlite

    db = await Database.open(f"sqlite:///{tmp_path}/m.db", pool_size=2)
    await db.migrate()
    real = aiosqlite.Connection._execute

    async def slow_thread(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        def late() -> Any:
            time.sleep(0.002)  # a busy machine: the thread gets to it late
            return fn(*args, **kwargs)

        return await real(self, late)

    monkeypatch.setattr(aiosqlite.Connection, "_execute", slow_thread)
    insert = text("INSERT INTO metric_batches (node_id, sequence, received_ms) VALUES ('n', :s, 1)")
    seq = 0

    async def write(conn: Any) -> None:
        nonlocal seq
        seq += 1
        await conn.execute(insert, {"s": seq})

    async def read(conn: Any) -> None:
        await conn.execute(text("SELECT COUNT(*) FROM metric_batches"))

    try:
        for i in range(150):
            task = asyncio.create_task(db.run(write if i % 2 else read, write=bool(i % 2)))
            for _ in range(i % 5):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for _ in range(6):  # every pooled connection, checked out again
            await db.run(write)
            await db.run(read, write=False)
    finally:
        await db.close()
