"""Desired-state decisions that are plain functions of plain values and `now`.

- `assignment_changes`: which (node, definition) assignments to add or drop
  when nodes start or stop matching (placement included); rollouts move the
  revisions of existing assignments, not this.
- `observe`: what a rollout sees of one node (online, assigned and running
  revision, healthy since when, an error, a push that has not reached it),
  from the stored agent state and node row (`undelivered`).
- `node_set`: a node's managed set (the specs to push) and its content hash.
- `next_version`: the version to push a node's set with.
- `drift`: whether a node runs what it should, in words.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from fleet.v1 import common_pb2
from manager.service.rollout import Observation
from manager.storage.records import (
    AgentStateRecord,
    AssignmentRecord,
    NodeDesiredRecord,
    NodeRecord,
    UpdateErrorRecord,
)

__all__ = [
    "AssignmentChanges",
    "assignment_changes",
    "drift",
    "next_version",
    "node_set",
    "observe",
    "push_backoff",
    "push_retry_at",
    "undelivered",
]


@dataclass(frozen=True)
class AssignmentChanges:
    """Assignments to create and to drop."""

    add: tuple[AssignmentRecord, ...] = ()
    """New (node, definition) pairs, at the revision a newcomer gets."""
    drop: tuple[tuple[str, str], ...] = ()
    """(node, definition) pairs out of scope, or of deleted definitions."""


def assignment_changes(
    scopes: Mapping[str, Collection[str]],
    newcomer_revision: Mapping[str, int],
    current: Sequence[AssignmentRecord],
    now_ms: int,
) -> AssignmentChanges:
    """Add nodes that came into a definition's scope, drop those that left it.

    `scopes` has every live definition's nodes; assignments of any other
    definition (deleted) are dropped. A newcomer gets `newcomer_revision`
    (the definition's stable revision); 0 means none yet: the definition's
    first rollout moves it when its batch comes.
    """
    have: dict[str, set[str]] = {}
    drop = []
    for a in current:
        if a.name not in scopes or a.node_id not in scopes[a.name]:
            drop.append((a.node_id, a.name))
        else:
            have.setdefault(a.name, set()).add(a.node_id)
    add = []
    for name in sorted(scopes):
        revision = newcomer_revision.get(name, 0)
        if not revision:
            continue
        for node_id in sorted(set(scopes[name]) - have.get(name, set())):
            add.append(AssignmentRecord(node_id, name, revision, now_ms))
    return AssignmentChanges(tuple(add), tuple(sorted(drop)))


_NO_CHECK = frozenset({"", "UNSPECIFIED", "NONE"})


def observe(
    node: NodeRecord,
    assignment: AssignmentRecord | None,
    agent: AgentStateRecord | None,
    errors: Sequence[UpdateErrorRecord],
    not_delivered: str = "",
) -> Observation:
    """A rollout's view of one node's agent (times in seconds).

    Healthy means RUNNING the revision it reports and passing its health
    check: since its health last changed to HEALTHY, or, without a check,
    since its process started (RUNNING already means it outlived start_secs).
    A daemon's update error for the assigned revision, or the agent FATAL on
    it, is an error the rollout fails the node for. `not_delivered` is the
    node row's `undelivered`: the rollout waits for it rather than judge.
    """
    assigned = assignment.revision if assignment is not None else 0
    name = assignment.name if assignment is not None else (agent.agent_id if agent else "")
    error = next(
        (e.reason for e in errors if e.agent_id == name and e.revision in (assigned, 0)), ""
    )
    if agent is None:
        return Observation(
            node.status == "online", assigned, 0, None, error, "not reported yet", not_delivered
        )
    healthy_since: float | None = None
    if agent.status == "RUNNING":
        if agent.health in _NO_CHECK:
            healthy_since = agent.start_time_ms / 1000
        elif agent.health == "HEALTHY":
            healthy_since = max(agent.health_since_ms, agent.start_time_ms) / 1000
    why = agent.health_message if agent.health == "UNHEALTHY" else agent.last_exit_reason
    detail = agent.status + (f": {why}" if why else "")
    if not error and agent.status == "FATAL" and agent.revision == assigned and assigned:
        error = f"FATAL: {agent.last_exit_reason or agent.message}"
    return Observation(
        online=node.status == "online",
        assigned=assigned,
        running=agent.revision,
        healthy_since=healthy_since,
        error=error,
        detail=detail,
        undelivered=not_delivered,
    )


def node_set(specs: Sequence[common_pb2.AgentSpec]) -> tuple[list[common_pb2.AgentSpec], str]:
    """The specs in push order (by id) and the sha256 of their deterministic encoding."""
    ordered = sorted(specs, key=lambda s: s.id)
    digest = hashlib.sha256()
    for spec in ordered:
        blob = spec.SerializeToString(deterministic=True)
        digest.update(len(blob).to_bytes(8, "big"))
        digest.update(blob)
    return ordered, digest.hexdigest()


EMPTY_SET_HASH = node_set([])[1]
"""The content hash of a node with no managed agent (what a node without a row has)."""


def undelivered(row: NodeDesiredRecord) -> str:
    """Why the node's current set has not reached it: the last push's error; "" when it
    was delivered, its daemon reports running it (the answer was lost), or its first
    push is still in flight."""
    if row.delivered_version < row.version and row.reported_version < row.version:
        return row.push_error
    return ""


def next_version(row: NodeDesiredRecord) -> int:
    """A version above anything the node was pushed or reports running."""
    return max(row.version, row.delivered_version, row.reported_version) + 1


PUSH_BACKOFF_MAX = 60.0
"""The longest wait before retrying a failed push, in seconds."""


def push_backoff(
    attempts: int, *, initial: float = 1.0, maximum: float = PUSH_BACKOFF_MAX
) -> float:
    """Seconds before retrying a push that failed `attempts` times in a row."""
    return float(min(maximum, initial * 2 ** max(0, attempts - 1)))


def push_retry_at(next_push_ms: int, now_ms: int) -> int:
    """When a backed-off push is due, from its stored retry time (wall clock, ms).

    No backoff is longer than `PUSH_BACKOFF_MAX`: a retry time further ahead was set
    before the wall clock stepped back, and is due now, not when the clock catches up
    (a -10 min step held the retry to an unreachable node ten minutes)."""
    if next_push_ms > now_ms + PUSH_BACKOFF_MAX * 1000:
        return now_ms
    return next_push_ms


def drift(
    row: NodeDesiredRecord | None,
    assigned: Sequence[AssignmentRecord],
    agents: Mapping[str, AgentStateRecord],
) -> str:
    """Why a node does not run what it should ("" if it does)."""
    if row is None:
        return ""
    if row.update_errors:
        first = row.update_errors[0]
        more = f" (and {len(row.update_errors) - 1} more)" if len(row.update_errors) > 1 else ""
        return f"{first.agent_id}: {first.reason}{more}"
    if row.version and row.reported_version != row.version:
        if row.push_error:
            return f"version {row.version} not delivered: {row.push_error}"
        return f"runs version {row.reported_version}, should run {row.version}"
    for a in assigned:
        agent = agents.get(a.name)
        if agent is None:
            return f"{a.name}: not running yet (revision {a.revision})"
        if agent.revision != a.revision:
            return f"{a.name} runs revision {agent.revision}, assigned {a.revision}"
    return ""
