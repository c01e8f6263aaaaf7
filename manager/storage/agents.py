"""Agent states per node, replaced as a whole on every SyncAgentStates."""

from __future__ import annotations

import builtins
import dataclasses
import functools
import operator
import sqlite3
from collections.abc import Callable, Collection, Sequence
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from fleet.errors import InvalidArgument, NotFound, Resource
from manager.storage.db import Database
from manager.storage.events import dump_map, event_row, insert_events, load_map
from manager.storage.records import AgentStateRecord, NodeDesiredRecord
from manager.storage.schema import agent_states, node_desired, nodes
from manager.storage.sqlhelp import chunks
from manager.storage.sqlite_hops import on_driver_thread

__all__ = [
    "AgentStateRepository",
    "check_snapshot",
    "describe_change",
    "replace_in",
    "replace_many",
    "select_states",
    "sqlite_put_node_desired",
    "sqlite_replace_many",
    "sqlite_select_states",
    "state_changed",
    "steady",
]

# What makes a report a *change* worth an event. Heartbeat times and the
# free-text message move on every report and would flood the event log.
_EVENT_FIELDS = (
    "status",
    "pid",
    "type",
    "version",
    "start_time_ms",
    "restart_count",
    "exit_code",
    "labels",
    "health",
    "config_version",
    "last_exit_ms",
    "revision",
    "log_problem",
)


_EVENT_KEY = operator.attrgetter(*_EVENT_FIELDS)


def state_changed(old: AgentStateRecord, new: AgentStateRecord) -> bool:
    """True if `new` differs from `old` in anything an operator watches for."""
    return bool(_EVENT_KEY(old) != _EVENT_KEY(new))


def describe_change(
    node_id: str,
    agent_id: str,
    before: AgentStateRecord | None,
    after: AgentStateRecord | None,
) -> tuple[str, dict[str, str]]:
    """An AGENT_STATE_CHANGED event's message and attributes: what changed, in words.

    "web on node-1: RUNNING -> BACKOFF: exited with code 3", "web on node-1
    restarted (pid 41 -> 57): killed by SIGKILL", "web on node-1: config
    version 3 -> 4". Why: the reason of a new last exit (also in the
    attributes, with its kind and code), else, for a change of state or
    health, the daemon's line on the new state ("hb on node-1: health HEALTHY
    -> UNHEALTHY: unhealthy: no heartbeat for 5.1s (timeout 5s); restarting").
    Whether its output is being lost (its log's filesystem full, or no longer)
    is said too, after the rest if something else changed with it.
    """
    message, attributes = _describe_change(node_id, agent_id, before, after)
    was = before.log_problem if before is not None else ""
    now = after.log_problem if after is not None else ""
    if after is None or was == now:
        return message, attributes
    if now:
        attributes["log_problem"] = now
        note = f"output being lost: {now}"
    else:
        note = "output logged again (its log's filesystem has space)"
    subject = f"{agent_id} on {node_id}"
    return (f"{subject}: {note}" if message == subject else f"{message}; {note}"), attributes


