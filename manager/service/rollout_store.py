"""How a rollout step is stored and what a rollout observes of its nodes.

The storage side of `rollout.step` (pure), shared by the convergence driver
(`convergence`) and the operators' rollout actions (`rollout_control`):
`persist_step` writes a step (its row, node records, the assignments it moves,
its events) in the caller's transaction; `observations` reads what a rollout
sees of each node of its scope; `progress_of` turns a stored node record into
the pure decisions' `NodeProgress`. A full pass reads every assignment and node
row once (`PassReads`) for its steps and its node sets.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from manager.service import rollout as ro
from manager.service.desired import observe, undelivered
from manager.storage import NodeRecord
from manager.storage.desired import DesiredTx
from manager.storage.records import (
    AgentStateRecord,
    AssignmentRecord,
    NodeDesiredRecord,
    RolloutNodeRecord,
    RolloutRecord,
    UpdateErrorRecord,
)

__all__ = [
    "Inputs",
    "PassReads",
    "note_kind",
    "observation_inputs",
    "observations",
    "persist_step",
    "progress_of",
]


def note_kind(kind: str) -> str:
    """A rollout note's kind as an event kind: rollout-batch -> ROLLOUT_BATCH."""
    return kind.upper().replace("-", "_")


Inputs = tuple[
    NodeRecord,
    AssignmentRecord | None,
    AgentStateRecord | None,
    tuple[UpdateErrorRecord, ...],
    str,
]
"""`desired.observe`'s arguments for one node: the node, its assignment, its agent (only
with the columns `observe` reads when it comes from `DesiredTx.judged_agents`), its row's
update errors and why its set is not delivered (`desired.undelivered`)."""


async def observations(
    tx: DesiredTx,
    name: str,
    scope: Sequence[str],
    nodes: Mapping[str, NodeRecord],
) -> dict[str, ro.Observation]:
    """What a rollout of `name` sees of each node of its scope (and of each node still
    assigned to it)."""
    inputs = await observation_inputs(tx, name, scope, nodes)
    return {n: observe(*i) for n, i in inputs.items()}


async def observation_inputs(
    tx: DesiredTx,
    name: str,
    scope: Sequence[str],
    nodes: Mapping[str, NodeRecord],
    reads: PassReads | None = None,
) -> dict[str, Inputs]:
    if reads is None:
        assigned = {a.node_id: a for a in await tx.assignments(names=[name])}
    else:
        assigned = {n: a for (n, a_name), a in reads.assigned.items() if a_name == name}
    wanted = sorted((set(scope) | set(assigned)) & set(nodes))
    if reads is None:  # only rows with errors or an undelivered push (nearly none)
        rows = await tx.observed_rows(wanted)
    else:
        rows = reads.desired
    states = {s.node_id: s for s in await tx.judged_agents(wanted, name)}
    out: dict[str, Inputs] = {}
    for n in wanted:
        row = rows.get(n)
        errors, why = (row.update_errors, undelivered(row)) if row else ((), "")
        out[n] = (nodes[n], assigned.get(n), states.get(n), errors, why)
    return out


async def persist_step(
    tx: DesiredTx, record: RolloutRecord, step: ro.Step, now_ms: int
) -> RolloutRecord:
    """Store a rollout step: its record, node records, the assignments it moves, its
    events; a success makes the target the definition's stable revision. Returns the
    rollout's row as stored."""
    after = step.rollout
    ended = after.state in ro.TERMINAL
    stored = dataclasses.replace(
        record,
        target=after.target,
        previous=after.previous,
        state=after.state.value,
        record=json.dumps(ro.to_dict(after)),
        updated_ms=now_ms,
        ended_ms=now_ms if ended else 0,
    )
    await tx.update_rollout(stored)
    await tx.put_rollout_nodes(
        [
            RolloutNodeRecord(
                rollout_id=record.id,
                node_id=n,
                phase=p.phase.value,
                batch=p.batch,
                since_ms=int(p.since * 1000),
                offline=p.offline,
                reason=p.reason,
            )
            for n, p in sorted(step.nodes.items())
        ]
    )
    await tx.set_assignments(
        [AssignmentRecord(n, record.name, after.target, now_ms) for n in step.assign]
    )
    if after.state is ro.RolloutState.SUCCESSFUL:
        head = (await tx.definitions([record.name], for_update=True)).get(record.name)
        if head is not None:
            await tx.put_definition(dataclasses.replace(head, stable_revision=after.target))
    for note in step.notes:
        tx.event(
            note_kind(note.kind),
            now_ms=now_ms,
            actor="manager",
            node_id=note.node_id,
            agent_id=record.name if note.node_id else "",
            message=note.message,
            attributes={**note.attributes, "name": record.name, "rollout_id": str(record.id)},
        )
    return stored


@dataclass
class PassReads:
    """Every assignment and node row, read once by a full pass's transaction for its
    rollout steps and its node sets, and kept as that transaction changes them."""

    assigned: dict[tuple[str, str], AssignmentRecord]
    """By (node, definition)."""
    desired: dict[str, NodeDesiredRecord]

    @classmethod
    async def load(cls, tx: DesiredTx) -> PassReads:
        assigned = {(a.node_id, a.name): a for a in await tx.assignments()}
        return cls(assigned, await tx.node_desired())

    def assign(self, node_ids: Iterable[str], name: str, revision: int, now_ms: int) -> None:
        """A step moved these nodes to `revision` (as `persist_step` stored it)."""
        for n in node_ids:
            self.assigned[n, name] = AssignmentRecord(n, name, revision, now_ms)

    def assignments(self) -> list[AssignmentRecord]:
        """As `DesiredTx.assignments()` reads them: by (node, name)."""
        return [self.assigned[k] for k in sorted(self.assigned)]


def progress_of(record: RolloutNodeRecord) -> ro.NodeProgress:
    """A stored node record as the pure decisions' NodeProgress."""
    return ro.NodeProgress(
        phase=ro.NodePhase(record.phase),
        batch=record.batch,
        since=record.since_ms / 1000,
        offline=record.offline,
        reason=record.reason,
    )
