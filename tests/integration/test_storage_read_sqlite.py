"""Database.read_sqlite: a whole SQLite read in one hop to aiosqlite's thread, and the
jobs reads made for it (storage.jobs.sqlite_job)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from manager.storage.db import Database
from manager.storage.jobs import JobRecord, JobRepository, JobTargetRecord, JobTx, sqlite_job


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    await database.migrate()
    yield database
    await database.close()


def _job_ids(db: sqlite3.Connection) -> list[str]:
    cur = db.execute("SELECT id FROM jobs ORDER BY id")
    try:
        return [row[0] for row in cur]
    finally:
        cur.close()


def _fail(db: sqlite3.Connection) -> None:
    db.execute("SELECT 1").close()
    raise RuntimeError("the read failed")


def _record(job_id: str) -> JobRecord:
    return JobRecord(id=job_id, name="n", spec="{}", actor="operator/t", created_ms=1)


async def test_a_read_sees_what_is_committed_while_a_writer_holds_its_transaction(
    db: Database,
) -> None:
    """A read does not wait for the write lock: it runs while a write transaction is open
    and sees only what was committed before it."""
    repo = JobRepository(db)

    async def add(tx: JobTx, job_id: str) -> None:
        await tx.add_job(_record(job_id), [])

    await repo.run(lambda tx: add(tx, "a"))
    inside = asyncio.Event()
    release = asyncio.Event()

    async def slow(conn: AsyncConnection) -> None:
        await conn.exec_driver_sql(
            "INSERT INTO jobs (id, name, spec, actor, created_ms, ended_ms, state, reason,"
            " rerun_of, concurrency, cancelled_ms) VALUES ('b', '', '{}', 'x', 1, 0, 'PENDING',"
            " '', '', 1, 0)"
        )
        inside.set()
        await release.wait()

    writer = asyncio.ensure_future(db.run(slow))
    await inside.wait()
    try:
        assert await asyncio.wait_for(db.read_sqlite(_job_ids), 5) == ["a"]
    finally:
        release.set()
        await writer
    assert await db.read_sqlite(_job_ids) == ["a", "b"]


async def test_a_failing_read_leaves_no_transaction_open(db: Database) -> None:
    """An error in the read reaches the caller, and the connection is usable after it:
    reads and writes go on."""
    for _ in range(3):  # more than one pooled connection gets the failure
        with pytest.raises(RuntimeError, match="the read failed"):
            await db.read_sqlite(_fail)
    await JobRepository(db).run(lambda tx: tx.add_job(_record("c"), []))
    assert await db.read_sqlite(_job_ids) == ["c"]


async def test_sqlite_job_reads_what_the_transaction_reads(db: Database) -> None:
    """sqlite_job gives the same job and targets, in the job's order, as JobTx.job and
    JobTx.targets; an unknown job is (None, {})."""
    repo = JobRepository(db)
    targets = [
        JobTargetRecord("j", "n2", idx=0, stage=0, state="SUCCESS", truncated=True, steps="[1]"),
        JobTargetRecord("j", "n1", idx=1, cancel_requested=True, reason="why", exit_code=-9),
    ]
    await repo.run(lambda tx: tx.add_job(_record("j"), targets))

    async def body(tx: JobTx) -> tuple[JobRecord | None, dict[str, JobTargetRecord]]:
        return await tx.job("j"), await tx.targets("j")

    record, read = await db.read_sqlite(sqlite_job, "j")
    assert (record, read) == await repo.run(body, write=False)
    assert list(read.values()) == targets
    assert await db.read_sqlite(sqlite_job, "none") == (None, {})