def _describe_change(
    node_id: str,
    agent_id: str,
    before: AgentStateRecord | None,
    after: AgentStateRecord | None,
) -> tuple[str, dict[str, str]]:
    """`describe_change` but for the log's news (the subject alone if that is all)."""
    subject = f"{agent_id} on {node_id}"
    from_status = before.status if before else ""
    to_status = after.status if after else ""
    attributes = {
        "change": "added" if before is None else "removed" if after is None else "changed",
        "from": from_status,
        "to": to_status,
    }
    if after is None:
        return f"{subject} removed (was {from_status})", attributes
    exited = after.last_exit_ms != 0 and (
        before is None or after.last_exit_ms != before.last_exit_ms
    )
    if exited:
        attributes |= {
            "reason": after.last_exit_reason,
            "exit_kind": after.last_exit_kind,
            "exit_code": str(after.last_exit_code),
        }
        why = f": {after.last_exit_reason}"
    elif (
        before is not None
        and after.message
        and (from_status != to_status or before.health != after.health)
    ):
        why = f": {after.message}"
    else:
        why = ""
    if before is None:
        return f"{subject} added: {to_status}{why}", attributes
    if from_status != to_status:
        return f"{subject}: {from_status} -> {to_status}{why}", attributes
    if after.start_time_ms != before.start_time_ms or after.pid != before.pid:
        pids = f" (pid {before.pid} -> {after.pid})" if before.pid and after.pid else ""
        return f"{subject} restarted{pids}{why}", attributes
    parts = []
    for name, words in (
        ("health", "health"),
        ("version", "version"),
        ("config_version", "config version"),
        ("restart_count", "restarts"),
        ("exit_code", "exit code"),
        ("type", "type"),
    ):
        old_value, new_value = getattr(before, name), getattr(after, name)
        if name == "health":  # fleetctl's word for "no health check"
            old_value, new_value = _health_word(old_value), _health_word(new_value)
        if old_value != new_value:
            parts.append(f"{words} {old_value or '-'} -> {new_value or '-'}")
    if before.labels != after.labels:
        parts.append("labels changed")
    if not parts and after.log_problem != before.log_problem:
        return subject, attributes  # `describe_change` says the log's news
    return f"{subject}: {', '.join(parts) or 'changed'}{why}", attributes


def _health_word(health: str) -> str:
    return "NONE" if health in ("", "UNSPECIFIED") else health


def _row(state: AgentStateRecord, reported_ms: int | None = None) -> dict[str, Any]:
    """The row of `state` (`reported_ms` instead of its own, if given), its keys in
    `_COLUMNS` order."""
    return {
        "node_id": state.node_id,
        "agent_id": state.agent_id,
        "status": state.status,
        "pid": state.pid,
        "last_heartbeat_ms": state.last_heartbeat_ms,
        "type": state.type,
        "version": state.version,
        "start_time_ms": state.start_time_ms,
        "restart_count": state.restart_count,
        "exit_code": state.exit_code,
        "message": state.message,
        "labels": dump_map(state.labels) if state.labels else "{}",
        "health": state.health,
        "config_version": state.config_version,
        "last_exit_kind": state.last_exit_kind,
        "last_exit_code": state.last_exit_code,
        "last_exit_reason": state.last_exit_reason,
        "last_exit_ms": state.last_exit_ms,
        "reported_ms": state.reported_ms if reported_ms is None else reported_ms,
        "revision": state.revision,
        "health_message": state.health_message,
        "health_since_ms": state.health_since_ms,
        "log_problem": state.log_problem,
    }


_COLUMNS = tuple(c.name for c in agent_states.columns)
"""agent_states' columns, in the order of `_row`'s keys and the record's fields."""
_LABELS = _COLUMNS.index("labels")
_DESIRED_COLUMNS = tuple(c.name for c in node_desired.columns)


def _record_of(values: Sequence[Any]) -> AgentStateRecord:
    """A record from an agent_states row's values in `_COLUMNS` order."""
    fields = dict(zip(_COLUMNS, values, strict=True))
    fields["labels"] = load_map(values[_LABELS])
    return AgentStateRecord(**fields)


def _desired_of(values: Sequence[Any]) -> NodeDesiredRecord:
    """A record from a node_desired row's values in `_DESIRED_COLUMNS` order."""
    from manager.storage.desired import load_update_errors  # desired imports this module

    fields = dict(zip(_DESIRED_COLUMNS, values, strict=True))
    fields["update_errors"] = load_update_errors(fields["update_errors"])
    return NodeDesiredRecord(**fields)


