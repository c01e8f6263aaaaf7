"""Starting a job sends its first window with the commit: when `Jobs.run` has stored
the job, its first targets' StartJob calls are already started, not left to a driver
pass scheduled behind RunJob's answer; decisions to store come first. The nodes read
for the selector is one hop on SQLite. Real manager, real test daemons over mTLS, on
SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from job_helpers import command, job_env
from manager_harness import node_record
from sqlalchemy import event

from manager.server import ManagerServer
from manager.storage import Database, NodeRepository


@pytest.fixture
async def env(pki: Any, tmp_path: Path, database_url: str) -> AsyncIterator[Any]:
    async with job_env(pki, tmp_path, database_url) as running:
        yield running


async def until(probe: Callable[[], Any], within: float = 20.0) -> Any:
    """Poll another component's state until `probe()` is true."""
    async with asyncio.timeout(within):
        while not (got := probe()):  # noqa: ASYNC110  # no event to wait on
            await asyncio.sleep(0.02)
    return got


async def _ended(manager: ManagerServer, job_id: str) -> dict[str, str]:
    """The job's target states once it ended."""
    async with asyncio.timeout(30):
        while True:
            view = await manager.jobs.get(job_id)
            if view.record.ended_ms:
                return {t.node_id: t.state for t in view.targets}
            await asyncio.sleep(0.05)


async def test_the_first_window_is_on_its_way_when_the_job_is_stored(env: Any) -> None:
    """max_concurrency 2 of 3 nodes: the first two are in flight as `run` returns (main
    sent nothing before a pass, which runs after RunJob answers); each node gets the
    job once and the job ends SUCCESS."""
    manager, _, start = env
    nodes = [await start(f"w{i}") for i in range(3)]
    await until(lambda: manager.job_driver.leading)
    spec = command("true", node_ids=[n.node_id for n in nodes], max_concurrency="2")
    view = await manager.jobs.run(spec, actor="operator/test")
    assert manager.job_driver.sending(view.record.id) == {"w0", "w1"}
    assert await _ended(manager, view.record.id) == dict.fromkeys(["w0", "w1", "w2"], "SUCCESS")
    assert [n.daemon.starts for n in nodes] == [[view.record.id]] * 3


async def test_a_decision_to_store_comes_before_the_first_window(env: Any) -> None:
    """A jobs-disabled node's target is FAILED by the plan: that decision is stored by
    the driver's pass before anything is sent, so nothing leaves with the commit; the
    pass then sends the rest."""
    manager, _, start = env
    off = await start("off", jobs_disabled=True)
    on = await start("on")
    await until(lambda: manager.job_driver.leading)
    view = await manager.jobs.run(command("true", node_ids=["off", "on"]), actor="operator/test")
    assert manager.job_driver.sending(view.record.id) == frozenset()
    assert await _ended(manager, view.record.id) == {"off": "FAILED", "on": "SUCCESS"}
    assert (off.daemon.starts, on.daemon.starts) == ([], [view.record.id])


async def test_the_selector_read_is_one_hop_on_sqlite(database: Database) -> None:
    """Every node's labels and reach, as registered, by id; on SQLite with no statement
    through SQLAlchemy on the event loop (one `run_sqlite_read` hop)."""
    repo = NodeRepository(database)
    now_ms = int(time.time() * 1000)
    await repo.upsert(node_record("b", labels={"role": "web"}), now_ms=now_ms)
    await repo.upsert(
        node_record("a", labels={}, daemon_address="10.0.0.2:7443", jobs_disabled=True),
        now_ms=now_ms,
    )
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        statements.append(statement)

    event.listen(database.engine.sync_engine, "before_cursor_execute", seen)
    try:
        labelled, reach = await repo.labelled_reach()
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", seen)
    assert [(n.node_id, n.labels) for n in labelled] == [("a", {}), ("b", {"role": "web"})]
    assert [(r.node_id, r.daemon_address, r.status, r.jobs_disabled) for r in reach] == [
        ("a", "10.0.0.2:7443", "online", True),
        ("b", "10.0.0.1:7443", "online", False),
    ]
    assert all(r.last_seen_ms == now_ms for r in reach)
    if database.dialect == "sqlite":
        assert [s for s in statements if "labels" in s] == []
