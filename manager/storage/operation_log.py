"""An operator action's audit entry and its OPERATION event, written in one transaction.

`AuditRepository.record` and `EventRepository.append` each take a
transaction of their own; an operator action needs both, atomically (an
audited action always has its event, and the reverse), and a fan-out
writes two such pairs, so one transaction each also halves its writes.
`insert_operation` writes such a pair inside a transaction that also makes
the change (enrollment's tokens and node removal).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from sqlalchemy.ext.asyncio import AsyncConnection

from manager.storage.audit import insert_audit
from manager.storage.db import Database
from manager.storage.events import event_row, insert_events

__all__ = ["OperationLog", "insert_operation"]


class OperationLog:
    """Writes audit + OPERATION event pairs."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def record(
        self,
        *,
        actor: str,
        action: str,
        target: str,
        detail: Mapping[str, str],
        outcome: str,
        now_ms: int,
        message: str,
        event_attributes: Callable[[int], Mapping[str, str]],
        node_id: str = "",
        agent_id: str = "",
    ) -> int:
        """Append the audit entry and its event; returns the audit id.

        `event_attributes(audit_id)` gives the event's attributes, so they
        can name the entry written in the same transaction.
        """

        async def body(conn: AsyncConnection) -> int:
            audit_id = await insert_audit(
                conn,
                actor=actor,
                action=action,
                target=target,
                detail=detail,
                outcome=outcome,
                now_ms=now_ms,
            )
            event = event_row(
                "OPERATION",
                now_ms=now_ms,
                node_id=node_id,
                agent_id=agent_id,
                message=message,
                actor=actor,
                attributes=event_attributes(audit_id),
            )
            await insert_events(conn, [event])
            return audit_id

        return await self._db.run(body)


async def insert_operation(
    conn: AsyncConnection,
    *,
    actor: str,
    action: str,
    target: str,
    detail: Mapping[str, str],
    message: str,
    now_ms: int,
    node_id: str = "",
) -> None:
    """An `ok` audit entry and its OPERATION event (attributes as `OperationRecorder`'s)
    inside the caller's transaction; call it last (it appends an event)."""
    audit_id = await insert_audit(
        conn, actor=actor, action=action, target=target, detail=detail, outcome="ok", now_ms=now_ms
    )
    attributes = {
        "operation_id": str(audit_id),
        **detail,
        "audit_id": str(audit_id),
        "action": action,
        "outcome": "ok",
    }
    event = event_row(
        "OPERATION", now_ms=now_ms, node_id=node_id, actor=actor, message=message,
        attributes=attributes,
    )  # fmt: skip
    await insert_events(conn, [event])
