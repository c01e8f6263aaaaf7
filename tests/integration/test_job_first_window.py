"""Starting a job: the nodes read for the selector is one hop on SQLite (real
SQLite and PostgreSQL)."""

from __future__ import annotations

import time
from typing import Any

from manager_harness import node_record
from sqlalchemy import event

from manager.storage import Database, NodeRepository


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
