"""SyncAgentStates: a node's complete agent snapshot replaces the old one.

Reports are group-committed: while one transaction writes, the reports
that arrive queue up, and the next transaction writes all of them (the
snapshots, the spec versions and update errors the daemons say they run,
their events). During a rollout a batch of daemons reports at once; one
transaction per report made the manager's one SQLite writer the
bottleneck. A report is acknowledged only after the transaction that
holds it committed, so an acknowledged snapshot survives a kill -9.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sqlite3
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleet.errors import FleetError, InvalidArgument, NotFound, Resource
from fleet.labels import validate_label_value
from fleet.v1 import common_pb2, manager_pb2
from manager.service.registry import NodeRegistry
from manager.service.reports import DaemonReports
from manager.service.validation import (
    MAX_AGENTS_PER_SYNC,
    MAX_MESSAGE,
    validate_agent_states,
    validate_spec_version,
)
from manager.storage import AgentStateRecord
from manager.storage.agents import (
    check_snapshot,
    replace_many,
    sqlite_put_node_desired,
    sqlite_replace_many,
)
from manager.storage.desired import DesiredStateRepository, DesiredTx
from manager.storage.events import sqlite_insert_events
from manager.storage.records import NodeDesiredRecord, UpdateErrorRecord

__all__ = [
    "AgentStates",
    "age_field",
    "agent_state_record",
    "last_exit_fields",
    "on_manager_clock",
    "snapshot_records",
    "update_error_records",
]

log = logging.getLogger(__name__)


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    try:
        name: str = enum.Name(value)
    except ValueError:
        return f"#{value}"  # an enum number this manager does not know; refused by validation
    return name.removeprefix(prefix)


def on_manager_clock(stamp_ms: int, age_ms: int | None, received_ms: int) -> int:
    """A time the daemon stamped, on the manager's clock: `received_ms` less its age on
    the daemon's monotonic clock (newer daemons send it), so the two hosts' clocks need
    not agree; without an age (older daemons) or a time (0: never), `stamp_ms` as is."""
    if age_ms is None or stamp_ms <= 0:
        return stamp_ms
    return max(1, received_ms - max(0, age_ms))


def age_field(msg: Any, name: str) -> int | None:
    """An optional age field of an AgentState / AgentInfo message; None when unset."""
    return int(getattr(msg, name)) if msg.HasField(name) else None


def agent_state_record(
    node_id: str, st: manager_pb2.AgentState, *, received_ms: int
) -> AgentStateRecord:
    """The storage record for one AgentState message received at `received_ms` (the
    manager's clock): its `health_since` and `start_time` are re-based on that clock when
    the daemon sent their ages (`on_manager_clock`)."""
    return AgentStateRecord(
        node_id=node_id,
        agent_id=st.agent_id,
        status=_enum_name(common_pb2.AgentStatus, st.status, "AGENT_STATUS_"),
        pid=st.pid,
        last_heartbeat_ms=st.last_heartbeat,
        type=st.type,
        version=st.version,
        start_time_ms=on_manager_clock(st.start_time, age_field(st, "start_age_ms"), received_ms),
        restart_count=st.restart_count,
        exit_code=st.exit_code,
        message=st.message,
        labels=dict(st.labels),
        health=_enum_name(common_pb2.AgentHealth, st.health, "AGENT_HEALTH_"),
        config_version=st.config_version,
        revision=st.revision,
        health_message=st.health_message,
        health_since_ms=on_manager_clock(
            st.health_since, age_field(st, "health_age_ms"), received_ms
        ),
        log_problem=st.log_problem,
        **last_exit_fields(st.last_exit if st.HasField("last_exit") else None),
    )


def update_error_records(msgs: Any) -> list[UpdateErrorRecord]:
    """A daemon's UpdateError messages, validated (InvalidArgument naming the field)."""
    if len(msgs) > MAX_AGENTS_PER_SYNC:
        raise InvalidArgument(
            f"at most {MAX_AGENTS_PER_SYNC} per report, got {len(msgs)}", field="update_errors"
        )
    out = []
    for i, e in enumerate(msgs):
        where = f"update_errors[{i}]"
        validate_label_value(e.agent_id, field=f"{where}.agent_id")
        if len(e.reason) > MAX_MESSAGE or "\x00" in e.reason:
            raise InvalidArgument(
                f"must be at most {MAX_MESSAGE} characters, without NUL", field=f"{where}.reason"
            )
        if not 0 <= e.revision < 2**63:
            raise InvalidArgument("must be in 0..2^63-1", field=f"{where}.revision")
        out.append(UpdateErrorRecord(e.agent_id, e.revision, e.reason))
    return out


def last_exit_fields(msg: common_pb2.LastExit | None) -> dict[str, Any]:
    """The AgentStateRecord fields of a LastExit message (empty ones for None)."""
    if msg is None:
        return {}
    kind = _enum_name(common_pb2.AgentExitKind, msg.kind, "AGENT_EXIT_KIND_")
    return {
        "last_exit_kind": "" if kind == "UNSPECIFIED" else kind.lower(),
        "last_exit_code": msg.exit_code,
        "last_exit_reason": msg.reason,
        "last_exit_ms": msg.time,
    }


def snapshot_records(
    request: manager_pb2.SyncAgentStatesRequest, *, received_ms: int
) -> tuple[list[AgentStateRecord], list[UpdateErrorRecord]]:
    """A daemon's snapshot (a SyncAgentStates, or the one a PushUpdate answer carries),
    received at `received_ms`, as records, checked as `AgentStates.sync` checks it:
    InvalidArgument naming the field."""
    states = [
        agent_state_record(request.node_id, st, received_ms=received_ms) for st in request.states
    ]
    errors = update_error_records(request.update_errors)
    validate_spec_version(request.spec_version)
    validate_agent_states(states)
    check_snapshot(request.node_id, states)
    return states, errors


@dataclass
class _Sync:
    node_id: str
    states: Sequence[AgentStateRecord]
    spec_version: int
    update_errors: Sequence[UpdateErrorRecord] | None
    done: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class AgentStates:
    """Validates snapshots and stores them, many reports per transaction."""

    def __init__(
        self,
        registry: NodeRegistry,
        desired: DesiredStateRepository,
        *,
        clock: Callable[[], float],
        on_change: Callable[[Collection[str]], None] = lambda node_ids: None,
        on_states: Callable[[Collection[str]], None] | None = None,
        max_group: int = 200,
    ) -> None:
        """`on_change(nodes)`: daemons reported their spec version or update errors anew
        (the driver's delivery bookkeeping). `on_states(nodes)`: their agents' states
        changed (only a live rollout judges them); `on_change` if not given. On SQLite
        a group is written by `Database.run_sqlite` (`desired`'s database)."""
        self._registry = registry
        self._desired = desired
        self._clock = clock
        self._on_change = on_change
        self._on_states = on_states or on_change
        self._max_group = max_group
        self._queue: collections.deque[_Sync] = collections.deque()
        self._committer: asyncio.Task[None] | None = None
        self.commits = 0
        """Transactions committed so far (tests and benchmarks read it)."""

    async def sync(
        self,
        node_id: str,
        states: Sequence[AgentStateRecord],
        *,
        spec_version: int = 0,
        update_errors: Sequence[UpdateErrorRecord] | None = None,
    ) -> int:
        """Replace the node's agents with `states` (checked by `snapshot_records`) and
        record the spec version and update errors it reports; returns how many agents
        changed. NotFound for a node that is not registered (nothing stored).
        """
        await self._registry.require_known(node_id)
        pending = _Sync(node_id, states, spec_version, update_errors)
        pending.done.add_done_callback(_consume)
        self._queue.append(pending)
        if self._committer is None:
            self._committer = asyncio.get_running_loop().create_task(
                self._drain(), name="agent-state-commit"
            )
        # shield: a caller that gives up does not cancel the commit others share.
        return await asyncio.shield(pending.done)

    async def stop(self) -> None:
        """Wait for the reports already queued to be committed."""
        if self._committer is not None:
            await asyncio.shield(self._committer)

    async def _drain(self) -> None:
        try:
            while self._queue:
                group = [
                    self._queue.popleft() for _ in range(min(len(self._queue), self._max_group))
                ]
                await self._commit(group)
        finally:
            self._committer = None

    async def _commit(self, group: list[_Sync]) -> None:
        try:
            results = await self._write(group)
        except FleetError as exc:
            if len(group) == 1:
                _answer(group, [exc])
                return
            # One bad report must not fail its neighbours: write one by one.
            for one in group:
                await self._commit([one])
            return
        except Exception as exc:  # a bug: answer the waiters, keep serving
            log.exception("agent state commit failed")
            _answer(group, [exc] * len(group))
            return
        _answer(group, results)

    async def _write(self, group: list[_Sync]) -> list[int | BaseException]:
        now_ms = int(self._clock() * 1000)
        # Node order: concurrent transactions lock node rows in one order (PostgreSQL).
        order = sorted(range(len(group)), key=lambda i: group[i].node_id)

        async def body(tx: DesiredTx) -> _Outcome:
            out = _Outcome(group)
            for part in _rounds(order, group):
                desired: dict[str, NodeDesiredRecord] = {}  # read with the old snapshots
                counts = await replace_many(
                    tx.conn,
                    [(group[i].node_id, group[i].states) for i in part],
                    now_ms=now_ms,
                    events_out=tx.queued_events,
                    desired_out=desired,
                )
                out.reported |= await DaemonReports.apply_many(
                    tx, out.replaced(part, counts), now_ms=now_ms, rows=desired
                )
            return out

        def sqlite_body(db: sqlite3.Connection) -> _Outcome:
            # The same on aiosqlite's thread, the whole transaction in one hop
            # (Database.run_sqlite): an idle fleet's reports come one at a time.
            out = _Outcome(group)
            events: list[dict[str, Any]] = []
            for part in _rounds(order, group):
                desired: dict[str, NodeDesiredRecord] = {}
                counts = sqlite_replace_many(
                    db,
                    [(group[i].node_id, group[i].states) for i in part],
                    now_ms=now_ms,
                    events_out=events,
                    desired_out=desired,
                )
                rows, more = DaemonReports.judge(desired, out.replaced(part, counts), now_ms=now_ms)
                sqlite_put_node_desired(db, rows)
                events += more
                out.reported.update(row.node_id for row in rows)
            sqlite_insert_events(db, events)
            return out

        db = self._desired.db
        if db.dialect == "sqlite":
            outcome = await db.run_sqlite(sqlite_body)
        else:
            outcome = await self._desired.run(body)
        results, states, reported = (
            outcome.results,
            sorted(outcome.states),
            sorted(outcome.reported),
        )
        self.commits += 1
        if reported:
            self._on_change(reported)
        if states:
            self._on_states(states)  # rollouts judge agents by their states
        return results


class _Outcome:
    """What a group's transaction did: per report its count of changed agents or
    NotFound, the nodes whose agents' states changed, and those whose node_desired
    row changed."""

    def __init__(self, group: Sequence[_Sync]) -> None:
        self.group = group
        self.results: list[int | BaseException] = [0] * len(group)
        self.states: set[str] = set()
        self.reported: set[str] = set()

    def replaced(
        self, part: Sequence[int], counts: Sequence[int | None]
    ) -> list[tuple[str, int, Sequence[UpdateErrorRecord] | None]]:
        """Record one round's `replace_many` counts; the reports of the registered nodes
        (node, spec version, update errors), for `DaemonReports`."""
        reports = []
        for i, changed in zip(part, counts, strict=True):
            sync = self.group[i]
            if changed is None:  # nothing of it was written
                self.results[i] = NotFound(
                    f"node {sync.node_id!r} is not registered",
                    resource=Resource("node", sync.node_id),
                )
                continue
            self.results[i] = changed
            if changed > 0:
                self.states.add(sync.node_id)
            reports.append((sync.node_id, sync.spec_version, sync.update_errors))
        return reports


def _rounds(order: Sequence[int], group: Sequence[_Sync]) -> list[list[int]]:
    """`order` cut into runs where each node appears once (a node that reported twice in
    one group: its later report is written after the earlier one, as it came)."""
    out: list[list[int]] = []
    seen: list[set[str]] = []
    for i in order:
        node_id = group[i].node_id
        k = 0  # the first run after the one holding this node's previous report
        for j in range(len(out) - 1, -1, -1):
            if node_id in seen[j]:
                k = j + 1
                break
        if k == len(out):
            out.append([])
            seen.append(set())
        out[k].append(i)
        seen[k].add(node_id)
    return out


def _answer(group: list[_Sync], results: Sequence[int | BaseException]) -> None:
    for pending, result in zip(group, results, strict=True):
        if pending.done.done():
            continue
        if isinstance(result, BaseException):
            pending.done.set_exception(result)
        else:
            pending.done.set_result(result)


def _consume(future: asyncio.Future[int]) -> None:
    # The caller may have gone away; retrieve the outcome so asyncio does not
    # log "exception was never retrieved".
    if not future.cancelled():
        future.exception()
