"""The jobs reads made for one hop on SQLite (storage.jobs.sqlite_job, through
Database.run_sqlite_read) read what JobTx reads."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from manager.storage.db import Database
from manager.storage.jobs import JobRecord, JobRepository, JobTargetRecord, JobTx, sqlite_job


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    await database.migrate()
    yield database
    await database.close()


async def test_sqlite_job_reads_what_the_transaction_reads(db: Database) -> None:
    """sqlite_job gives the same job and targets, in the job's order, as JobTx.job and
    JobTx.targets; an unknown job is (None, {})."""
    repo = JobRepository(db)
    record = JobRecord(id="j", name="n", spec="{}", actor="operator/t", created_ms=1)
    targets = [
        JobTargetRecord("j", "n2", idx=0, stage=0, state="SUCCESS", truncated=True, steps="[1]"),
        JobTargetRecord("j", "n1", idx=1, cancel_requested=True, reason="why", exit_code=-9),
    ]
    await repo.run(lambda tx: tx.add_job(record, targets))

    async def body(tx: JobTx) -> tuple[JobRecord | None, dict[str, JobTargetRecord]]:
        return await tx.job("j"), await tx.targets("j")

    stored, read = await db.run_sqlite_read(sqlite_job, "j")
    assert (stored, read) == await repo.run(body, write=False)
    assert stored == record
    assert list(read.values()) == targets
    assert await db.run_sqlite_read(sqlite_job, "none") == (None, {})
