"""The operations audit trail: who did what to what, and how it ended."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, insert, select
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from manager.storage.db import Database
from manager.storage.events import dump_map, load_map
from manager.storage.schema import operations_audit

__all__ = ["AuditRecord", "AuditRepository", "audit_row", "sqlite_insert_audit"]


@dataclass(frozen=True)
class AuditRecord:
    """One audited operation."""

    id: int
    """Monotonic id."""
    timestamp_ms: int
    """When it was recorded."""
    actor: str
    """Who asked, e.g. "operator/alice"."""
    action: str
    """What, e.g. "agents.restart"."""
    target: str
    """On what, e.g. a selector or "node-1/web"."""
    detail: dict[str, str]
    """Parameters worth keeping."""
    outcome: str
    """How it ended, e.g. "ok", "partial", "denied"."""


_TARGET_MAX = 300
"""Width of operations_audit.target (a long selector is cut, with an ellipsis)."""


async def insert_audit(
    conn: AsyncConnection,
    *,
    actor: str,
    action: str,
    target: str,
    detail: Mapping[str, str],
    outcome: str,
    now_ms: int,
) -> int:
    """Insert one audit entry inside the caller's transaction; returns its id."""
    row = audit_row(
        actor=actor, action=action, target=target, detail=detail, outcome=outcome, now_ms=now_ms
    )
    result = await conn.execute(
        insert(operations_audit).values(row).returning(operations_audit.c.id)
    )
    return int(result.scalar_one())


def audit_row(
    *,
    actor: str,
    action: str,
    target: str,
    detail: Mapping[str, str],
    outcome: str,
    now_ms: int,
) -> dict[str, Any]:
    """One audit entry as its operations_audit row (without the id); a long target is cut.
    `insert_audit`'s, and a plain sqlite3 writer's (`SqliteDesiredTx`)."""
    if len(target) > _TARGET_MAX:
        target = target[: _TARGET_MAX - 3] + "..."
    return {
        "ts_ms": now_ms,
        "actor": actor,
        "action": action,
        "target": target,
        "detail": dump_map(detail),
        "outcome": outcome,
    }


_COLUMNS = ("ts_ms", "actor", "action", "target", "detail", "outcome")
"""An `audit_row`'s keys, in the order of `_INSERT_SQLITE`'s parameters."""
_compiled = (
    insert(operations_audit)
    .values({c: bindparam(f"b_{c}") for c in _COLUMNS})
    .compile(dialect=sqlite_dialect())
)
assert _compiled.positiontup == [f"b_{c}" for c in _COLUMNS]
_INSERT_SQLITE = _compiled.string


def sqlite_insert_audit(db: sqlite3.Connection, row: Mapping[str, Any]) -> None:
    """`insert_audit` of an `audit_row` on aiosqlite's thread, in the transaction `db`
    holds (`Database.run_sqlite`)."""
    db.execute(_INSERT_SQLITE, tuple(row[c] for c in _COLUMNS)).close()


class AuditRepository:
    """Appends to and reads the operations audit trail."""

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
    ) -> int:
        """Append one entry and return its id."""

        async def body(conn: AsyncConnection) -> int:
            return await insert_audit(
                conn,
                actor=actor,
                action=action,
                target=target,
                detail=detail,
                outcome=outcome,
                now_ms=now_ms,
            )

        return await self._db.run(body)

    async def list_recent(self, *, limit: int = 100) -> list[AuditRecord]:
        """The newest `limit` entries, newest first."""

        async def body(conn: AsyncConnection) -> list[AuditRecord]:
            result = await conn.execute(
                select(operations_audit).order_by(operations_audit.c.id.desc()).limit(limit)
            )
            return [
                AuditRecord(
                    id=r.id,
                    timestamp_ms=r.ts_ms,
                    actor=r.actor,
                    action=r.action,
                    target=r.target,
                    detail=load_map(r.detail),
                    outcome=r.outcome,
                )
                for r in result
            ]

        return await self._db.run(body, write=False)