def _record(row: Any) -> AgentStateRecord:
    return AgentStateRecord(
        node_id=row.node_id,
        agent_id=row.agent_id,
        status=row.status,
        pid=row.pid,
        last_heartbeat_ms=row.last_heartbeat_ms,
        type=row.type,
        version=row.version,
        start_time_ms=row.start_time_ms,
        restart_count=row.restart_count,
        exit_code=row.exit_code,
        message=row.message,
        labels=load_map(row.labels),
        health=row.health,
        config_version=row.config_version,
        last_exit_kind=row.last_exit_kind,
        last_exit_code=row.last_exit_code,
        last_exit_reason=row.last_exit_reason,
        last_exit_ms=row.last_exit_ms,
        reported_ms=row.reported_ms,
        revision=row.revision,
        health_message=row.health_message,
        health_since_ms=row.health_since_ms,
        log_problem=row.log_problem,
    )


async def select_states(
    conn: AsyncConnection,
    *,
    node_ids: Collection[str] | None = None,
    agent_id: str = "",
    statuses: Collection[str] = (),
    health: str = "",
) -> list[AgentStateRecord]:
    """`AgentStateRepository.list` inside a caller's transaction."""
    order = (agent_states.c.node_id, agent_states.c.agent_id)
    query = select(agent_states).order_by(*order)
    if agent_id:
        query = query.where(agent_states.c.agent_id == agent_id)
    if statuses:
        query = query.where(agent_states.c.status.in_(sorted(statuses)))
    if health:
        query = query.where(agent_states.c.health == health)
    if node_ids is None:
        return [_record(r) for r in await conn.execute(query)]
    out: list[AgentStateRecord] = []
    for part in chunks(sorted(set(node_ids))):
        result = await conn.execute(query.where(agent_states.c.node_id.in_(part)))
        out.extend(_record(r) for r in result)
    return out


def sqlite_select_states(
    db: sqlite3.Connection, *, node_ids: Collection[str] | None = None, agent_id: str = ""
) -> list[AgentStateRecord]:
    """`select_states` (by nodes and agent only) on aiosqlite's thread."""
    where, params = (["agent_id = ?"], [agent_id]) if agent_id else ([], [])
    order = " ORDER BY node_id, agent_id"
    base = f"SELECT {_RETURNING} FROM {agent_states.name}"  # noqa: S608 (constants only)
    if node_ids is None:
        sql = base + (f" WHERE {where[0]}" if where else "") + order
        return [_record_of(r) for r in _fetch(db, sql, params)]
    out: list[AgentStateRecord] = []
    for part in chunks(sorted(set(node_ids))):
        sql = f"{base} WHERE {' AND '.join([*where, f'node_id IN ({_marks(len(part))})'])}{order}"
        out += [_record_of(r) for r in _fetch(db, sql, [*params, *part])]
    return out


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def check_snapshot(node_id: str, states: Sequence[AgentStateRecord]) -> None:
    """InvalidArgument for a state of another node or a repeated agent id."""
    seen: set[str] = set()
    for i, state in enumerate(states):
        if state.node_id != node_id:
            raise InvalidArgument(
                f"belongs to node {state.node_id!r}, not {node_id!r}",
                field=f"states[{i}].node_id",
            )
        if state.agent_id in seen:
            raise InvalidArgument(
                f"agent {state.agent_id!r} is listed twice", field=f"states[{i}].agent_id"
            )
        seen.add(state.agent_id)


async def replace_in(
    conn: AsyncConnection,
    node_id: str,
    states: Sequence[AgentStateRecord],
    *,
    now_ms: int,
    actor: str,
) -> int:
    """AgentStateRepository.replace inside the caller's transaction (`states`
    already passed `check_snapshot`). NotFound for an unknown node is raised
    before anything is written, so the caller may go on with other nodes."""
    (changed,) = await replace_many(
        conn, [(node_id, states)], now_ms=now_ms, actor_of=lambda _node_id: actor
    )
    if changed is None:
        raise NotFound(f"node {node_id!r} is not registered", resource=Resource("node", node_id))
    return changed


