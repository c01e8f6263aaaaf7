"""Desired state: definitions, revisions, assignments, node versions and rollouts.

The service layer decides; this module reads and writes. Work that must be
atomic (applying definitions with their rollouts, a rollout step with its
assignments and events) runs as one `DesiredStateRepository.run(body)`: the
body gets a `DesiredTx` whose methods are the only SQL it uses, and whose
events and audit entries are written last, in the same transaction (events
must be the last statements of a transaction, see `events.py`). A body may
be run again on a transient error, so it must do nothing but call the tx.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
from collections import namedtuple
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from sqlalchemy import and_, bindparam, delete, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from manager.storage.agents import (
    replace_many,
    select_states,
    sqlite_put_node_desired,
    sqlite_replace_many,
    sqlite_select_states,
)
from manager.storage.audit import audit_row
from manager.storage.db import Database, Dialect
from manager.storage.events import sqlite_insert_events
from manager.storage.nodes import node_from_row
from manager.storage.queued import QueuedWrites
from manager.storage.records import (
    AgentStateRecord,
    AssignmentRecord,
    DefinitionRecord,
    NodeDesiredRecord,
    NodeRecord,
    RevisionRecord,
    RolloutNodeRecord,
    RolloutRecord,
    UpdateErrorRecord,
)
from manager.storage.schema import (
    agent_states,
    assignments,
    definition_revisions,
    definitions,
    node_desired,
    nodes,
    operations_audit,
    rollout_nodes,
    rollouts,
)
from manager.storage.sqlhelp import chunks, dialect_insert, grouped

__all__ = [
    "AgentBrief",
    "DesiredStateRepository",
    "DesiredTx",
    "SqliteDesiredTx",
    "dump_update_errors",
    "load_update_errors",
]

T = TypeVar("T")


def dump_update_errors(errors: Sequence[UpdateErrorRecord]) -> str:
    """Update errors as canonical JSON."""
    if not errors:  # nearly every row: no json.dumps per row written
        return "[]"
    return json.dumps(
        [{"agent_id": e.agent_id, "revision": e.revision, "reason": e.reason} for e in errors],
        sort_keys=True,
    )


def load_update_errors(text: str) -> tuple[UpdateErrorRecord, ...]:
    """The inverse of `dump_update_errors`."""
    if text in ("[]", ""):
        return ()
    return tuple(
        UpdateErrorRecord(str(e["agent_id"]), int(e["revision"]), str(e["reason"]))
        for e in json.loads(text or "[]")
    )


def _definition(row: Any) -> DefinitionRecord:
    return DefinitionRecord(
        name=row.name,
        revision=row.revision,
        stable_revision=row.stable_revision,
        deleted_ms=row.deleted_ms,
        created_ms=row.created_ms,
        updated_ms=row.updated_ms,
    )


def _revision(row: Any) -> RevisionRecord:
    return RevisionRecord(
        name=row.name,
        revision=row.revision,
        body=row.body,
        content_hash=row.content_hash,
        actor=row.actor,
        message=row.message,
        created_ms=row.created_ms,
        deleted=bool(row.deleted),
    )


def _assignment(row: Any) -> AssignmentRecord:
    return AssignmentRecord(row.node_id, row.name, row.revision, row.since_ms)


def _node_desired(row: Any) -> NodeDesiredRecord:
    return NodeDesiredRecord(
        node_id=row.node_id,
        version=row.version,
        content_hash=row.content_hash,
        delivered_version=row.delivered_version,
        reported_version=row.reported_version,
        push_error=row.push_error,
        push_attempts=row.push_attempts,
        next_push_ms=row.next_push_ms,
        update_errors=load_update_errors(row.update_errors),
        updated_ms=row.updated_ms,
    )


def _observed(row: Any) -> NodeDesiredRecord:
    """An `observed_rows` row (its `_OBSERVED_COLUMNS`) as a record."""
    return NodeDesiredRecord(
        node_id=row.node_id,
        version=row.version,
        delivered_version=row.delivered_version,
        reported_version=row.reported_version,
        push_error=row.push_error,
        update_errors=load_update_errors(row.update_errors),
    )


def _rollout(row: Any) -> RolloutRecord:
    return RolloutRecord(
        id=row.id,
        name=row.name,
        target=row.target,
        previous=row.previous,
        state=row.state,
        record=row.record,
        actor=row.actor,
        message=row.message,
        created_ms=row.created_ms,
        updated_ms=row.updated_ms,
        ended_ms=row.ended_ms,
    )


def _rollout_node(row: Any) -> RolloutNodeRecord:
    return RolloutNodeRecord(
        rollout_id=row.rollout_id,
        node_id=row.node_id,
        phase=row.phase,
        batch=row.batch,
        since_ms=row.since_ms,
        offline=bool(row.offline),
        reason=row.reason,
    )


_NODE_DESIRED_COLUMNS = (
    "version", "content_hash", "delivered_version", "reported_version", "push_error",
    "push_attempts", "next_push_ms", "update_errors", "updated_ms",
)  # fmt: skip
_ROLLOUT_NODE_COLUMNS = ("phase", "batch", "since_ms", "offline", "reason")
_OBSERVED_COLUMNS = (
    "node_id", "version", "delivered_version", "reported_version", "push_error", "update_errors",
)  # fmt: skip
_OBSERVED_WHERE = (
    "(update_errors NOT IN ('[]', '') OR (push_error != '' AND delivered_version < version"
    " AND reported_version < version)) AND "
)
"""`observed_rows`' rows: refusals, or a push error on a set neither delivered nor reported."""
_JUDGED_COLUMNS = (
    "node_id", "status", "start_time_ms", "message", "health", "last_exit_reason",
    "revision", "health_message", "health_since_ms",
)  # fmt: skip
_built: dict[tuple[str, str], Any] = {}


