"""Manager replicas and the control-stream directory (which replica holds each node's stream).

Writes are per replica, never per command: a replica row refreshed every few
seconds, and one row per stream opened or closed, batched by the caller into
one transaction. Reads: one indexed lookup per command for a node with no
stream on this replica.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import and_, delete, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from fleet.errors import FailedPrecondition
from manager.storage.db import Database
from manager.storage.schema import control_streams, manager_replicas
from manager.storage.sqlhelp import chunks, dialect_insert

__all__ = ["ReplicaRecord", "ReplicaRepository", "StreamRecord"]

_ROWS = 500  # rows per multi-row INSERT (4 parameters each)


@dataclass(frozen=True)
class ReplicaRecord:
    """One manager replica as it registered itself."""

    replica_id: str
    """Its manager certificate's name."""
    address: str
    """host:port its peers reach it at (`[cluster] advertise_address`)."""
    started_ms: int
    """When it registered (epoch ms)."""
    last_seen_ms: int
    """When it last refreshed its row (epoch ms, its own clock)."""


@dataclass(frozen=True)
class StreamRecord:
    """Where one node's control stream is, as recorded, with its replica's row."""

    node_id: str
    """The node."""
    replica_id: str
    """The replica that recorded holding its stream."""
    epoch: int
    """Grows with every stream of the node recorded by any replica."""
    replica_address: str
    """Where that replica is reached ("" if it has no row: it left)."""
    replica_last_seen_ms: int
    """When that replica last refreshed its row (0 if it has none)."""


