"""Nodes: registration, batched last-seen updates, the offline sweep, labels."""

from __future__ import annotations

import builtins
import dataclasses
import sqlite3
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import BigInteger, bindparam, case, exists, func, select, update
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from fleet.clockskew import clock_words, offset_words
from fleet.errors import FailedPrecondition, NotFound, Resource
from manager.storage.db import Database
from manager.storage.events import dump_map, event_row, insert_events, load_map
from manager.storage.records import NodeLabels, NodeReach, NodeRecord
from manager.storage.schema import node_certificates, node_revocations, nodes
from manager.storage.sqlhelp import chunks, dialect_insert

__all__ = [
    "NodeRepository",
    "Upserted",
    "clock_news",
    "effective_labels",
    "labels_event",
    "node_from_row",
    "sqlite_labelled_reach",
]


_LABELLED_REACH = select(
    nodes.c.node_id,
    nodes.c.labels,
    nodes.c.daemon_address,
    nodes.c.status,
    nodes.c.last_seen_ms,
    nodes.c.jobs_disabled,
).order_by(nodes.c.node_id)
_LABELLED_REACH_SQLITE = str(_LABELLED_REACH.compile(dialect=sqlite_dialect()))


def _labelled_reach(
    rows: Iterable[Sequence[Any]],
) -> tuple[builtins.list[NodeLabels], builtins.list[NodeReach]]:
    labelled: builtins.list[NodeLabels] = []
    reach: builtins.list[NodeReach] = []
    for node_id, labels, address, status, last_seen_ms, jobs_disabled in rows:
        labelled.append(NodeLabels(node_id, load_map(labels)))
        reach.append(NodeReach(node_id, address, status, last_seen_ms, bool(jobs_disabled)))
    return labelled, reach


def sqlite_labelled_reach(
    db: sqlite3.Connection,
) -> tuple[builtins.list[NodeLabels], builtins.list[NodeReach]]:
    """`NodeRepository.labelled_reach` on aiosqlite's thread (`Database.run_sqlite_read`)."""
    cur = db.execute(_LABELLED_REACH_SQLITE)
    try:
        return _labelled_reach(cur)
    finally:
        cur.close()


@dataclasses.dataclass(frozen=True)
class Upserted:
    """One registration's outcome (`NodeRepository.upsert_many`)."""

    created: bool
    """The node was new (or enrolled but never registered)."""
    changed: bool
    """It changed what convergence and the job driver read of the node: new, back from
    offline, effective labels, daemon address or jobs_disabled. False for a node
    re-registering as it was (a reconnect), which needs no pass of theirs."""
    clock_news: str = ""
    """The NODE_CLOCK_SKEW event's message when its clock went beyond the skew limit or
    came back within it; "" otherwise."""


# The node is on the deny list and was issued no certificate since (RemovalRepository's
# still_revoked, for one node row).
_REVOKED = exists().where(
    node_revocations.c.node_id == nodes.c.node_id,
    ~exists().where(
        # node_revocations, not nodes: the inner query correlates only to the enclosing one.
        node_certificates.c.node_id == node_revocations.c.node_id,
        node_certificates.c.not_before_ms >= node_revocations.c.not_before_ms,
    ),
)

_FIELDS = (
    "hostname",
    "ip",
    "os",
    "arch",
    "daemon_version",
    "agent_version",
    "daemon_address",
    "jobs_disabled",
    "clock_offset_ms",
)


def _fields(node: NodeRecord) -> dict[str, Any]:
    return {name: getattr(node, name) for name in _FIELDS}


def _insert_row(node: NodeRecord, now_ms: int) -> dict[str, Any]:
    return {
        "node_id": node.node_id,
        "status": "online",
        "last_seen_ms": now_ms,
        "registered_at_ms": now_ms,
        "labels": dump_map(node.labels),
        "daemon_labels": dump_map(node.labels),
        "operator_labels": "{}",
        "cert_not_after_ms": node.cert_not_after_ms,
        **_fields(node),
    }


