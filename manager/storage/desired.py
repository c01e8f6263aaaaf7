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
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from manager.storage.agents import select_states
from manager.storage.db import Database, Dialect
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
    rollout_nodes,
    rollouts,
)
from manager.storage.sqlhelp import chunks, dialect_insert

__all__ = [
    "AgentBrief",
    "DesiredStateRepository",
    "DesiredTx",
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
        columns = (
            c.node_id, c.status, c.start_time_ms, c.message, c.health, c.last_exit_reason,
            c.revision, c.health_message, c.health_since_ms,
        )  # fmt: skip
        return (
            select(*columns)
            .where(c.node_id.in_(ids), c.agent_id == bindparam("agent_id"))
            .order_by(c.node_id)
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
        by_name: dict[str, set[int]] = {}
        for name, revision in pairs:
            by_name.setdefault(name, set()).add(revision)
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
            out.extend(
                AgentStateRecord(
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
                for r in rows
            )
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
