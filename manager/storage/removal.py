"""Removing nodes: the deny list (revocations) and deleting a node's record.

A revocation is a cutoff per node name (`node_revocations`): certificates of
that node starting before it are refused (`manager.service.deny_list`). It
replaces an earlier one and is never removed (a re-enrolled node's new
certificate starts at or after it). Deleting a node removes its row; its
agent states, assignments and desired state go with it (ON DELETE CASCADE),
its events, audit entries, jobs, issued certificates and revocations stay.
Each change writes its audit entry and OPERATION event in its transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, exists, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from fleet.errors import FailedPrecondition, NotFound, Resource
from manager.storage.db import Database
from manager.storage.events import event_row, insert_events
from manager.storage.nodes import node_from_row
from manager.storage.operation_log import insert_operation
from manager.storage.records import NodeRecord
from manager.storage.schema import node_certificates, node_revocations, nodes
from manager.storage.sqlhelp import dialect_insert

__all__ = ["RemovalRepository", "RevocationRecord"]


@dataclass(frozen=True)
class RevocationRecord:
    """A node's entry on the deny list."""

    node_id: str
    """The node name."""
    not_before_ms: int
    """Its certificates starting before this are refused."""
    revoked_ms: int
    """When it was revoked."""
    revoked_by: str
    """Who revoked it."""
    reason: str
    """Why."""


class RemovalRepository:
    """Revocations (the deny list) and deleting nodes."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def _lock_node(self, conn: AsyncConnection, node_id: str) -> Any:
        return (
            await conn.execute(select(nodes).where(nodes.c.node_id == node_id).with_for_update())
        ).first()

    async def revoke_node(
        self, node_id: str, *, cutoff_ms: int, now_ms: int, actor: str, reason: str
    ) -> tuple[NodeRecord | None, bool]:
        """Put `node_id` on the deny list (replacing an earlier entry), audited (`node.revoked`).

        An online node is marked offline (NODE_OFFLINE). Returns the node as it
        was (None if it has no record) and whether it went offline here.
        """

        async def body(conn: AsyncConnection) -> tuple[NodeRecord | None, bool]:
            row = await self._lock_node(conn, node_id)
            stmt = dialect_insert(self._db.dialect, node_revocations)
            values = {
                "node_id": node_id,
                "not_before_ms": cutoff_ms,
                "revoked_ms": now_ms,
                "revoked_by": actor,
                "reason": reason,
            }
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[node_revocations.c.node_id],
                    set_={k: v for k, v in values.items() if k != "node_id"},
                ),
                [values],
            )
            went_offline = row is not None and row.status == "online"
            events = []
            if went_offline:
                await conn.execute(
                    update(nodes).where(nodes.c.node_id == node_id).values(status="offline")
                )
                events.append(
                    event_row(
                        "NODE_OFFLINE",
                        now_ms=now_ms,
                        node_id=node_id,
                        actor=actor,
                        message=f"node {node_id} was revoked",
                    )
                )
            if events:
                await insert_events(conn, events)
            await insert_operation(
                conn,
                actor=actor,
                action="node.revoked",
                target=f"node/{node_id}",
                detail={
                    "node_id": node_id,
                    "not_before_ms": str(cutoff_ms),
                    "reason": reason,
                    "known": "true" if row is not None else "false",
                },
                message=f"{actor} revoked node {node_id}"
                + (f": {reason}" if reason else "")
                + ("" if row is not None else " (it has no node record)"),
                now_ms=now_ms,
                node_id=node_id,
            )
            return (node_from_row(row) if row is not None else None), went_offline

        return await self._db.run(body)

    async def revocations(self) -> dict[str, int]:
        """The whole deny list: node -> cutoff (epoch ms)."""

        async def body(conn: AsyncConnection) -> dict[str, int]:
            rows = await conn.execute(
                select(node_revocations.c.node_id, node_revocations.c.not_before_ms)
            )
            return {r.node_id: r.not_before_ms for r in rows}

        return await self._db.run(body, write=False)

    async def revocation(self, node_id: str) -> RevocationRecord | None:
        """`node_id`'s deny-list entry, or None."""

        async def body(conn: AsyncConnection) -> RevocationRecord | None:
            row = (
                await conn.execute(
                    select(node_revocations).where(node_revocations.c.node_id == node_id)
                )
            ).first()
            return RevocationRecord(**row._mapping) if row is not None else None

        return await self._db.run(body, write=False)

    async def still_revoked(self) -> dict[str, int]:
        """node -> when it was revoked, for revoked nodes issued no certificate since."""
        newer = exists().where(
            node_certificates.c.node_id == node_revocations.c.node_id,
            node_certificates.c.not_before_ms >= node_revocations.c.not_before_ms,
        )

        async def body(conn: AsyncConnection) -> dict[str, int]:
            rows = await conn.execute(
                select(node_revocations.c.node_id, node_revocations.c.revoked_ms).where(~newer)
            )
            return {r.node_id: r.revoked_ms for r in rows}

        return await self._db.run(body, write=False)

    async def delete_node(
        self, node_id: str, *, force: bool, actor: str, now_ms: int
    ) -> NodeRecord:
        """Delete the node's row; its agent states, assignments and desired state go with it
        (ON DELETE CASCADE). Events, audit, jobs, certificates and revocations stay.

        NotFound for an unknown node; FailedPrecondition while it is online
        unless `force`. Audited (`node.deleted`). Returns the deleted record.
        """

        async def body(conn: AsyncConnection) -> NodeRecord:
            row = await self._lock_node(conn, node_id)
            if row is None:
                raise NotFound(
                    f"node {node_id!r} is not registered", resource=Resource("node", node_id)
                )
            if row.status == "online" and not force:
                raise FailedPrecondition(
                    f"node {node_id} is online; stop its daemon first, or force the deletion"
                    " (its daemon registers again on its next call unless the node is"
                    " revoked)"
                )
            await conn.execute(delete(nodes).where(nodes.c.node_id == node_id))
            await insert_operation(
                conn,
                actor=actor,
                action="node.deleted",
                target=f"node/{node_id}",
                detail={"node_id": node_id, "force": "true" if force else "false",
                        "status": row.status, "labels": row.labels},
                message=f"{actor} deleted node {node_id} (it was {row.status})",
                now_ms=now_ms,
                node_id=node_id,
            )  # fmt: skip
            return node_from_row(row)

        return await self._db.run(body)