def _statement(dialect: Dialect, what: str) -> Any:
    """The statement `what` for `dialect`, built once: a rollout's batch runs the same
    few statements every time, and building one (and its cache key) costs more than
    SQLAlchemy's compiled cache saves."""
    key = (dialect, what)
    stmt = _built.get(key)
    if stmt is None:
        stmt = _built[key] = _build(dialect, what)
    return stmt


def _build(dialect: Dialect, what: str) -> Any:
    ids: Any = bindparam("ids", expanding=True)
    if what == "put_node_desired":
        ins = dialect_insert(dialect, node_desired)
        return ins.on_conflict_do_update(
            index_elements=[node_desired.c.node_id],
            set_={c: getattr(ins.excluded, c) for c in _NODE_DESIRED_COLUMNS},
        )
    if what == "put_rollout_nodes":
        ins = dialect_insert(dialect, rollout_nodes)
        return ins.on_conflict_do_update(
            index_elements=[rollout_nodes.c.rollout_id, rollout_nodes.c.node_id],
            set_={c: getattr(ins.excluded, c) for c in _ROLLOUT_NODE_COLUMNS},
        )
    if what == "set_assignments":
        ins = dialect_insert(dialect, assignments)
        return ins.on_conflict_do_update(
            index_elements=[assignments.c.node_id, assignments.c.name],
            set_={"revision": ins.excluded.revision, "since_ms": ins.excluded.since_ms},
        )
    if what == "revisions_of":
        return select(definition_revisions).where(
            definition_revisions.c.name == bindparam("name"),
            definition_revisions.c.revision.in_(bindparam("revs", expanding=True)),
        )
    if what == "node_desired":
        return select(node_desired).where(node_desired.c.node_id.in_(ids))
    if what == "assignments":
        return (
            select(assignments)
            .where(assignments.c.node_id.in_(ids))
            .order_by(assignments.c.node_id, assignments.c.name)
        )
    if what == "agent_briefs":
        c = agent_states.c
        return select(c.node_id, c.revision, c.status, c.health).where(
            c.node_id.in_(ids), c.agent_id == bindparam("agent_id")
        )
    if what == "judged_agents":
        c = agent_states.c
        columns = tuple(getattr(c, name) for name in _JUDGED_COLUMNS)
        return (
            select(*columns)
            .where(c.node_id.in_(ids), c.agent_id == bindparam("agent_id"))
            .order_by(c.node_id)
        )
    if what == "observed_rows":
        c = node_desired.c
        return select(*(getattr(c, name) for name in _OBSERVED_COLUMNS)).where(
            c.node_id.in_(ids),
            or_(
                c.update_errors.not_in(["[]", ""]),
                and_(
                    c.push_error != "",
                    c.delivered_version < c.version,
                    c.reported_version < c.version,
                ),
            ),
        )
    if what in ("rollout", "rollout_for_update"):
        q = select(rollouts).where(rollouts.c.id == bindparam("id"))
        return q.with_for_update() if what == "rollout_for_update" else q
    if what == "update_rollout":
        return (
            update(rollouts)
            .where(rollouts.c.id == bindparam("rid"))
            .values(
                target=bindparam("target"),
                previous=bindparam("previous"),
                state=bindparam("state"),
                record=bindparam("record"),
                updated_ms=bindparam("updated_ms"),
                ended_ms=bindparam("ended_ms"),
            )
        )
    raise ValueError(what)


def _judged(agent_id: str, r: Any) -> AgentStateRecord:
    """A `judged_agents` row (its `_JUDGED_COLUMNS`) as a record."""
    return AgentStateRecord(
        node_id=r.node_id,
        agent_id=agent_id,
        status=r.status,
        start_time_ms=r.start_time_ms,
        message=r.message,
        health=r.health,
        last_exit_reason=r.last_exit_reason,
        revision=r.revision,
        health_message=r.health_message,
        health_since_ms=r.health_since_ms,
    )


@dataclass(frozen=True)
class AgentBrief:
    """What a rollout's view shows of a node's agent: far fewer columns than
    `AgentStateRecord` (WatchRollout reads it for every node of a rollout, twice a
    second)."""

    node_id: str
    revision: int
    status: str
    health: str