class ReplicaRepository:
    """The `manager_replicas` and `control_streams` tables."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # -- replicas -------------------------------------------------------------

    async def register(
        self, replica_id: str, address: str, *, now_ms: int, live_after_ms: int
    ) -> None:
        """Add or refresh this replica's row and drop stream records it left behind.

        FailedPrecondition if a replica with the same id but another address
        refreshed its row at or after `live_after_ms`: two replicas must not
        share a manager certificate name.
        """

        async def body(conn: AsyncConnection) -> None:
            row = (
                await conn.execute(
                    select(manager_replicas.c.address, manager_replicas.c.last_seen_ms)
                    .where(manager_replicas.c.replica_id == replica_id)
                    .with_for_update()
                )
            ).first()
            if row is not None and row.address != address and row.last_seen_ms >= live_after_ms:
                raise FailedPrecondition(
                    f"another manager replica named {replica_id!r} is running at {row.address} "
                    f"(seen {max(0, now_ms - row.last_seen_ms) / 1000:.1f} s ago); every replica "
                    "needs a manager certificate with its own name"
                )
            stmt = dialect_insert(self._db.dialect, manager_replicas).values(
                replica_id=replica_id, address=address, started_ms=now_ms, last_seen_ms=now_ms
            )
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[manager_replicas.c.replica_id],
                    set_={
                        "address": stmt.excluded.address,
                        "started_ms": stmt.excluded.started_ms,
                        "last_seen_ms": stmt.excluded.last_seen_ms,
                    },
                )
            )
            # A replica starting holds no stream: what it recorded before (a crash) is stale.
            await conn.execute(
                delete(control_streams).where(control_streams.c.replica_id == replica_id)
            )

        await self._db.run(body)

    async def touch(self, replica_id: str, *, now_ms: int) -> bool:
        """Refresh the replica's last-seen; False if its row is gone (register again)."""

        async def body(conn: AsyncConnection) -> bool:
            result = await conn.execute(
                update(manager_replicas)
                .where(manager_replicas.c.replica_id == replica_id)
                .values(last_seen_ms=now_ms)
            )
            return bool(result.rowcount)

        return await self._db.run(body)

    async def leave(self, replica_id: str) -> None:
        """The replica stops: its row and every stream record it holds go."""

        async def body(conn: AsyncConnection) -> None:
            await conn.execute(
                delete(control_streams).where(control_streams.c.replica_id == replica_id)
            )
            await conn.execute(
                delete(manager_replicas).where(manager_replicas.c.replica_id == replica_id)
            )

        await self._db.run(body)

    async def replicas(self) -> builtins.list[ReplicaRecord]:
        """Every registered replica, by id."""

        async def body(conn: AsyncConnection) -> builtins.list[ReplicaRecord]:
            query = select(manager_replicas).order_by(manager_replicas.c.replica_id)
            rows = await conn.execute(query)
            return [ReplicaRecord(**r._mapping) for r in rows]

        return await self._db.run(body, write=False)

    # -- the stream directory -------------------------------------------------

    async def record_streams(
        self,
        replica_id: str,
        opened: Sequence[str],
        closed: Mapping[str, int],
        *,
        now_ms: int,
    ) -> dict[str, int]:
        """In one transaction: `opened` nodes' streams are on `replica_id` now (each
        record's epoch goes up by one, whoever held it), and `closed` ones (node ->
        the epoch this replica wrote) are gone unless someone recorded a newer one.

        Returns the new epoch of each opened node.
        """
        if not opened and not closed:
            return {}
        ins = dialect_insert(self._db.dialect, control_streams)
        upsert = ins.on_conflict_do_update(
            index_elements=[control_streams.c.node_id],
            set_={
                "replica_id": ins.excluded.replica_id,
                "epoch": control_streams.c.epoch + 1,
                "opened_ms": ins.excluded.opened_ms,
            },
        ).returning(control_streams.c.node_id, control_streams.c.epoch)

        async def body(conn: AsyncConnection) -> dict[str, int]:
            epochs: dict[str, int] = {}
            for part in chunks(sorted(opened), _ROWS):
                rows = [
                    {"node_id": n, "replica_id": replica_id, "epoch": 1, "opened_ms": now_ms}
                    for n in part
                ]
                result = await conn.execute(upsert.values(rows))
                epochs.update({r.node_id: r.epoch for r in result})
            gone = sorted(closed.items())
            for part2 in chunks(gone):
                await conn.execute(
                    delete(control_streams).where(
                        control_streams.c.replica_id == replica_id,
                        tuple_(control_streams.c.node_id, control_streams.c.epoch).in_(part2),
                    )
                )
            return epochs

        return await self._db.run(body)

    async def claim_missing(
        self, replica_id: str, node_ids: Sequence[str], *, now_ms: int
    ) -> dict[str, int]:
        """Record `node_ids` on `replica_id` where no replica has a record; their epochs.

        The repair of a lost record (a replica that lost the stream deleted it
        after a newer one was written); a record naming another replica is left
        alone: if that one does not hold the stream it deletes it, and the next
        repair here claims it.
        """
        if not node_ids:
            return {}
        ins = dialect_insert(self._db.dialect, control_streams)
        stmt = ins.on_conflict_do_nothing(index_elements=[control_streams.c.node_id]).returning(
            control_streams.c.node_id, control_streams.c.epoch
        )

        async def body(conn: AsyncConnection) -> dict[str, int]:
            epochs: dict[str, int] = {}
            for part in chunks(sorted(node_ids), _ROWS):
                rows = [
                    {"node_id": n, "replica_id": replica_id, "epoch": 1, "opened_ms": now_ms}
                    for n in part
                ]
                result = await conn.execute(stmt.values(rows))
                epochs.update({r.node_id: r.epoch for r in result})
            return epochs

        return await self._db.run(body)

    async def streams_of(self, replica_id: str) -> dict[str, int]:
        """Node -> epoch of every stream recorded on `replica_id`."""

        async def body(conn: AsyncConnection) -> dict[str, int]:
            rows = await conn.execute(
                select(control_streams.c.node_id, control_streams.c.epoch).where(
                    control_streams.c.replica_id == replica_id
                )
            )
            return {r.node_id: r.epoch for r in rows}

        return await self._db.run(body, write=False)

    async def stream_of(self, node_id: str) -> StreamRecord | None:
        """Where `node_id`'s stream is recorded, with that replica's row; None if nowhere."""
        r = manager_replicas
        s = control_streams
        query = (
            select(s.c.replica_id, s.c.epoch, r.c.address, r.c.last_seen_ms)
            .select_from(s.outerjoin(r, and_(r.c.replica_id == s.c.replica_id)))
            .where(s.c.node_id == node_id)
        )

        async def body(conn: AsyncConnection) -> StreamRecord | None:
            row = (await conn.execute(query)).first()
            if row is None:
                return None
            return StreamRecord(
                node_id=node_id,
                replica_id=row.replica_id,
                epoch=row.epoch,
                replica_address=row.address or "",
                replica_last_seen_ms=row.last_seen_ms or 0,
            )

        return await self._db.run(body, write=False)
