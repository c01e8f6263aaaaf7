"""OperationLog: an audit entry and its OPERATION event, together or not at all."""

from __future__ import annotations

from typing import Any

import pytest

from manager.storage import AuditRepository, EventRepository
from manager.storage.operation_log import OperationLog


async def test_audit_and_event_are_written_together(database: Any) -> None:
    """One call leaves one audit entry and one OPERATION event that names it."""
    audit_id = await OperationLog(database).record(
        actor="operator/alice",
        action="agents.restart",
        target="env=prod: agent web",
        detail={"targets": "3"},
        outcome="started",
        now_ms=1_000,
        message="alice started a restart",
        event_attributes=lambda i: {"audit_id": str(i)},
        node_id="n1",
    )
    (entry,) = await AuditRepository(database).list_recent()
    (event,) = await EventRepository(database).list_after(0)
    assert (entry.id, entry.actor, entry.detail) == (audit_id, "operator/alice", {"targets": "3"})
    assert (event.kind, event.actor, event.node_id) == ("OPERATION", "operator/alice", "n1")
    assert event.attributes == {"audit_id": str(audit_id)}


async def test_a_long_target_is_cut_to_the_column(database: Any) -> None:
    """A very long selector is stored cut with an ellipsis, not refused (PostgreSQL VARCHAR)."""
    await OperationLog(database).record(
        actor="operator/alice",
        action="agents.restart",
        target="x" * 1000,
        detail={},
        outcome="ok",
        now_ms=1,
        message="m",
        event_attributes=lambda i: {},
    )
    (entry,) = await AuditRepository(database).list_recent()
    assert len(entry.target) == 300
    assert entry.target.endswith("...")


async def test_a_failed_event_leaves_no_audit_entry(database: Any) -> None:
    """If the event cannot be written the audit entry is rolled back with it."""

    def boom(audit_id: int) -> dict[str, str]:
        raise RuntimeError("attribute computation failed")

    with pytest.raises(RuntimeError, match="attribute computation failed"):
        await OperationLog(database).record(
            actor="operator/alice",
            action="nodes.label",
            target="n1",
            detail={},
            outcome="ok",
            now_ms=1,
            message="m",
            event_attributes=boom,
        )
    assert await AuditRepository(database).list_recent() == []