class DesiredTx(QueuedWrites):
    """The reads and writes of one desired-state transaction (see the module docstring)."""

    def __init__(self, conn: AsyncConnection, db: Database) -> None:
        super().__init__(conn)
        self._db = db

    @property
    def conn(self) -> AsyncConnection:
        """The transaction's connection, for writes of other repositories in it."""
        return self._conn

    # --- definitions and revisions ----------------------------------------------------------

    async def definitions(
        self, names: Collection[str] | None = None, *, for_update: bool = False
    ) -> dict[str, DefinitionRecord]:
        """Definition heads by name (all, or those named; deleted ones included)."""
        query = select(definitions).order_by(definitions.c.name)
        if names is not None:
            out: dict[str, DefinitionRecord] = {}
            for part in chunks(sorted(set(names))):
                q = query.where(definitions.c.name.in_(part))
                rows = await self._conn.execute(q.with_for_update() if for_update else q)
                out.update((r.name, _definition(r)) for r in rows)
            return out
        rows = await self._conn.execute(query.with_for_update() if for_update else query)
        return {r.name: _definition(r) for r in rows}

    async def put_definition(self, record: DefinitionRecord) -> None:
        """Insert or replace a definition head."""
        values = {
            "revision": record.revision,
            "stable_revision": record.stable_revision,
            "deleted_ms": record.deleted_ms,
            "created_ms": record.created_ms,
            "updated_ms": record.updated_ms,
        }
        stmt = dialect_insert(self._db.dialect, definitions).values(name=record.name, **values)
        await self._conn.execute(
            stmt.on_conflict_do_update(index_elements=[definitions.c.name], set_=values)
        )

    async def revision(self, name: str, revision: int) -> RevisionRecord | None:
        """One revision, or None."""
        row = (
            await self._conn.execute(
                select(definition_revisions).where(
                    definition_revisions.c.name == name,
                    definition_revisions.c.revision == revision,
                )
            )
        ).first()
        return _revision(row) if row is not None else None

    async def revisions_of(
        self, pairs: Collection[tuple[str, int]]
    ) -> dict[tuple[str, int], RevisionRecord]:
        """The named (definition, revision) pairs that exist."""
        out: dict[tuple[str, int], RevisionRecord] = {}
        by_name = grouped(pairs)
        query = _statement(self._db.dialect, "revisions_of")
        for name, revs in sorted(by_name.items()):
            for part in chunks(sorted(revs)):
                rows = await self._conn.execute(query, {"name": name, "revs": list(part)})
                out.update(((r.name, r.revision), _revision(r)) for r in rows)
        return out

    async def history(self, name: str) -> builtins.list[RevisionRecord]:
        """Every revision of a definition, newest first."""
        rows = await self._conn.execute(
            select(definition_revisions)
            .where(definition_revisions.c.name == name)
            .order_by(definition_revisions.c.revision.desc())
        )
        return [_revision(r) for r in rows]

    async def add_revision(self, record: RevisionRecord) -> None:
        """Store a new revision (its (name, revision) must be new)."""
        await self._conn.execute(
            insert(definition_revisions).values(
                name=record.name,
                revision=record.revision,
                body=record.body,
                content_hash=record.content_hash,
                actor=record.actor,
                message=record.message,
                created_ms=record.created_ms,
                deleted=record.deleted,
            )
        )

    # --- assignments --------------------------------------------------------------------------

    async def assignments(
        self, *, names: Collection[str] | None = None, node_ids: Collection[str] | None = None
    ) -> builtins.list[AssignmentRecord]:
        """Assignments ordered by (node, name); only those of `names` / `node_ids` if given."""
        query = select(assignments).order_by(assignments.c.node_id, assignments.c.name)
        if names is not None:
            query = query.where(assignments.c.name.in_(sorted(set(names))))
        if node_ids is not None:
            out: builtins.list[AssignmentRecord] = []
            by_ids = (
                _statement(self._db.dialect, "assignments")
                if names is None
                else query.where(assignments.c.node_id.in_(bindparam("ids", expanding=True)))
            )
            for part in chunks(sorted(set(node_ids))):
                rows = await self._conn.execute(by_ids, {"ids": list(part)})
                out.extend(map(_assignment, rows))
            return out
        return [_assignment(r) for r in await self._conn.execute(query)]

    async def set_assignments(self, records: Sequence[AssignmentRecord]) -> None:
        """Create or move assignments (by (node, name))."""
        if not records:
            return
        await self._conn.execute(
            _statement(self._db.dialect, "set_assignments"),
            [
                {
                    "node_id": r.node_id,
                    "name": r.name,
                    "revision": r.revision,
                    "since_ms": r.since_ms,
                }
                for r in records
            ],
        )

    async def delete_assignments(self, keys: Collection[tuple[str, str]]) -> None:
        """Remove (node, name) assignments."""
        for node_id, name in sorted(keys):
            await self._conn.execute(
                delete(assignments).where(
                    assignments.c.node_id == node_id, assignments.c.name == name
                )
            )

    async def all_nodes(self) -> builtins.list[NodeRecord]:
        """Every node, ordered by id (as `NodeRepository.list`, in this transaction)."""
        rows = await self._conn.execute(select(nodes).order_by(nodes.c.node_id))
        return [node_from_row(r) for r in rows]

    async def online_ids(self) -> set[str]:
        """Ids of the online nodes (as `NodeRepository.online_ids`, in this transaction)."""
        query = select(nodes.c.node_id).where(nodes.c.status == "online")
        return set((await self._conn.scalars(query)).all())

    async def nodes(self, node_ids: Collection[str]) -> dict[str, NodeRecord]:
        """The named nodes that exist, by id (an incremental pass re-reads only these)."""
        out: dict[str, NodeRecord] = {}
        for part in chunks(sorted(set(node_ids))):
            rows = await self._conn.execute(select(nodes).where(nodes.c.node_id.in_(part)))
            out.update((r.node_id, node_from_row(r)) for r in rows)
        return out

    async def agent_states(
        self, *, node_ids: Collection[str] | None = None, agent_id: str = ""
    ) -> builtins.list[AgentStateRecord]:
        """The agent states daemons last synced (as `AgentStateRepository.list`)."""
        return await select_states(self._conn, node_ids=node_ids, agent_id=agent_id)

    async def replace_agents(
        self, snapshots: Sequence[tuple[str, Sequence[AgentStateRecord]]], *, now_ms: int
    ) -> builtins.list[int | None]:
        """`agents.replace_many` in this transaction, its events queued (written last)."""
        return await replace_many(
            self._conn, snapshots, now_ms=now_ms, events_out=self.queued_events
        )

    async def agent_briefs(self, node_ids: Collection[str], agent_id: str) -> dict[str, AgentBrief]:
        """The agent `agent_id` on each of those nodes that reported it, by node."""
        out: dict[str, AgentBrief] = {}
        query = _statement(self._db.dialect, "agent_briefs")
        for part in chunks(sorted(set(node_ids))):
            rows = await self._conn.execute(query, {"ids": list(part), "agent_id": agent_id})
            out.update(
                (r.node_id, AgentBrief(r.node_id, r.revision, r.status, r.health)) for r in rows
            )
        return out

    async def judged_agents(
        self, node_ids: Collection[str], agent_id: str
    ) -> builtins.list[AgentStateRecord]:
        """The agent `agent_id` on each of those nodes, with only the columns a rollout
        judges it by (`desired.observe`); the others are left at their defaults. A full
        pass reads this for every node of a rollout's scope."""
        out: builtins.list[AgentStateRecord] = []
        query = _statement(self._db.dialect, "judged_agents")
        for part in chunks(sorted(set(node_ids))):
            rows = await self._conn.execute(query, {"ids": list(part), "agent_id": agent_id})
            out.extend(_judged(agent_id, r) for r in rows)
        return out

    # --- node versions ------------------------------------------------------------------------

    async def node_desired(
        self, node_ids: Collection[str] | None = None
    ) -> dict[str, NodeDesiredRecord]:
        """Rows by node (all, or those named that exist)."""
        query = select(node_desired)
        if node_ids is None:
            return {r.node_id: _node_desired(r) for r in await self._conn.execute(query)}
        out: dict[str, NodeDesiredRecord] = {}
        by_ids = _statement(self._db.dialect, "node_desired")
        for part in chunks(sorted(set(node_ids))):
            rows = await self._conn.execute(by_ids, {"ids": list(part)})
            out.update((r.node_id, _node_desired(r)) for r in rows)
        return out

    async def observed_rows(self, node_ids: Collection[str]) -> dict[str, NodeDesiredRecord]:
        """The rows of those nodes with update errors or a push error on a set not
        delivered, with only the columns a rollout observes of a row (`desired.observe`
        and `desired.undelivered`; the others left at their defaults): without decoding
        the rows of the nodes that have neither (nearly all)."""
        out: dict[str, NodeDesiredRecord] = {}
        query = _statement(self._db.dialect, "observed_rows")
        for part in chunks(sorted(set(node_ids))):
            rows = await self._conn.execute(query, {"ids": list(part)})
            out.update((r.node_id, _observed(r)) for r in rows)
        return out

    async def put_node_desired(self, records: Sequence[NodeDesiredRecord]) -> None:
        """Insert or replace rows (the node must exist)."""
        if not records:
            return
        await self._conn.execute(
            _statement(self._db.dialect, "put_node_desired"),
            [
                {
                    "node_id": r.node_id,
                    "version": r.version,
                    "content_hash": r.content_hash,
                    "delivered_version": r.delivered_version,
                    "reported_version": r.reported_version,
                    "push_error": r.push_error,
                    "push_attempts": r.push_attempts,
                    "next_push_ms": r.next_push_ms,
                    "update_errors": dump_update_errors(r.update_errors),
                    "updated_ms": r.updated_ms,
                }
                for r in records
            ],
        )

    # --- rollouts -----------------------------------------------------------------------------

    async def rollouts(
        self,
        *,
        name: str = "",
        live: bool = False,
        limit: int = 100,
        for_update: bool = False,
    ) -> builtins.list[RolloutRecord]:
        """Rollouts newest first (of one definition; only live ones; at most `limit`)."""
        query = select(rollouts).order_by(rollouts.c.id.desc()).limit(limit)
        if name:
            query = query.where(rollouts.c.name == name)
        if live:
            query = query.where(rollouts.c.ended_ms == 0)
        if for_update:
            query = query.with_for_update()
        return [_rollout(r) for r in await self._conn.execute(query)]

    async def rollout(self, rollout_id: int, *, for_update: bool = False) -> RolloutRecord | None:
        """One rollout by id."""
        query = _statement(self._db.dialect, "rollout_for_update" if for_update else "rollout")
        row = (await self._conn.execute(query, {"id": rollout_id})).first()
        return _rollout(row) if row is not None else None

    async def add_rollout(self, record: RolloutRecord) -> int:
        """Store a new rollout; its id."""
        rollout_id = await self._conn.scalar(
            insert(rollouts)
            .values(
                name=record.name,
                target=record.target,
                previous=record.previous,
                state=record.state,
                record=record.record,
                actor=record.actor,
                message=record.message,
                created_ms=record.created_ms,
                updated_ms=record.updated_ms,
                ended_ms=record.ended_ms,
            )
            .returning(rollouts.c.id)
        )
        assert rollout_id is not None
        return int(rollout_id)

    async def update_rollout(self, record: RolloutRecord) -> None:
        """Replace a stored rollout's state and record."""
        await self._conn.execute(
            _statement(self._db.dialect, "update_rollout"),
            {
                "rid": record.id,
                "target": record.target,
                "previous": record.previous,
                "state": record.state,
                "record": record.record,
                "updated_ms": record.updated_ms,
                "ended_ms": record.ended_ms,
            },
        )

    async def rollout_nodes(self, rollout_id: int) -> dict[str, RolloutNodeRecord]:
        """A rollout's node records by node."""
        rows = await self._conn.execute(
            select(rollout_nodes).where(rollout_nodes.c.rollout_id == rollout_id)
        )
        return {r.node_id: _rollout_node(r) for r in rows}

    async def rollout_node_counts(
        self, rollout_ids: Collection[int], online: Collection[str]
    ) -> dict[int, dict[str, int]]:
        """Per rollout: its nodes per phase, and how many are not in `online`."""
        out: dict[int, dict[str, int]] = {}
        if not rollout_ids:
            return out
        rows = await self._conn.execute(
            select(
                rollout_nodes.c.rollout_id, rollout_nodes.c.phase, rollout_nodes.c.node_id
            ).where(rollout_nodes.c.rollout_id.in_(list(rollout_ids)))
        )
        for rollout_id, phase, node_id in rows:
            counts = out.setdefault(rollout_id, {"offline": 0})
            counts[phase] = counts.get(phase, 0) + 1
            counts["offline"] += node_id not in online
        return out

    async def put_rollout_nodes(self, records: Sequence[RolloutNodeRecord]) -> None:
        """Insert or replace node records (by (rollout, node))."""
        if not records:
            return
        await self._conn.execute(
            _statement(self._db.dialect, "put_rollout_nodes"),
            [
                {
                    "rollout_id": r.rollout_id,
                    "node_id": r.node_id,
                    "phase": r.phase,
                    "batch": r.batch,
                    "since_ms": r.since_ms,
                    "offline": r.offline,
                    "reason": r.reason,
                }
                for r in records
            ],
        )


