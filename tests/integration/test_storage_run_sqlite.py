"""Database.run_sqlite: a whole SQLite write transaction in one hop to aiosqlite's thread."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection

from fleet.errors import InvalidArgument, Unavailable
from manager.storage.db import Database


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    await database.run(_create)
    yield database
    await database.close()


async def _create(conn: AsyncConnection) -> None:
    await conn.exec_driver_sql("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER)")


def _insert(db: sqlite3.Connection, rows: list[tuple[str, int]], fail: bool = False) -> int:
    db.executemany("INSERT INTO t VALUES (?, ?)", rows).close()
    if fail:
        raise RuntimeError("the body failed after its writes")
    return len(rows)


def _count(db: sqlite3.Connection) -> int:
    cur = db.execute("SELECT count(*) FROM t")
    try:
        return int(cur.fetchone()[0])
    finally:
        cur.close()


async def test_commits_what_fn_wrote_and_returns_its_result(db: Database) -> None:
    assert await db.run_sqlite(_insert, [("a", 1), ("b", 2)]) == 2
    assert await db.run_sqlite(_count) == 2


async def test_a_failing_fn_stores_nothing_and_leaves_no_transaction_open(
    db: Database,
) -> None:
    with pytest.raises(RuntimeError, match="failed after its writes"):
        await db.run_sqlite(_insert, [("a", 1)], True)
    assert await db.run_sqlite(_count) == 0
    # A duplicate key is the caller's bad input, as with `run`: nothing of it stored.
    await db.run_sqlite(_insert, [("a", 1)])
    with pytest.raises(InvalidArgument, match="rejected by the database"):
        await db.run_sqlite(_insert, [("b", 2), ("a", 3)])
    assert await db.run_sqlite(_count) == 1
    # Every pooled connection is usable by `run` afterwards (no transaction left open).
    results = await asyncio.gather(*(db.run_sqlite(_count) for _ in range(5)))
    assert results == [1] * 5


async def test_a_caller_cancelled_mid_transaction_leaves_it_whole(db: Database) -> None:
    """The transaction runs to its end on the driver's thread even if the caller gives
    up while it is queued there: committed in full, and the connection reusable."""

    def slow(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES ('slow', 1)").close()
        time.sleep(0.2)  # the caller is cancelled meanwhile

    task = asyncio.create_task(db.run_sqlite(slow))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await db.run_sqlite(_insert, [("after", 2)])
    assert await db.run_sqlite(_count) == 2


async def test_postgresql_is_refused(tmp_path: Path) -> None:
    del tmp_path
    database = Database.__new__(Database)
    database.dialect = "postgresql"
    with pytest.raises(ValueError, match="SQLite database only"):
        await database.run_sqlite(_count)


async def test_a_read_in_one_hop_does_not_wait_for_a_writer(db: Database) -> None:
    """run_sqlite_read sees what was committed and runs while a writer holds the write
    lock (it takes none), seeing the snapshot from before that writer's commit."""
    await db.run_sqlite(_insert, [("a", 1)])
    entered, release = asyncio.Event(), asyncio.Event()

    async def writer(conn: AsyncConnection) -> None:
        await conn.exec_driver_sql("INSERT INTO t VALUES ('w', 2)")
        entered.set()
        await release.wait()

    task = asyncio.create_task(db.run(writer))
    await entered.wait()
    assert await asyncio.wait_for(db.run_sqlite_read(_count), 5) == 1
    release.set()
    await task
    assert await db.run_sqlite_read(_count) == 2
    database = Database.__new__(Database)
    database.dialect = "postgresql"
    with pytest.raises(ValueError, match="SQLite database only"):
        await database.run_sqlite_read(_count)


async def test_a_lock_held_elsewhere_is_ridden_out_then_unavailable_past_the_budget(
    tmp_path: Path,
) -> None:
    """run_sqlite's first attempt runs outside the retry loop, and its kept connection
    outlives a failure: a lock held by another connection only delays a write released
    within the budget, one held past it is Unavailable, and the next write commits."""
    path = tmp_path / "m.db"
    db = await Database.open(f"sqlite+aiosqlite:///{path}", busy_timeout_ms=50, retry_timeout_s=0.5)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        await db.run(_create)
        other.execute("BEGIN EXCLUSIVE")
        write = asyncio.create_task(db.run_sqlite(_insert, [("a", 1)]))
        await asyncio.sleep(0.2)  # several busy timeouts: retried, not failed
        assert not write.done()
        other.execute("COMMIT")
        assert await write == 1

        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(Unavailable, match="locked"):
            await db.run_sqlite(_insert, [("b", 2)])
        other.execute("COMMIT")
        await db.run_sqlite(_insert, [("c", 3)])
        assert await db.run_sqlite(_count) == 2
    finally:
        other.close()
        await db.close()


async def test_writes_keep_one_connection_instead_of_a_pool_checkout_each(db: Database) -> None:
    """run_sqlite's transactions share one connection taken from the pool once (a checkout
    and return through SQLAlchemy cost the event loop more than a small transaction)."""
    checkouts = 0

    def counted(*_: object) -> None:
        nonlocal checkouts
        checkouts += 1

    event.listen(db.engine.sync_engine.pool, "checkout", counted)
    for i in range(10):
        await db.run_sqlite(_insert, [(f"k{i}", i)])
    assert await db.run_sqlite(_count) == 10
    assert checkouts <= 1
