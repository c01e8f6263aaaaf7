"""An operator action's audit entry and its OPERATION event, written in one transaction.

`AuditRepository.record` and `EventRepository.append` each take a
transaction of their own; an operator action needs both, atomically (an
audited action always has its event, and the reverse), and a fan-out
writes two such pairs, so one transaction each also halves its writes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from manager.storage.db import Database
from manager.storage.events import dump_map, event_row, insert_events
from manager.storage.schema import operations_audit

__all__ = ["OperationLog"]

_TARGET_MAX = 300
"""Width of operations_audit.target (a long selector is cut, with an ellipsis)."""


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
        if len(target) > _TARGET_MAX:
            target = target[: _TARGET_MAX - 3] + "..."
        row = {
            "ts_ms": now_ms,
            "actor": actor,
            "action": action,
            "target": target,
            "detail": dump_map(detail),
            "outcome": outcome,
        }

        async def body(conn: AsyncConnection) -> int:
            result = await conn.execute(
                insert(operations_audit).values(row).returning(operations_audit.c.id)
            )
            audit_id = int(result.scalar_one())
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