class DesiredStateRepository:
    """Runs desired-state transactions (see the module docstring)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @property
    def db(self) -> Database:
        """The database the transactions run on."""
        return self._db

    async def run(self, body: Callable[[DesiredTx], Awaitable[T]], *, write: bool = True) -> T:
        """`body(tx)` in one transaction; its queued events and audit entries last."""

        async def wrapped(conn: AsyncConnection) -> T:
            tx = DesiredTx(conn, self._db)
            result = await body(tx)
            if write:
                await tx._finish()
            return result

        return await self._db.run(wrapped, write=write)

    async def run_in_one_hop(
        self, body: Callable[[DesiredTx], Awaitable[T]], *, write: bool = True
    ) -> T:
        """`run(body)` (a write), but on SQLite as ONE hop to aiosqlite's thread: the
        body runs there with a `SqliteDesiredTx` (plain sqlite3 statements, no
        SQLAlchemy) inside `Database.run_sqlite`'s transaction, then its queued events.

        For the convergence's transactions (a rollout's batch: the answers, the step, the
        node sets), whose dozen statements through SQLAlchemy cost the event loop more
        than SQLite's work. The body must await nothing but the tx's methods and
        coroutines that await only those (on SQLite they never suspend); it runs on
        another thread, so it must touch nothing the event loop changes meanwhile. A
        body that suspends is a bug: RuntimeError, nothing written. `write=False`: a body
        that only reads (`Database.run_sqlite_read`: no write lock). PostgreSQL: `run`."""
        if self._db.dialect != "sqlite":
            return await self.run(body, write=write)
        if not write:
            return await self._db.run_sqlite_read(_in_one_hop, self._db, body, False)
        return await self._db.run_sqlite(_in_one_hop, self._db, body, True)


def _in_one_hop(
    db: sqlite3.Connection,
    database: Database,
    body: Callable[[DesiredTx], Awaitable[T]],
    write: bool,
) -> T:
    # On aiosqlite's thread, inside Database.run_sqlite's (or run_sqlite_read's) transaction.
    tx = SqliteDesiredTx(db, database)
    result = _completed(body(tx))
    if write:
        _completed(tx._finish())
    return result


def _completed(awaitable: Awaitable[T]) -> T:
    """Run a coroutine that never suspends to its end (a `SqliteDesiredTx` body)."""
    coro = cast(Coroutine[Any, Any, T], awaitable)
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coro.close()
    raise RuntimeError(
        "a one-hop desired-state transaction waited for something other than its tx "
        "(DesiredStateRepository.run_in_one_hop)"
    )


def _row_type(table: Any, columns: Sequence[str] | None = None) -> Any:
    names = tuple(columns or (c.name for c in table.columns))
    return namedtuple(f"_{table.name}_row", names)


def _select(row_type: Any, table: Any, where: str = "") -> str:
    sql = f"SELECT {', '.join(row_type._fields)} FROM {table.name}"  # noqa: S608 (constants)
    return f"{sql} WHERE {where}" if where else sql


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _upsert(table: Any, keys: Sequence[str], updated: Sequence[str]) -> str:
    columns = [c.name for c in table.columns]
    return (
        f"INSERT INTO {table.name} ({', '.join(columns)}) "  # noqa: S608 (constants)
        f"VALUES ({_marks(len(columns))}) ON CONFLICT ({', '.join(keys)}) DO UPDATE SET "
        + ", ".join(f"{c} = excluded.{c}" for c in updated)
    )


_DefinitionRow = _row_type(definitions)
_RevisionRow = _row_type(definition_revisions)
_AssignmentRow = _row_type(assignments)
_NodeDesiredRow = _row_type(node_desired)
_RolloutRow = _row_type(rollouts)
_RolloutNodeRow = _row_type(rollout_nodes)
_JudgedRow = _row_type(agent_states, _JUDGED_COLUMNS)
_BriefRow = _row_type(agent_states, ("node_id", "revision", "status", "health"))
_ObservedRow = _row_type(node_desired, _OBSERVED_COLUMNS)
_NodeRow = _row_type(nodes)
_ADD_REVISION = (
    f"INSERT INTO {definition_revisions.name} ({', '.join(_RevisionRow._fields)}) "  # noqa: S608
    f"VALUES ({_marks(len(_RevisionRow._fields))})"
)
_ROLLOUT_INSERTED = [c for c in _RolloutRow._fields if c != "id"]
_ADD_ROLLOUT = (
    f"INSERT INTO {rollouts.name} ({', '.join(_ROLLOUT_INSERTED)}) "  # noqa: S608
    f"VALUES ({_marks(len(_ROLLOUT_INSERTED))})"
)
_AUDITED = ("ts_ms", "actor", "action", "target", "detail", "outcome")
_ADD_AUDIT = (
    f"INSERT INTO {operations_audit.name} ({', '.join(_AUDITED)}) "  # noqa: S608
    f"VALUES ({_marks(len(_AUDITED))})"
)
_PUT_DEFINITION = _upsert(
    definitions, ["name"], [c.name for c in definitions.columns if c.name != "name"]
)
_SET_ASSIGNMENTS = _upsert(assignments, ["node_id", "name"], ["revision", "since_ms"])
_PUT_ROLLOUT_NODES = _upsert(rollout_nodes, ["rollout_id", "node_id"], _ROLLOUT_NODE_COLUMNS)
_UPDATE_ROLLOUT = (
    f"UPDATE {rollouts.name} SET target = ?, previous = ?, state = ?, record = ?, "  # noqa: S608
    "updated_ms = ?, ended_ms = ? WHERE id = ?"
)


class _NoConnection:
    """What a `SqliteDesiredTx` has instead of SQLAlchemy's connection."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(
            f"SqliteDesiredTx has no SQLAlchemy connection (asked for {name!r}): "
            "add the method to SqliteDesiredTx, or run the body with DesiredStateRepository.run"
        )