async def replace_many(
    conn: AsyncConnection,
    snapshots: Sequence[tuple[str, Sequence[AgentStateRecord]]],
    *,
    now_ms: int,
    actor_of: Callable[[str], str] = lambda node_id: f"node/{node_id}",
    events_out: list[dict[str, Any]] | None = None,
    desired_out: dict[str, NodeDesiredRecord] | None = None,
) -> list[int | None]:
    """`replace_in` for several nodes (each at most once) in a handful of statements
    whatever their number: per node, how many agents changed, or None for a node that
    is not registered (nothing of it written). Its events are inserted last, or
    appended to `events_out` for the caller to write last. `desired_out`, if given,
    gets the registered nodes' node_desired rows as they were (what their reports are
    judged against: `DaemonReports.apply_many`), read with the old snapshots.

    A batch of daemons reports at once during a rollout, and an idle fleet's reports
    come one at a time: statements per report made each report cost milliseconds of
    the manager's one event loop. On SQLite it is `sqlite_replace_many`, one hop to
    aiosqlite's thread (SQLAlchemy's statement building was most of a report's cost)."""
    _check_once(snapshots)
    events: list[dict[str, Any]] = []
    if conn.dialect.name == "sqlite":
        out = await on_driver_thread(
            conn,
            functools.partial(
                sqlite_replace_many,
                now_ms=now_ms,
                actor_of=actor_of,
                events_out=events,
                desired_out=desired_out,
            ),
            snapshots,
        )
    else:
        out = await _postgresql_replace_many(conn, snapshots, now_ms, actor_of, events, desired_out)
    if events_out is None:
        await insert_events(conn, events)
    else:
        events_out.extend(events)
    return out


def sqlite_replace_many(
    db: sqlite3.Connection,
    snapshots: Sequence[tuple[str, Sequence[AgentStateRecord]]],
    *,
    now_ms: int,
    actor_of: Callable[[str], str] = lambda node_id: f"node/{node_id}",
    events_out: list[dict[str, Any]],
    desired_out: dict[str, NodeDesiredRecord] | None = None,
) -> list[int | None]:
    """`replace_many` on aiosqlite's thread, in the write transaction `db` holds (the
    write lock is held since BEGIN IMMEDIATE: nothing to lock row by row); its events
    are appended to `events_out` for the caller to write last."""
    _check_once(snapshots)
    present, old_rows, desired_rows = _sqlite_take(
        db, sorted(node_id for node_id, _ in snapshots), desired_out is not None
    )
    old: dict[str, dict[str, AgentStateRecord]] = {}
    for r in map(_record_of, old_rows):
        old.setdefault(r.node_id, {})[r.agent_id] = r
    if desired_out is not None:
        desired_out.update((d.node_id, d) for d in map(_desired_of, desired_rows))
    out, inserted = _replace(snapshots, set(present), old, now_ms, actor_of, events_out)
    if inserted:
        values = [tuple(row.values()) for row in inserted]  # _row's keys: _COLUMNS' order
        db.executemany(_INSERT_SQL, values).close()
    return out


async def _postgresql_replace_many(
    conn: AsyncConnection,
    snapshots: Sequence[tuple[str, Sequence[AgentStateRecord]]],
    now_ms: int,
    actor_of: Callable[[str], str],
    events_out: list[dict[str, Any]],
    desired_out: dict[str, NodeDesiredRecord] | None,
) -> list[int | None]:
    known: set[str] = set()
    # Locking the node rows (in id order) serializes concurrent replaces of a node.
    for part in chunks(sorted(node_id for node_id, _ in snapshots)):
        known.update(
            await conn.scalars(
                select(nodes.c.node_id)
                .where(nodes.c.node_id.in_(part))
                .order_by(nodes.c.node_id)
                .with_for_update()
            )
        )
    old: dict[str, dict[str, AgentStateRecord]] = {}
    for part in chunks(sorted(known)):
        # The rows it deletes are the old snapshot: one statement, not a read and a delete.
        result = await conn.execute(
            delete(agent_states)
            .where(agent_states.c.node_id.in_(part))
            .returning(*agent_states.columns)
        )
        for r in map(_record, result):
            old.setdefault(r.node_id, {})[r.agent_id] = r
        if desired_out is not None:
            rows = await conn.execute(select(node_desired).where(node_desired.c.node_id.in_(part)))
            desired_out.update((d.node_id, d) for d in map(_desired_of, rows))
    out, inserted = _replace(snapshots, known, old, now_ms, actor_of, events_out)
    if inserted:
        await conn.execute(insert(agent_states), inserted)
    return out