def clock_news(node_id: str, before: int | None, after: int | None, max_skew_ms: int) -> str:
    """The NODE_CLOCK_SKEW message when a node's clock offset crosses `max_skew_ms` (went
    beyond it, or came back within it); "" when it did not, or is unknown (pure)."""
    if max_skew_ms <= 0 or after is None:
        return ""
    was = before is not None and abs(before) > max_skew_ms
    if abs(after) > max_skew_ms and not was:
        return (
            f"clock of node {node_id} is beyond max_clock_skew_seconds"
            f" ({max_skew_ms // 1000} s): {clock_words(after)}"
        )
    if was and abs(after) <= max_skew_ms:
        return (
            f"clock of node {node_id} is back within max_clock_skew_seconds of the manager's"
            f" ({offset_words(after)})"
        )
    return ""


def effective_labels(daemon: Mapping[str, str], operator: Mapping[str, str]) -> dict[str, str]:
    """What selectors match: the daemon's labels overlaid with the operators'."""
    return {**daemon, **operator}


def _label_change_message(node_id: str, old: Mapping[str, str], new: Mapping[str, str]) -> str:
    parts = []
    for key in sorted(old.keys() | new.keys()):
        if key not in old:
            parts.append(f"+{key}={new[key]}")
        elif key not in new:
            parts.append(f"-{key}")
        elif old[key] != new[key]:
            parts.append(f"{key}={old[key]}->{new[key]}")
    return f"labels of {node_id} changed: {', '.join(parts)}"


def labels_event(
    node_id: str,
    old: Mapping[str, str],
    new: Mapping[str, str],
    *,
    actor: str,
    now_ms: int,
    why: str,
) -> dict[str, Any]:
    return event_row(
        "NODE_LABELS_UPDATED",
        now_ms=now_ms,
        node_id=node_id,
        actor=actor,
        message=f"{_label_change_message(node_id, old, new)} ({why})",
        attributes={"from": dump_map(old), "to": dump_map(new)},
    )


# Re-registration, executemany: bind names differ from the column names, which
# SQLAlchemy reserves for the SET clause.
_NOW = bindparam("b_now", type_=BigInteger)
_CERT = bindparam("b_cert_not_after_ms", type_=BigInteger)
_REREGISTER = (
    update(nodes)
    .where(nodes.c.node_id == bindparam("b_node_id"))
    .values(
        status="online",
        last_seen_ms=case((nodes.c.last_seen_ms < _NOW, _NOW), else_=nodes.c.last_seen_ms),
        # An enrolled node's row exists before its daemon first registers.
        registered_at_ms=case(
            (nodes.c.registered_at_ms == 0, _NOW), else_=nodes.c.registered_at_ms
        ),
        cert_not_after_ms=case((_CERT == 0, nodes.c.cert_not_after_ms), else_=_CERT),
        **{name: bindparam(f"b_{name}") for name in (*_FIELDS, "labels", "daemon_labels")},
    )
)


def _update_row(node: NodeRecord, now_ms: int, labels: Mapping[str, str]) -> dict[str, Any]:
    return {
        "b_node_id": node.node_id,
        "b_now": now_ms,
        "b_labels": dump_map(labels),
        "b_daemon_labels": dump_map(node.labels),
        "b_cert_not_after_ms": node.cert_not_after_ms,
        **{f"b_{name}": value for name, value in _fields(node).items()},
    }


def node_from_row(row: Any) -> NodeRecord:
    """A nodes-table row as its record."""
    return NodeRecord(
        node_id=row.node_id,
        hostname=row.hostname,
        ip=row.ip,
        os=row.os,
        arch=row.arch,
        labels=load_map(row.labels),
        daemon_version=row.daemon_version,
        agent_version=row.agent_version,
        daemon_address=row.daemon_address,
        status=row.status,
        last_seen_ms=row.last_seen_ms,
        registered_at_ms=row.registered_at_ms,
        daemon_labels=load_map(row.daemon_labels),
        operator_labels=load_map(row.operator_labels),
        jobs_disabled=bool(row.jobs_disabled),
        cert_not_after_ms=row.cert_not_after_ms,
        clock_offset_ms=row.clock_offset_ms,
    )