class SqliteDesiredTx(DesiredTx):
    """A `DesiredTx` on aiosqlite's thread (`DesiredStateRepository.run_in_one_hop`):
    the same reads and writes, as plain sqlite3 statements in the transaction `db`
    holds. Its methods are coroutines that never suspend. It has the methods the
    convergence's transactions use; any other raises RuntimeError."""

    def __init__(self, db: sqlite3.Connection, database: Database) -> None:
        super().__init__(cast(AsyncConnection, _NoConnection()), database)
        self._sqlite = db

    @property
    def conn(self) -> AsyncConnection:
        """None here: RuntimeError (see the class docstring)."""
        raise RuntimeError("SqliteDesiredTx has no SQLAlchemy connection")

    def _rows(self, sql: str, params: Sequence[Any], row_type: Any) -> builtins.list[Any]:
        cur = self._sqlite.execute(sql, params)
        try:
            return [row_type._make(r) for r in cur.fetchall()]
        finally:
            cur.close()

    def _by_ids(
        self,
        row_type: Any,
        table: Any,
        ids: Collection[str],
        where: str = "",
        params: Sequence[Any] = (),
        order: str = "",
    ) -> builtins.list[Any]:
        out: builtins.list[Any] = []
        for part in chunks(sorted(set(ids))):
            sql = _select(row_type, table, f"{where}node_id IN ({_marks(len(part))}){order}")
            out += self._rows(sql, [*params, *part], row_type)
        return out

    def _many(self, sql: str, values: builtins.list[tuple[Any, ...]]) -> None:
        if values:
            self._sqlite.executemany(sql, values).close()

    # --- definitions and revisions ----------------------------------------------------------

    async def definitions(
        self, names: Collection[str] | None = None, *, for_update: bool = False
    ) -> dict[str, DefinitionRecord]:
        """As `DesiredTx.definitions` (the write lock is held since BEGIN IMMEDIATE)."""
        if names is None:
            rows = self._rows(_select(_DefinitionRow, definitions), (), _DefinitionRow)
        else:
            rows = []
            for part in chunks(sorted(set(names))):
                where = f"name IN ({_marks(len(part))})"
                sql = _select(_DefinitionRow, definitions, where)
                rows += self._rows(sql, part, _DefinitionRow)
        return {r.name: _definition(r) for r in sorted(rows, key=lambda r: r.name)}

    async def put_definition(self, record: DefinitionRecord) -> None:
        """As `DesiredTx.put_definition`."""
        self._many(_PUT_DEFINITION, [tuple(getattr(record, c) for c in _DefinitionRow._fields)])

    async def revision(self, name: str, revision: int) -> RevisionRecord | None:
        """As `DesiredTx.revision`."""
        sql = _select(_RevisionRow, definition_revisions, "name = ? AND revision = ?")
        rows = self._rows(sql, [name, revision], _RevisionRow)
        return _revision(rows[0]) if rows else None

    async def add_revision(self, record: RevisionRecord) -> None:
        """As `DesiredTx.add_revision`."""
        self._many(_ADD_REVISION, [tuple(getattr(record, c) for c in _RevisionRow._fields)])

    async def revisions_of(
        self, pairs: Collection[tuple[str, int]]
    ) -> dict[tuple[str, int], RevisionRecord]:
        """As `DesiredTx.revisions_of`."""
        out: dict[tuple[str, int], RevisionRecord] = {}
        by_name = grouped(pairs)
        for name, revs in sorted(by_name.items()):
            for part in chunks(sorted(revs)):
                where = f"name = ? AND revision IN ({_marks(len(part))})"
                sql = _select(_RevisionRow, definition_revisions, where)
                for r in self._rows(sql, [name, *part], _RevisionRow):
                    out[r.name, r.revision] = _revision(r)
        return out

    # --- assignments --------------------------------------------------------------------------

    async def assignments(
        self, *, names: Collection[str] | None = None, node_ids: Collection[str] | None = None
    ) -> builtins.list[AssignmentRecord]:
        """As `DesiredTx.assignments`."""
        where, params = "", []
        if names is not None:
            wanted = sorted(set(names))
            if not wanted:
                return []
            where, params = f"name IN ({_marks(len(wanted))}) AND ", wanted
        order = " ORDER BY node_id, name"
        if node_ids is not None:
            rows = self._by_ids(_AssignmentRow, assignments, node_ids, where, params, order)
        else:
            sql = _select(_AssignmentRow, assignments, where.removesuffix(" AND ")) + order
            rows = self._rows(sql, params, _AssignmentRow)
        return [_assignment(r) for r in rows]

    async def set_assignments(self, records: Sequence[AssignmentRecord]) -> None:
        """As `DesiredTx.set_assignments`."""
        self._many(_SET_ASSIGNMENTS, [(r.node_id, r.name, r.revision, r.since_ms) for r in records])

    async def delete_assignments(self, keys: Collection[tuple[str, str]]) -> None:
        """As `DesiredTx.delete_assignments`."""
        self._many(
            f"DELETE FROM {assignments.name} WHERE node_id = ? AND name = ?",  # noqa: S608
            sorted(keys),
        )

    # --- nodes ------------------------------------------------------------------------------

    async def all_nodes(self) -> builtins.list[NodeRecord]:
        """As `DesiredTx.all_nodes`."""
        sql = _select(_NodeRow, nodes) + " ORDER BY node_id"
        return [node_from_row(r) for r in self._rows(sql, (), _NodeRow)]

    async def online_ids(self) -> set[str]:
        """As `DesiredTx.online_ids`."""
        cur = self._sqlite.execute(
            f"SELECT node_id FROM {nodes.name} WHERE status = 'online'"  # noqa: S608 (constant)
        )
        try:
            return {r[0] for r in cur.fetchall()}
        finally:
            cur.close()

    async def nodes(self, node_ids: Collection[str]) -> dict[str, NodeRecord]:
        """As `DesiredTx.nodes`."""
        return {r.node_id: node_from_row(r) for r in self._by_ids(_NodeRow, nodes, node_ids)}

    # --- agents -------------------------------------------------------------------------------

    async def agent_states(
        self, *, node_ids: Collection[str] | None = None, agent_id: str = ""
    ) -> builtins.list[AgentStateRecord]:
        """As `DesiredTx.agent_states`."""
        return sqlite_select_states(self._sqlite, node_ids=node_ids, agent_id=agent_id)

    async def agent_briefs(self, node_ids: Collection[str], agent_id: str) -> dict[str, AgentBrief]:
        """As `DesiredTx.agent_briefs`."""
        rows = self._by_ids(_BriefRow, agent_states, node_ids, "agent_id = ? AND ", [agent_id])
        return {r.node_id: AgentBrief(r.node_id, r.revision, r.status, r.health) for r in rows}

    async def judged_agents(
        self, node_ids: Collection[str], agent_id: str
    ) -> builtins.list[AgentStateRecord]:
        """As `DesiredTx.judged_agents`."""
        rows = self._by_ids(
            _JudgedRow, agent_states, node_ids, "agent_id = ? AND ", [agent_id], " ORDER BY node_id"
        )
        return [_judged(agent_id, r) for r in rows]

    async def replace_agents(
        self, snapshots: Sequence[tuple[str, Sequence[AgentStateRecord]]], *, now_ms: int
    ) -> builtins.list[int | None]:
        """As `DesiredTx.replace_agents`."""
        return sqlite_replace_many(
            self._sqlite, snapshots, now_ms=now_ms, events_out=self.queued_events
        )

    # --- node versions ------------------------------------------------------------------------

    async def node_desired(
        self, node_ids: Collection[str] | None = None
    ) -> dict[str, NodeDesiredRecord]:
        """As `DesiredTx.node_desired`."""
        if node_ids is None:
            rows = self._rows(_select(_NodeDesiredRow, node_desired), (), _NodeDesiredRow)
        else:
            rows = self._by_ids(_NodeDesiredRow, node_desired, node_ids)
        return {r.node_id: _node_desired(r) for r in rows}

    async def observed_rows(self, node_ids: Collection[str]) -> dict[str, NodeDesiredRecord]:
        """As `DesiredTx.observed_rows`."""
        rows = self._by_ids(_ObservedRow, node_desired, node_ids, _OBSERVED_WHERE)
        return {r.node_id: _observed(r) for r in rows}

    async def put_node_desired(self, records: Sequence[NodeDesiredRecord]) -> None:
        """As `DesiredTx.put_node_desired`."""
        sqlite_put_node_desired(self._sqlite, records)

    # --- rollouts -----------------------------------------------------------------------------

    async def rollouts(
        self,
        *,
        name: str = "",
        live: bool = False,
        limit: int = 100,
        for_update: bool = False,
    ) -> builtins.list[RolloutRecord]:
        """As `DesiredTx.rollouts`."""
        where, params = [], []
        if name:
            where.append("name = ?")
            params.append(name)
        if live:
            where.append("ended_ms = 0")
        sql = _select(_RolloutRow, rollouts, " AND ".join(where)) + " ORDER BY id DESC LIMIT ?"
        return [_rollout(r) for r in self._rows(sql, [*params, limit], _RolloutRow)]

    async def rollout(self, rollout_id: int, *, for_update: bool = False) -> RolloutRecord | None:
        """As `DesiredTx.rollout`."""
        rows = self._rows(_select(_RolloutRow, rollouts, "id = ?"), [rollout_id], _RolloutRow)
        return _rollout(rows[0]) if rows else None

    async def add_rollout(self, record: RolloutRecord) -> int:
        """As `DesiredTx.add_rollout`."""
        cur = self._sqlite.execute(_ADD_ROLLOUT, [getattr(record, c) for c in _ROLLOUT_INSERTED])
        try:
            assert cur.lastrowid is not None
            return int(cur.lastrowid)
        finally:
            cur.close()

    async def update_rollout(self, record: RolloutRecord) -> None:
        """As `DesiredTx.update_rollout`."""
        values = (record.target, record.previous, record.state, record.record)
        self._many(_UPDATE_ROLLOUT, [(*values, record.updated_ms, record.ended_ms, record.id)])

    async def rollout_nodes(self, rollout_id: int) -> dict[str, RolloutNodeRecord]:
        """As `DesiredTx.rollout_nodes`."""
        sql = _select(_RolloutNodeRow, rollout_nodes, "rollout_id = ?")
        return {r.node_id: _rollout_node(r) for r in self._rows(sql, [rollout_id], _RolloutNodeRow)}

    async def put_rollout_nodes(self, records: Sequence[RolloutNodeRecord]) -> None:
        """As `DesiredTx.put_rollout_nodes`."""
        self._many(
            _PUT_ROLLOUT_NODES,
            [
                (r.rollout_id, r.node_id, r.phase, r.batch, r.since_ms, r.offline, r.reason)
                for r in records
            ],
        )

    async def _finish(self) -> None:
        # Audit entries before the events, as `QueuedWrites._finish` (events last).
        rows = [audit_row(**entry) for entry in self._audits]
        self._many(_ADD_AUDIT, [tuple(r[c] for c in _AUDITED) for r in rows])
        sqlite_insert_events(self._sqlite, self._events)