REBASE_JITTER_MS = 2000
"""How far apart two reports' re-based times of one moment may be (the network delay
between the daemon measuring an age and the manager receiving it) and still be one."""

SAME_PROCESS_MS = 60_000
"""The same pid with a re-based start time this close is the same process: a report can
wait in the daemon's queue for seconds under load (its age measured when it was built),
and a start time that moved would read as a restart (an event)."""


def steady(before: AgentStateRecord | None, after: AgentStateRecord) -> AgentStateRecord:
    """`after`, keeping `before`'s `start_time_ms` (same process) and `health_since_ms`
    (same health) when they differ by less than REBASE_JITTER_MS: times the manager
    re-bases from ages (`service.agents.on_manager_clock`) move by the network delay on
    every report, and a start time that moved would read as a change (an event)."""
    if before is None:
        return after
    start, since = after.start_time_ms, after.health_since_ms
    if before.pid == after.pid and abs(start - before.start_time_ms) < SAME_PROCESS_MS:
        start = before.start_time_ms
    if before.health == after.health and abs(since - before.health_since_ms) < REBASE_JITTER_MS:
        since = before.health_since_ms
    if (start, since) == (after.start_time_ms, after.health_since_ms):
        return after
    return dataclasses.replace(after, start_time_ms=start, health_since_ms=since)


def _check_once(snapshots: Sequence[tuple[str, Sequence[AgentStateRecord]]]) -> None:
    ids = [node_id for node_id, _ in snapshots]
    if len(set(ids)) != len(ids):
        raise ValueError("replace_many: a node listed twice")


def _replace(
    snapshots: Sequence[tuple[str, Sequence[AgentStateRecord]]],
    known: Collection[str],
    old: dict[str, dict[str, AgentStateRecord]],
    now_ms: int,
    actor_of: Callable[[str], str],
    events_out: list[dict[str, Any]],
) -> tuple[list[int | None], list[dict[str, Any]]]:
    """Per node how many agents changed (None: not registered), the rows to insert, and
    an event per change appended to `events_out` (pure)."""
    inserted: list[dict[str, Any]] = []
    out: list[int | None] = []
    for node_id, states in snapshots:
        if node_id not in known:
            out.append(None)
            continue
        # Stored with reported_ms = now_ms; the records compared and described below keep
        # their own (neither state_changed nor describe_change reads it).
        before_all = old.get(node_id, {})
        states = [steady(before_all.get(s.agent_id), s) for s in states]
        inserted.extend(_row(s, now_ms) for s in states)
        new = {s.agent_id: s for s in states}
        changed = 0
        for agent_id in sorted(before_all.keys() | new.keys()):
            before, after = before_all.get(agent_id), new.get(agent_id)
            if before is not None and after is not None and not state_changed(before, after):
                continue
            message, attributes = describe_change(node_id, agent_id, before, after)
            events_out.append(
                event_row(
                    "AGENT_STATE_CHANGED",
                    now_ms=now_ms,
                    node_id=node_id,
                    agent_id=agent_id,
                    actor=actor_of(node_id),
                    message=message,
                    attributes=attributes,
                )
            )
            changed += 1
        out.append(changed)
    return out, inserted


def sqlite_put_node_desired(db: sqlite3.Connection, records: Sequence[NodeDesiredRecord]) -> None:
    """`DesiredTx.put_node_desired` on aiosqlite's thread: insert or replace the rows."""
    if records:
        from manager.storage.desired import dump_update_errors  # desired imports this module

        values = [
            tuple(
                dump_update_errors(r.update_errors) if c == "update_errors" else getattr(r, c)
                for c in _DESIRED_COLUMNS
            )
            for r in records
        ]
        db.executemany(_PUT_DESIRED_SQL, values).close()