class NodeRepository:
    """Reads and writes the nodes table (and the events its changes cause)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def upsert(self, node: NodeRecord, *, now_ms: int) -> bool:
        """Register or re-register `node`; True if it was new.

        Updates hostname/ip/os/arch/versions/address, replaces the daemon's
        labels with `node.labels` (operator labels stay), sets it online with
        last_seen = now, and writes NODE_REGISTERED (plus NODE_ONLINE if it
        was offline, and NODE_LABELS_UPDATED if the effective labels changed)
        in the same transaction. Idempotent. A row made by enrollment (never
        registered) counts as new. `node.cert_not_after_ms` 0 keeps the stored one.
        """
        return (await self.upsert_many([(node, now_ms)]))[0].created

    async def upsert_many(
        self, batch: Sequence[tuple[NodeRecord, int]], *, max_skew_ms: int = 0
    ) -> builtins.list[Upserted]:
        """`upsert` of several (node, now_ms) pairs in one transaction.

        A node whose clock offset went beyond `max_skew_ms` (or came back within it)
        gets a NODE_CLOCK_SKEW event, once per crossing (0: none).

        A handful of statements whatever the batch size, so a registration
        storm (a new manager, a whole fleet restarting) costs one commit per
        batch rather than per node. Node ids must be unique in the batch.
        Returns, per pair, whether that node was new and whether it changed (`Upserted`).
        """
        ids = [node.node_id for node, _ in batch]
        if len(set(ids)) != len(ids):
            raise ValueError("upsert_many: a node id appears twice in one batch")

        known_columns = (
            nodes.c.node_id,
            nodes.c.status,
            nodes.c.labels,
            nodes.c.operator_labels,
            nodes.c.registered_at_ms,
            nodes.c.daemon_address,
            nodes.c.jobs_disabled,
            nodes.c.clock_offset_ms,
        )

        async def body(conn: AsyncConnection) -> builtins.list[Upserted]:
            # Locks the known rows (PostgreSQL), so a concurrent sweep cannot
            # flip one between this read and the update.
            status: dict[str, str] = {}
            labels: dict[str, tuple[str, str]] = {}  # effective, operator (JSON as stored)
            enrolled: set[str] = set()  # rows made by enrollment, never registered
            reach: dict[str, tuple[str, bool]] = {}  # daemon_address, jobs_disabled
            offsets: dict[str, int | None] = {}  # clock offsets as stored
            changed: set[str] = set()  # known nodes whose registration changed something
            # In node-id order, as the last-seen flush locks them (no deadlock between the two).
            for part in chunks(sorted(ids)):
                rows = await conn.execute(
                    select(*known_columns)
                    .where(nodes.c.node_id.in_(part))
                    .order_by(nodes.c.node_id)
                    .with_for_update()
                )
                for row in rows:
                    status[row.node_id] = row.status
                    labels[row.node_id] = (row.labels, row.operator_labels)
                    reach[row.node_id] = (row.daemon_address, bool(row.jobs_disabled))
                    offsets[row.node_id] = row.clock_offset_ms
                    if row.registered_at_ms == 0:
                        enrolled.add(row.node_id)
            new = [(node, ms) for node, ms in batch if node.node_id not in status]
            if new:
                inserted = set(
                    await conn.scalars(
                        dialect_insert(self._db.dialect, nodes)
                        .on_conflict_do_nothing(index_elements=[nodes.c.node_id])
                        .returning(nodes.c.node_id),
                        [_insert_row(node, ms) for node, ms in new],
                    )
                )
                # Registered by another replica since the read: update it instead (a
                # change for this replica, which had not seen it).
                raced = [node.node_id for node, _ in new if node.node_id not in inserted]
                changed.update(raced)
                if raced:
                    rows = await conn.execute(
                        select(*known_columns)
                        .where(nodes.c.node_id.in_(sorted(raced)))
                        .order_by(nodes.c.node_id)
                        .with_for_update()
                    )
                    for row in rows:
                        status[row.node_id] = row.status
                        labels[row.node_id] = (row.labels, row.operator_labels)
                        reach[row.node_id] = (row.daemon_address, bool(row.jobs_disabled))
                    offsets[row.node_id] = row.clock_offset_ms
            known = [(node, ms) for node, ms in batch if node.node_id in status]
            label_events = []
            updates = []
            for node, ms in known:
                stored, operator = labels[node.node_id]
                effective = effective_labels(node.labels, load_map(operator))
                updates.append(_update_row(node, ms, effective))
                if status[node.node_id] != "online" or reach[node.node_id] != (
                    node.daemon_address,
                    node.jobs_disabled,
                ):
                    changed.add(node.node_id)
                if dump_map(effective) != stored:
                    changed.add(node.node_id)
                    label_events.append(
                        labels_event(
                            node.node_id,
                            load_map(stored),
                            effective,
                            actor=f"node/{node.node_id}",
                            now_ms=ms,
                            why="the daemon's configured labels changed",
                        )
                    )
            if updates:
                await conn.execute(_REREGISTER, updates)
            new_events = []
            for node, ms in batch:
                actor = f"node/{node.node_id}"
                first = node.node_id not in status or node.node_id in enrolled
                new_events.append(
                    event_row(
                        "NODE_REGISTERED",
                        now_ms=ms,
                        node_id=node.node_id,
                        actor=actor,
                        message=f"node {node.node_id} registered{'' if first else ' again'}",
                        attributes={"first": "true" if first else "false"},
                    )
                )
                if status.get(node.node_id) == "offline" and node.node_id not in enrolled:
                    new_events.append(_online_event(node.node_id, ms, actor))
            news: dict[str, str] = {}
            for node, ms in batch:
                said = clock_news(
                    node.node_id, offsets.get(node.node_id), node.clock_offset_ms, max_skew_ms
                )
                if said:
                    news[node.node_id] = said
                    new_events.append(
                        event_row(
                            "NODE_CLOCK_SKEW",
                            now_ms=ms,
                            node_id=node.node_id,
                            actor=f"node/{node.node_id}",
                            message=said,
                            attributes={"offset_ms": str(node.clock_offset_ms)},
                        )
                    )
            await insert_events(conn, [*new_events, *label_events])
            out = []
            for node, _ in batch:
                created = node.node_id not in status or node.node_id in enrolled
                out.append(
                    Upserted(
                        created, created or node.node_id in changed, news.get(node.node_id, "")
                    )
                )
            return out

        return await self._db.run(body)

    async def get(self, node_id: str) -> NodeRecord | None:
        """The node, or None if it never registered."""

        async def body(conn: AsyncConnection) -> NodeRecord | None:
            row = (await conn.execute(select(nodes).where(nodes.c.node_id == node_id))).first()
            return node_from_row(row) if row is not None else None

        return await self._db.run(body, write=False)

    async def list(self) -> list[NodeRecord]:
        """Every node, ordered by id."""

        async def body(conn: AsyncConnection) -> list[NodeRecord]:
            return [
                node_from_row(r)
                for r in await conn.execute(select(nodes).order_by(nodes.c.node_id))
            ]

        return await self._db.run(body, write=False)

    async def labelled_reach(
        self,
    ) -> tuple[builtins.list[NodeLabels], builtins.list[NodeReach]]:
        """Every node's id and effective labels (what a job's selector matches) and
        `reach`, in one read ordered by id: starting a job reads the nodes for its
        selector, and hands the job driver its view of the same read."""
        if self._db.dialect == "sqlite":
            # One hop, the rows made records on aiosqlite's thread: this read is on the
            # way to a job's first StartJob (~3 ms for 500 nodes through SQLAlchemy).
            return await self._db.run_sqlite_read(sqlite_labelled_reach)

        async def body(
            conn: AsyncConnection,
        ) -> tuple[builtins.list[NodeLabels], builtins.list[NodeReach]]:
            return _labelled_reach(await conn.execute(_LABELLED_REACH))

        return await self._db.run(body, write=False)

    async def reach(self) -> builtins.list[NodeReach]:
        """Every node's liveness and address (the job driver's view, read every second
        while jobs run: five columns, no labels to decode)."""
        query = select(
            nodes.c.node_id,
            nodes.c.daemon_address,
            nodes.c.status,
            nodes.c.last_seen_ms,
            nodes.c.jobs_disabled,
        )

        async def body(conn: AsyncConnection) -> builtins.list[NodeReach]:
            return [
                NodeReach(node_id, address, status, last_seen_ms, bool(jobs_disabled))
                for node_id, address, status, last_seen_ms, jobs_disabled in await conn.execute(
                    query
                )
            ]

        return await self._db.run(body, write=False)

    async def known_ids(self) -> set[str]:
        """Ids of every registered node."""

        async def body(conn: AsyncConnection) -> set[str]:
            return set((await conn.scalars(select(nodes.c.node_id))).all())

        return await self._db.run(body, write=False)

    async def online_ids(self) -> set[str]:
        """Ids of the online nodes (two columns read, no row decoded)."""

        async def body(conn: AsyncConnection) -> set[str]:
            query = select(nodes.c.node_id).where(nodes.c.status == "online")
            return set((await conn.scalars(query)).all())

        return await self._db.run(body, write=False)

    async def count(self, *, status: str | None = None) -> int:
        """How many nodes (with that status, if given)."""
        query = select(func.count()).select_from(nodes)
        if status is not None:
            query = query.where(nodes.c.status == status)

        async def body(conn: AsyncConnection) -> int:
            return int(await conn.scalar(query) or 0)

        return await self._db.run(body, write=False)

    async def touch_many(
        self, last_seen: Mapping[str, int], *, now_ms: int | None = None
    ) -> builtins.list[str]:
        """Record heartbeats: last_seen_ms = max(old, new) in one executemany.

        Offline nodes among them become online with a NODE_ONLINE event
        (timestamped `now_ms`, default the newest heartbeat); returns their
        ids. Unknown ids are ignored. A revoked node issued no certificate
        since stays offline: a last-seen recorded before its stream was cut
        (or during the stream's grace) is no sign of it.
        """
        if not last_seen:
            return []
        # Rows locked in node-id order, as registration locks them: a re-registration
        # of a node in this flush waits for it rather than deadlocking with it.
        params = [{"nid": k, "ts": last_seen[k]} for k in sorted(last_seen)]
        event_ms = now_ms if now_ms is not None else max(last_seen.values())
        ts = bindparam("ts", type_=BigInteger)

        async def body(conn: AsyncConnection) -> builtins.list[str]:
            # This statement also row-locks the touched nodes (PostgreSQL), so a
            # concurrent sweeper cannot flip them between it and the next one.
            await conn.execute(
                update(nodes)
                .where(nodes.c.node_id == bindparam("nid"))
                .values(
                    last_seen_ms=case((nodes.c.last_seen_ms < ts, ts), else_=nodes.c.last_seen_ms)
                ),
                params,
            )
            # Offline nodes are few; find them with the status index, not an IN
            # list of every heartbeating node.
            offline = set(
                await conn.scalars(select(nodes.c.node_id).where(nodes.c.status == "offline"))
            )
            back = sorted(offline.intersection(last_seen))
            revived: builtins.list[str] = []
            for part in chunks(back):
                result = await conn.execute(
                    update(nodes)
                    .where(nodes.c.node_id.in_(part), nodes.c.status == "offline", ~_REVOKED)
                    .values(status="online")
                    .returning(nodes.c.node_id)
                )
                revived.extend(result.scalars())
            revived.sort()
            await insert_events(
                conn, [_online_event(nid, event_ms, f"node/{nid}") for nid in revived]
            )
            return revived

        return await self._db.run(body)

    async def clamp_last_seen(self, now_ms: int) -> int:
        """Last-seen times after `now_ms` become `now_ms`; returns how many.

        After the wall clock was stepped back they lie in the future and, as
        heartbeats keep the larger time, would keep dead nodes online until the
        clock caught up with them.
        """

        async def body(conn: AsyncConnection) -> int:
            result = await conn.execute(
                update(nodes).where(nodes.c.last_seen_ms > now_ms).values(last_seen_ms=now_ms)
            )
            return int(result.rowcount or 0)

        return await self._db.run(body)

    async def mark_offline(
        self,
        *,
        cutoff_ms: int,
        now_ms: int,
        exclude: Collection[str] = (),
        only: Collection[str] | None = None,
        reason: str = "missed its heartbeats",
        reasons: Mapping[str, str] | None = None,
        last_seen: Mapping[str, int] | None = None,
    ) -> builtins.list[str]:
        """Online nodes last seen before `cutoff_ms` (and not in `exclude`) go offline.

        With `only`, just those nodes are considered (a control stream that broke).
        One NODE_OFFLINE event each ("node <id> <reason>"; `reasons` per node, else
        `reason`), all in one transaction; returns their ids. `last_seen` (ms, per
        node) replaces the stored last-seen time of the nodes it names: a broken
        stream's node was kept fresh through its grace, but was last seen when the
        stream broke.
        """
        seen = (
            case(dict(last_seen), value=nodes.c.node_id, else_=nodes.c.last_seen_ms)
            if last_seen
            else nodes.c.last_seen_ms
        )
        excluded = set(exclude)

        async def body(conn: AsyncConnection) -> builtins.list[str]:
            if only is None:
                candidates = set(
                    await conn.scalars(
                        select(nodes.c.node_id).where(
                            nodes.c.status == "online", nodes.c.last_seen_ms < cutoff_ms
                        )
                    )
                )
            else:
                candidates = set(only)
            targets = sorted(candidates - excluded)
            gone: builtins.list[str] = []
            for part in chunks(targets):
                # Re-check the condition: a heartbeat may have landed meanwhile.
                result = await conn.execute(
                    update(nodes)
                    .where(
                        nodes.c.node_id.in_(part),
                        nodes.c.status == "online",
                        nodes.c.last_seen_ms < cutoff_ms,
                    )
                    .values(status="offline", last_seen_ms=seen)
                    .returning(nodes.c.node_id, nodes.c.last_seen_ms)
                )
                gone.extend(row.node_id for row in result)
            gone.sort()
            await insert_events(
                conn,
                [
                    event_row(
                        "NODE_OFFLINE",
                        now_ms=now_ms,
                        node_id=nid,
                        actor="manager/sweeper",
                        message=f"node {nid} {(reasons or {}).get(nid, reason)}",
                        attributes={"cutoff_ms": str(cutoff_ms)},
                    )
                    for nid in gone
                ],
            )
            return gone

        return await self._db.run(body)

    async def update_labels(
        self,
        node_id: str,
        set_: Mapping[str, str],
        remove: Collection[str],
        *,
        actor: str,
        now_ms: int,
    ) -> tuple[NodeRecord, NodeRecord]:
        """Set and remove operator labels; the node before and after the change.

        Operator labels overlay the daemon's and survive re-registration.
        Removing a key only the daemon's config sets is FailedPrecondition (only
        the host can change it) and changes nothing; removing a key nobody set
        is a no-op. `remove` is applied after `set_`. NotFound for an unknown
        node; NODE_LABELS_UPDATED when the effective labels changed.
        """

        async def body(conn: AsyncConnection) -> tuple[NodeRecord, NodeRecord]:
            row = (
                await conn.execute(
                    select(nodes).where(nodes.c.node_id == node_id).with_for_update()
                )
            ).first()
            if row is None:
                raise NotFound(
                    f"node {node_id!r} is not registered", resource=Resource("node", node_id)
                )
            old = node_from_row(row)
            operator = {**old.operator_labels, **set_}
            for key in remove:
                if key in operator:
                    del operator[key]
                elif key in old.daemon_labels:
                    raise FailedPrecondition(
                        f"label {key!r} of {node_id} comes from its daemon's config (the"
                        " [labels] of its daemon.toml), which only the host can change;"
                        " an operator label with the same key overrides it"
                    )
            effective = effective_labels(old.daemon_labels, operator)
            if operator != old.operator_labels:
                await conn.execute(
                    update(nodes)
                    .where(nodes.c.node_id == node_id)
                    .values(labels=dump_map(effective), operator_labels=dump_map(operator))
                )
            if effective != old.labels:
                await insert_events(
                    conn,
                    [
                        labels_event(
                            node_id, old.labels, effective, actor=actor, now_ms=now_ms,
                            why=f"set by {actor}",
                        )
                    ],
                )  # fmt: skip
            return old, dataclasses.replace(old, labels=effective, operator_labels=operator)

        return await self._db.run(body)


def _online_event(node_id: str, now_ms: int, actor: str) -> dict[str, Any]:
    return event_row(
        "NODE_ONLINE",
        now_ms=now_ms,
        node_id=node_id,
        actor=actor,
        message=f"node {node_id} is back online",
    )
