"""Events and audit entries a repository transaction queues and writes last.

Desired-state and jobs transactions (`DesiredTx`, `JobTx`) both record what
happened as they go and write it at the end: on PostgreSQL `insert_events`
serializes event writers until commit, so it must come last.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from manager.storage.audit import insert_audit
from manager.storage.events import event_row, insert_events

__all__ = ["QueuedWrites"]


class QueuedWrites:
    """A transaction's queued events and audit entries; `_finish` writes them."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn
        self._events: list[dict[str, Any]] = []
        self._audits: list[dict[str, Any]] = []

    def event(
        self,
        kind: str,
        *,
        now_ms: int,
        message: str,
        actor: str,
        node_id: str = "",
        agent_id: str = "",
        attributes: Mapping[str, str] | None = None,
    ) -> None:
        """Queue an event, written at the end of the transaction."""
        self._events.append(
            event_row(
                kind,
                now_ms=now_ms,
                node_id=node_id,
                agent_id=agent_id,
                message=message,
                actor=actor,
                attributes=attributes,
            )
        )

    @property
    def queued_events(self) -> list[dict[str, Any]]:
        """The event rows queued so far (append rows from `event_row` to queue more)."""
        return self._events

    def audit(
        self,
        *,
        actor: str,
        action: str,
        target: str,
        detail: Mapping[str, str],
        outcome: str,
        now_ms: int,
    ) -> None:
        """Queue an audit entry, written at the end of the transaction."""
        self._audits.append(
            {
                "actor": actor,
                "action": action,
                "target": target,
                "detail": dict(detail),
                "outcome": outcome,
                "now_ms": now_ms,
            }
        )

    async def _finish(self) -> None:
        for entry in self._audits:
            await insert_audit(self._conn, **entry)
        await insert_events(self._conn, self._events)