def _in(table: str, what: str, n: int) -> str:
    return f"{what} {table} WHERE node_id IN ({', '.join('?' * n)})"


_RETURNING = ", ".join(_COLUMNS)
_SELECT_DESIRED = f"SELECT {', '.join(_DESIRED_COLUMNS)} FROM"
_INSERT_SQL = (
    f"INSERT INTO {agent_states.name} ({_RETURNING}) "  # noqa: S608 (constants only)
    f"VALUES ({', '.join('?' * len(_COLUMNS))})"
)
_PUT_DESIRED_SQL = (
    f"INSERT INTO {node_desired.name} ({', '.join(_DESIRED_COLUMNS)}) "  # noqa: S608 (constants only)
    f"VALUES ({', '.join('?' * len(_DESIRED_COLUMNS))}) ON CONFLICT (node_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _DESIRED_COLUMNS if c != "node_id")
)


def _sqlite_take(
    db: sqlite3.Connection, ids: list[str], with_desired: bool
) -> tuple[list[str], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Which of `ids` are registered, their agent rows (deleted: the old snapshots) and,
    if asked, their node_desired rows."""
    present: list[str] = []
    for part in chunks(ids):
        sql = _in(nodes.name, "SELECT node_id FROM", len(part))
        present += [r[0] for r in _fetch(db, sql, part)]
    old: list[tuple[Any, ...]] = []
    desired: list[tuple[Any, ...]] = []
    for part in chunks(present):
        sql = _in(agent_states.name, "DELETE FROM", len(part)) + f" RETURNING {_RETURNING}"
        old += _fetch(db, sql, part)
        if with_desired:
            desired += _fetch(db, _in(node_desired.name, _SELECT_DESIRED, len(part)), part)
    return present, old, desired


def _fetch(db: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    cur = db.execute(sql, params)
    try:
        return cur.fetchall()
    finally:
        cur.close()


class AgentStateRepository:
    """Reads and replaces the agent states the daemons report."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def replace(
        self,
        node_id: str,
        states: Sequence[AgentStateRecord],
        *,
        now_ms: int,
        actor: str,
    ) -> int:
        """Make the node's agents exactly `states`, atomically; return how many changed.

        One AGENT_STATE_CHANGED event per added, changed or removed agent
        (attributes: change, from, to — the statuses, "" when absent).
        NotFound if the node is unknown; InvalidArgument for a state of
        another node, a repeated agent id, or a value the schema rejects —
        and then nothing changes.
        """
        check_snapshot(node_id, states)

        async def body(conn: AsyncConnection) -> int:
            return await replace_in(conn, node_id, states, now_ms=now_ms, actor=actor)

        return await self._db.run(body)

    async def list(
        self,
        *,
        node_ids: Collection[str] | None = None,
        agent_id: str = "",
        statuses: Collection[str] = (),
        health: str = "",
    ) -> builtins.list[AgentStateRecord]:
        """Agent states ordered by (node, agent); only those nodes' if `node_ids` is given,
        only agents with that id, in one of those `statuses` or of that `health` if given
        (filtered in SQL: decoding every row of a large fleet to keep a few costs most)."""

        async def body(conn: AsyncConnection) -> builtins.list[AgentStateRecord]:
            return await select_states(
                conn, node_ids=node_ids, agent_id=agent_id, statuses=statuses, health=health
            )

        return await self._db.run(body, write=False)

    async def counts_by_status(self, node_id: str) -> dict[str, int]:
        """How many of the node's agents are in each status."""

        async def body(conn: AsyncConnection) -> dict[str, int]:
            result = await conn.execute(
                select(agent_states.c.status, func.count())
                .where(agent_states.c.node_id == node_id)
                .group_by(agent_states.c.status)
            )
            return {status: int(n) for status, n in result}

        return await self._db.run(body, write=False)
