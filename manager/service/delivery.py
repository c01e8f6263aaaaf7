"""Delivery: pushing node sets to daemons and recording what their answers say.

`Pusher` sends each online node its managed set through the pool (bounded
concurrency) and asks for the node's agents in the answer (`Outcome`). `record`
stores a set of outcomes in the driver's transaction: delivered versions,
refusals and their events, backoffs per node, and the agents an answer carried,
stored as a SyncAgentStates is (`carried_states`). Before they are stored,
`answers_of` says what the answers tell a rollout judging its next step on them.
When the convergence driver records them (at once, or beside the next batch's
pushes) is its own business (`Convergence._record_while`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from fleet.errors import FailedPrecondition, FleetError
from fleet.v1 import common_pb2, daemon_pb2
from manager.pool import DaemonPool
from manager.service.agents import snapshot_records
from manager.service.desired import push_backoff
from manager.service.reports import update_errors_event
from manager.storage import NodeRecord
from manager.storage.desired import DesiredTx
from manager.storage.records import AgentStateRecord, NodeDesiredRecord, UpdateErrorRecord

__all__ = [
    "Answer",
    "Outcome",
    "Pusher",
    "Recorded",
    "answers_of",
    "carried_states",
    "record",
]

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """One push and how it went (recorded by `record`)."""

    node_id: str
    version: int
    set_ms: int
    """When the node's row last changed as the push was decided."""
    sent_ms: int
    """When the pushes of its pass went out (manager clock)."""
    refused: tuple[UpdateErrorRecord, ...] = ()
    error: str = ""
    """Why the push failed ("" if it succeeded)."""
    states: list[AgentStateRecord] | None = None
    """The node's agents after the apply, from the answer (None: not carried)."""


Answer = tuple[tuple[UpdateErrorRecord, ...], list[AgentStateRecord] | None]
"""What a recorded push answer says: the refusals, and the agents if it carried them and
they were stored."""


def answers_of(
    outcomes: Sequence[Outcome], rows: Mapping[str, NodeDesiredRecord]
) -> dict[str, Answer]:
    """What push answers say before `record` stores them: each node's refusals and
    agents; not the agents of a node whose row, read in this pass, says it already
    reported the pushed version (a report stored since: as `record` keeps it)."""
    out: dict[str, Answer] = {}
    for o in outcomes:
        row = rows.get(o.node_id)
        reported = row is not None and row.reported_version >= o.version
        out[o.node_id] = (o.refused, None if reported else o.states)
    return out


def carried_states(
    node_id: str, version: int, reply: daemon_pb2.PushUpdateResponse, *, received_ms: int
) -> list[AgentStateRecord] | None:
    """The agents a push answer (received at `received_ms`) carries, checked as a
    SyncAgentStates is; None if it carries none (an older daemon: its reports say) or
    none usable."""
    if not reply.HasField("agent_states"):
        return None
    snapshot = reply.agent_states
    if snapshot.node_id != node_id or snapshot.spec_version != version:
        return None  # not the node and version this answer is for: wait for the report
    try:
        states, _ = snapshot_records(snapshot, received_ms=received_ms)
    except FleetError as exc:
        log.warning("push answer of %s: agent states not usable (%s)", node_id, exc)
        return None
    return states


@dataclass
class Recorded:
    """What `record` stored of a set of push outcomes."""

    answers: dict[str, Answer] = field(default_factory=dict)
    """The answers recorded (refusals; agents when the answer carried them and they were
    stored), by node."""
    pushed: list[str] = field(default_factory=list)
    """Nodes whose push succeeded, in the outcomes' order."""
    failed: dict[str, str] = field(default_factory=dict)
    """Nodes whose push failed, and why (backed off)."""
    refusals_changed: bool = False
    """A node's refusals changed (an event says so): a rollout waiting on it judges that
    in the next pass, at once."""


