"""Storage under faults: a database locked by another process, and kill -9 after an ack."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from fleet.errors import Unavailable
from manager.storage import (
    Database,
    MetricBatch,
    MetricSample,
    MetricStore,
    MetricWriter,
    NodeRecord,
    NodeRepository,
)
from manager.storage.schema import metric_samples

REPO = Path(__file__).resolve().parents[2]

_SQLITE_LOCKER = textwrap.dedent(
    """
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    sys.stdin.readline()
    conn.execute("COMMIT")
    """
)


@asynccontextmanager
async def _locked(database_url: str) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Hold the database's write lock from outside this Database; yields `release()`."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        # Another OS process, as a second manager or a backup tool would be.
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _SQLITE_LOCKER,
            str(url.database),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert await proc.stdout.readline() == b"locked\n"
        stdin = proc.stdin

        async def release() -> None:
            if proc.returncode is None:
                stdin.write(b"go\n")
                await stdin.drain()
                await proc.wait()

        try:
            yield release
        finally:
            await release()
        return
    conn = await asyncpg.connect(url.set(drivername="postgresql").render_as_string(False))
    tx = conn.transaction()
    await tx.start()
    await conn.execute("LOCK TABLE nodes, metric_batches IN EXCLUSIVE MODE")
    released = False

    async def release_pg() -> None:
        nonlocal released
        if not released:
            released = True
            await tx.commit()
            await conn.close()

    try:
        yield release_pg
    finally:
        await release_pg()


def _node(node_id: str) -> NodeRecord:
    return NodeRecord(node_id, "h", "10.0.0.1", "linux", "x86_64", {}, "1", "1", "h:1")


async def _sample_count(db: Database) -> int:
    async with db.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(metric_samples)) or 0)


async def test_lock_outlasting_retries_is_unavailable_and_recovers(database_url: str) -> None:
    """A write blocked past the retry budget is Unavailable; after release the same handle works."""
    db = await Database.open(database_url, busy_timeout_ms=200, retry_timeout_s=0.6)
    try:
        await db.migrate()
        nodes = NodeRepository(db)
        await nodes.upsert(_node("before"), now_ms=1)
        async with _locked(database_url) as release:
            with pytest.raises(Unavailable, match="unavailable") as err:
                await nodes.upsert(_node("blocked"), now_ms=2)
            assert "lock" in str(err.value).lower()
            assert await nodes.count() == 1  # readers are not blocked meanwhile
            await release()
            assert await nodes.upsert(_node("after"), now_ms=3) is True
        assert await nodes.known_ids() == {"before", "after"}
    finally:
        await db.close()


async def test_a_short_lock_is_ridden_out_by_retries(database_url: str) -> None:
    """A lock released within the retry budget only delays the write."""
    db = await Database.open(database_url, busy_timeout_ms=100, retry_timeout_s=10)
    try:
        await db.migrate()
        nodes = NodeRepository(db)
        async with _locked(database_url) as release:
            write = asyncio.create_task(nodes.upsert(_node("n1"), now_ms=1))
            await asyncio.sleep(0.5)
            assert not write.done()
            await release()
            assert await write is True
        assert await nodes.known_ids() == {"n1"}
    finally:
        await db.close()


async def test_metric_ack_comes_only_after_commit(database_url: str) -> None:
    """While the database cannot commit, submit() does not return and nothing is visible."""
    db = await Database.open(database_url, busy_timeout_ms=100, retry_timeout_s=10)
    writer = MetricWriter(MetricStore(db))
    try:
        await db.migrate()
        writer.start()
        batch = MetricBatch("n1", 1, (MetricSample("", "cpu", "u", 1_000, 1.0),) * 3)
        async with _locked(database_url) as release:
            ack = asyncio.create_task(writer.submit(batch))
            await asyncio.sleep(0.5)
            assert not ack.done()
            assert writer.depth == 1
            assert await _sample_count(db) == 0
            await release()
            assert await ack is True
        assert await _sample_count(db) == 3
    finally:
        await writer.stop()
        await db.close()


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from manager.storage import Database, MetricBatch, MetricSample, MetricStore, MetricWriter

    async def main() -> None:
        db = await Database.open(sys.argv[1])
        writer = MetricWriter(MetricStore(db))
        writer.start()
        samples = tuple(MetricSample("", "cpu", "u", 1_000 + i, float(i)) for i in range(100))
        results = await asyncio.gather(
            *(writer.submit(MetricBatch("n1", seq, samples)) for seq in range(20))
        )
        print("acked", sum(results), flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_acknowledged_batches_survive_kill_9(database: Database, database_url: str) -> None:
    """Batches acknowledged by a process killed with SIGKILL right after are all stored."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        database_url,
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert line == b"acked 20\n"
    assert await _sample_count(database) == 2_000
    assert await MetricStore(database).write_batches([MetricBatch("n1", 7, ())]) == [False]
