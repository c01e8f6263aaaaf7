"""Jobs.watch on SQLite fed by WatchHub (a real SQLite file): a row older than one
already shown is not news (a cancel hands its rows over after its commit, and a report
committed in between may have been shown already)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from manager.service.job_control import Jobs
from manager.service.job_updates import JobUpdates
from manager.storage.db import Database
from manager.storage.jobs import JobRecord, JobRepository, JobTargetRecord

_SPEC = '{"steps": [{"name": "s", "command": {"argv": ["true"]}}]}'


async def test_a_row_older_than_the_one_shown_is_not_news(tmp_path: Path) -> None:
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'manager.db'}")
    try:
        await db.migrate()
        repo = JobRepository(db)
        updates = JobUpdates(repo, clock=time.time)  # not started: its row listeners only
        none: Any = None
        jobs = Jobs(repo, none, none, clock=time.time, poll_interval=0.02, updates=updates)
        job_id = "20261206-230000-000-abcdef"
        record = JobRecord(id=job_id, name="", spec=_SPEC, actor="operator/t", created_ms=1)
        a, b = (
            JobTargetRecord(job_id, n, idx=i, state="RUNNING", updated_ms=10)
            for i, n in enumerate(["a", "b"])
        )
        await repo.add_job(record, [a, b], audits=[], events=[])
        hub = jobs._hub
        assert hub is not None
        stream = jobs.watch(job_id)
        first, _ = await anext(stream)
        assert [t.state for t in first.targets] == ["RUNNING", "RUNNING"]
        done = dataclasses.replace(a, state="SUCCESS", updated_ms=30)
        hub.committed([done])
        view, changed = await anext(stream)
        assert changed == (done,)
        assert view.counts == {"SUCCESS": 1, "RUNNING": 1}
        hub.committed([dataclasses.replace(a, cancel_requested=True, updated_ms=20)])  # stale
        b_done = dataclasses.replace(b, state="FAILED", updated_ms=40)
        hub.committed([b_done])
        view, changed = await anext(stream)
        assert changed == (b_done,)
        assert view.counts == {"SUCCESS": 1, "FAILED": 1}
        await stream.aclose()
        assert hub._watchers == {}
    finally:
        await db.close()