async def record(tx: DesiredTx, outcomes: Sequence[Outcome], now_ms: int) -> Recorded:
    """Record push outcomes in `tx` at `now_ms`: delivered versions, refusals, backoffs,
    and the agents an answer carried, stored as a SyncAgentStates is (`replace_many`)."""
    done = Recorded()
    answers = done.answers
    targets = [o.node_id for o in outcomes]
    rows = await tx.node_desired(targets)
    # Only a node that already reported the pushed version may hold a newer snapshot
    # than its answer (see below); in a rollout none has, and this reads nothing.
    newer = [
        o.node_id
        for o in outcomes
        if o.states is not None
        and not o.error
        and o.node_id in rows
        and rows[o.node_id].reported_version >= o.version
    ]
    since: dict[str, int] = {}  # when each node's agents were last stored
    if newer:
        for st in await tx.agent_states(node_ids=newer):
            since[st.node_id] = max(since.get(st.node_id, 0), st.reported_ms)
    updated = []
    snapshots: list[tuple[str, list[AgentStateRecord]]] = []
    for o in outcomes:
        node_id, version, refused, error = o.node_id, o.version, o.refused, o.error
        row = rows.get(node_id)
        if row is None:
            continue
        states = o.states
        if (
            states is not None
            and since.get(node_id, 0) >= o.sent_ms
            and row.reported_version >= version
        ):
            # A report sent after the daemon took this version was stored since the
            # push went out: it is as new as the answer or newer (a report from
            # during the apply is followed by one from after it).
            states = None
        if states is not None:
            # Stored even if a newer set was decided since (the step judged on this
            # answer moved the node again): the daemon does not send them again.
            snapshots.append((node_id, states))
        if row.version != version:
            continue  # a newer set was decided meanwhile: the next pass pushes it
        if error and row.updated_ms != o.set_ms:
            continue  # its daemon came back meanwhile (backoff reset): retry now
        if error:
            attempts = row.push_attempts + 1
            updated.append(
                dataclasses.replace(
                    row,
                    push_error=error,
                    push_attempts=attempts,
                    next_push_ms=now_ms + int(push_backoff(attempts) * 1000),
                    updated_ms=now_ms,
                )
            )
            done.failed[node_id] = error
            continue
        # The answer is the daemon's report: it runs `version` now (a push that
        # changes no agent brings no sync), and it lists every refusal it still
        # holds (a no-op push too), so none means a refusal was resolved.
        updated.append(
            dataclasses.replace(
                row,
                delivered_version=version,
                reported_version=max(row.reported_version, version),
                push_error="",
                push_attempts=0,
                next_push_ms=0,
                update_errors=refused,
                updated_ms=now_ms,
            )
        )
        if refused != row.update_errors:
            update_errors_event(tx, node_id, refused, now_ms)
            done.refusals_changed = True
        done.pushed.append(node_id)
        answers[node_id] = (refused, states)
    await tx.put_node_desired(updated)
    if snapshots:
        counts = await tx.replace_agents(snapshots, now_ms=now_ms)
        for (node_id, _), count in zip(snapshots, counts, strict=True):
            if count is None and node_id in answers:  # removed: nothing of it stored
                answers[node_id] = (answers[node_id][0], None)
    return done


class Pusher:
    """Pushes node sets through the pool, at most `concurrency` at once, each asking for
    the node's agents in its answer. It records nothing (`record` does, in the driver's
    transaction) and shares no state with the driver."""

    def __init__(
        self,
        pool: DaemonPool,
        *,
        clock: Callable[[], float],
        concurrency: int,
        timeout: float | None,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._sem = asyncio.Semaphore(concurrency)
        self._timeout = timeout

    async def send(
        self,
        sets: Mapping[str, tuple[int, list[common_pb2.AgentSpec], int]],
        nodes: Mapping[str, NodeRecord],
    ) -> list[Outcome]:
        """Push each online node its set (nothing recorded: `record` does that)."""
        targets = sorted(n for n in sets if n in nodes and nodes[n].status == "online")
        if not targets:
            return []
        sent_ms = int(self._clock() * 1000)
        return list(
            await asyncio.gather(
                *(
                    self._push_one(nodes[n], sets[n][0], sets[n][1], sets[n][2], sent_ms)
                    for n in targets
                )
            )
        )

    async def _push_one(
        self,
        node: NodeRecord,
        version: int,
        specs: list[common_pb2.AgentSpec],
        set_ms: int,
        sent_ms: int,
    ) -> Outcome:
        out = Outcome(node.node_id, version, set_ms, sent_ms)
        async with self._sem:
            try:
                reply = await self._pool.push_update(
                    node.node_id,
                    node.daemon_address,
                    version,
                    specs,
                    want_agent_states=True,
                    call_timeout=self._timeout,
                )
            except FailedPrecondition as exc:
                # The daemon holds this version or a newer one; its next report says which.
                out.error = f"refused: {exc.message}"
                return out
            except FleetError as exc:
                out.error = exc.message
                return out
        out.refused = tuple(
            UpdateErrorRecord(r.agent_id, r.revision, r.reason) for r in reply.refused
        )
        out.states = carried_states(
            node.node_id, version, reply, received_ms=int(self._clock() * 1000)
        )
        return out
