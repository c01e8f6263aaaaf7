"""Definitions: what runs where. Validate, apply (or plan), history, delete, undo.

A definition is stored as the `Definition` message in canonical JSON, one
row per revision; applying an identical definition stores nothing. Applying
a changed one stores revision N+1 and starts its rollout (cancelling a live
one of an older revision), all in one transaction with its audit entry and
events, for every definition of the request or none. What the rollout then
does, node by node, is `convergence`'s job.

Validation is host-independent (`fleet.agentspec`): a program or a user that
exists only on some hosts is for those hosts' daemons to refuse.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from google.protobuf import json_format

from fleet import selectors
from fleet.agentspec import AgentSpec, spec_from_proto
from fleet.errors import FailedPrecondition, InvalidArgument, NotFound
from fleet.labels import LabelError, validate_label_key, validate_label_value
from fleet.v1 import common_pb2, desired_pb2
from manager.service import rollout as ro
from manager.service.placement import (
    Candidate,
    PlacementRequest,
    Resources,
    place,
    reservations,
)
from manager.storage import NodeRecord, NodeRepository
from manager.storage.desired import DesiredStateRepository, DesiredTx
from manager.storage.records import (
    AssignmentRecord,
    DefinitionRecord,
    NodeDesiredRecord,
    RevisionRecord,
    RolloutRecord,
)

__all__ = [
    "ArtifactResolver",
    "ArtifactUse",
    "CandidateSource",
    "Change",
    "CheckedDefinition",
    "DefinitionState",
    "Definitions",
    "NoArtifacts",
    "NodeChange",
    "check_definition",
    "load_definition",
    "pushed_spec",
    "scope_of",
    "without_metrics",
]

MAX_DEFINITIONS_PER_APPLY = 100
"""Definitions one ApplyDefinitions may carry."""
DEFAULT_RESCHEDULE_AFTER = 300.0
"""Seconds a node may be offline before a `count` instance is placed elsewhere."""


# --- the definition itself (pure) ---------------------------------------------------------


@dataclass(frozen=True)
class CheckedDefinition:
    """A validated definition and what the manager derives from it."""

    name: str
    """Unique in the fleet; the agent's id on each node."""
    message: desired_pb2.Definition
    """The canonical message (agent.id = name)."""
    body: str
    """`message` as canonical JSON (what is stored)."""
    content_hash: str
    """sha256 of `body`: an identical re-apply changes nothing."""
    spec: AgentSpec
    """The agent spec (host-independent checks passed)."""
    selector: selectors.Selector
    """Which nodes (by effective labels)."""
    policy: ro.UpdatePolicy
    """How revisions roll out."""
    count: int
    """Instances by placement; 0: every matching node."""
    spread: str
    """Spread label for placement."""
    reschedule_after: float
    """Seconds offline before an instance moves."""
    requests: Resources
    """The agent's resource requests (placement)."""


def canonical_json(message: desired_pb2.Definition) -> str:
    """The stored form: proto JSON with sorted keys, no whitespace to differ on."""
    as_dict = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return json.dumps(as_dict, sort_keys=True, separators=(",", ":"))


def load_definition(body: str) -> desired_pb2.Definition:
    """The message of a stored revision."""
    return json_format.Parse(body, desired_pb2.Definition())


def _where(name: str, index: int) -> str:
    return f"definitions[{name}]" if name else f"definitions[{index}]"


def _seconds(value: float, default: float, field: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"must be a finite number of seconds >= 0, got {value}", field=field)
    return value if value else default


def policy_of(msg: desired_pb2.UpdatePolicy, where: str) -> ro.UpdatePolicy:
    """The rollout policy of a definition's `update`; InvalidArgument naming the field."""
    base = ro.UpdatePolicy()
    try:
        max_parallel = (
            ro.Amount.parse(msg.max_parallel, what=f"{where}.update.max_parallel")
            if msg.max_parallel
            else base.max_parallel
        )
        canary = (
            ro.Amount.parse(msg.canary, what=f"{where}.update.canary")
            if msg.canary
            else base.canary
        )
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None

    def opt(name: str, default: float) -> float:
        if not msg.HasField(name):  # type: ignore[arg-type]  # one of the optional fields below
            return default
        value = float(getattr(msg, name))
        if not math.isfinite(value) or value < 0:
            raise InvalidArgument(
                f"must be a finite number of seconds >= 0, got {value}",
                field=f"{where}.update.{name}",
            )
        return value

    policy = ro.UpdatePolicy(
        max_parallel=max_parallel,
        canary=canary,
        auto_promote=msg.auto_promote,
        min_healthy_time=opt("min_healthy_time_seconds", base.min_healthy_time),
        healthy_deadline=opt("healthy_deadline_seconds", base.healthy_deadline),
        progress_deadline=opt("progress_deadline_seconds", base.progress_deadline),
        auto_revert=msg.auto_revert,
        pause_between_batches=opt("pause_between_batches_seconds", base.pause_between_batches),
    )
    for field, problem in policy.problems():
        raise InvalidArgument(problem, field=f"{where}.update.{field}")
    return policy


def check_definition(msg: desired_pb2.Definition, *, index: int = 0) -> CheckedDefinition:
    """Validate one definition; InvalidArgument naming `definitions[name].field`."""
    where = _where(msg.name, index)
    if not msg.name:
        raise InvalidArgument("is required", field=f"{where}.name")
    try:
        validate_label_value(msg.name)
    except LabelError as exc:
        raise InvalidArgument(exc.message.split(": ", 1)[-1], field=f"{where}.name") from None
    if msg.agent.id and msg.agent.id != msg.name:
        raise InvalidArgument(
            f"must be empty or the definition's name {msg.name!r}, got {msg.agent.id!r}",
            field=f"{where}.agent.id",
        )
    canonical = desired_pb2.Definition()
    canonical.CopyFrom(msg)
    canonical.agent.id = msg.name
    canonical.agent.revision = 0  # the manager numbers revisions, not the operator
    selector = selectors.from_proto(msg.selector, field=f"{where}.selector")
    spec = _spec(canonical.agent, where)
    policy = policy_of(msg.update, where)
    placement = msg.placement
    if placement.count < 0:
        raise InvalidArgument(
            f"must be >= 0, got {placement.count}", field=f"{where}.placement.count"
        )
    if placement.spread:
        try:
            validate_label_key(placement.spread)
        except LabelError as exc:
            raise InvalidArgument(
                exc.message.split(": ", 1)[-1], field=f"{where}.placement.spread"
            ) from None
        if not placement.count:
            raise InvalidArgument(
                "spread needs a count (placement by count)", field=f"{where}.placement.spread"
            )
    reschedule = (
        _seconds(
            placement.reschedule_after_seconds,
            DEFAULT_RESCHEDULE_AFTER,
            f"{where}.placement.reschedule_after_seconds",
        )
        if placement.HasField("reschedule_after_seconds")
        else DEFAULT_RESCHEDULE_AFTER
    )
    res = canonical.agent.resources
    if res.cpu_millicores < 0 or res.memory_bytes < 0:
        raise InvalidArgument("requests must be >= 0", field=f"{where}.agent.resources")
    art = canonical.agent.artifact if canonical.agent.HasField("artifact") else msg.artifact
    if msg.HasField("artifact") or canonical.agent.HasField("artifact"):
        if not (art.digest or (art.name and art.version)):
            raise InvalidArgument(
                "name and version, or digest, are required", field=f"{where}.artifact"
            )
        canonical.artifact.CopyFrom(art)
        canonical.agent.ClearField("artifact")
    body = canonical_json(canonical)
    return CheckedDefinition(
        name=msg.name,
        message=canonical,
        body=body,
        content_hash=hashlib.sha256(body.encode()).hexdigest(),
        spec=spec,
        selector=selector,
        policy=policy,
        count=placement.count,
        spread=placement.spread,
        reschedule_after=reschedule,
        requests=Resources(res.cpu_millicores, res.memory_bytes),
    )


def _spec(agent: common_pb2.AgentSpec, where: str) -> AgentSpec:
    """The agent spec, host-independent checks only; errors name `where.agent.field`."""
    try:
        spec = spec_from_proto(agent, where=f"{where}.agent")
        spec.validate()
    except InvalidArgument as exc:
        field = exc.field or ""
        message = exc.message.removeprefix(f"{field}: ") if field else exc.message
        prefix = f"agents[{agent.id}]"
        if field.startswith(prefix):
            field = f"{where}.agent{field[len(prefix) :]}"
        raise InvalidArgument(message, field=field or f"{where}.agent") from None
    return spec


def pushed_spec(definition: desired_pb2.Definition, revision: int) -> common_pb2.AgentSpec:
    """The AgentSpec a node is pushed for one revision: id = name, its revision, its artifact."""
    spec = common_pb2.AgentSpec()
    spec.CopyFrom(definition.agent)
    spec.id = definition.name
    spec.revision = revision
    if definition.HasField("artifact"):
        spec.artifact.CopyFrom(definition.artifact)
    return spec


CandidateSource = Callable[[Sequence[NodeRecord]], Awaitable[Sequence[Candidate]]]
"""Placement candidates for nodes, with their room (manager.service.capacity.HostCapacity)."""


def scope_of(
    checked: CheckedDefinition,
    nodes: Sequence[NodeRecord],
    current: Collection[str],
    candidates: Mapping[str, Candidate],
    now: float,
    reserved: Mapping[str, Resources] | None = None,
) -> tuple[list[str], str]:
    """The nodes the definition runs on now, and why instances were not placed ("" if all were).

    Every matching node (effective labels), or, with a count, the placement's choice
    among them (keeping the `current` ones where it can). `candidates` has every
    node's room by id (a node missing has none known); `reserved` the requests of
    the other definitions' instances on each node.
    """
    matching = [n for n in nodes if checked.selector.matches(n.labels)]
    if not checked.count:
        return sorted(n.node_id for n in matching), ""
    held = reserved or {}
    result = place(
        PlacementRequest(
            count=checked.count,
            requests=checked.requests,
            spread=checked.spread,
            reschedule_after=checked.reschedule_after,
        ),
        [
            dataclasses.replace(
                candidates.get(n.node_id) or without_metrics([n])[0],
                reserved=held.get(n.node_id, Resources()),
            )
            for n in matching
        ],
        current,
        now,
    )
    return list(result.nodes), result.reason


# --- artifacts ------------------------------------------------------------------------------


class ArtifactResolver(Protocol):
    """Turns a definition's artifact reference into the stored artifact's name, version,
    digest and size, or refuses it (InvalidArgument naming `field`)."""

    async def resolve(self, ref: common_pb2.ArtifactRef, *, field: str) -> common_pb2.ArtifactRef:
        """The complete reference of a stored artifact."""
        ...


class NoArtifacts:
    """A manager without an artifact store: every artifact reference is refused."""

    async def resolve(self, ref: common_pb2.ArtifactRef, *, field: str) -> common_pb2.ArtifactRef:
        """Always InvalidArgument."""
        what = ref.digest or f"{ref.name} {ref.version}"
        raise InvalidArgument(f"artifact {what} does not exist on this manager", field=field)


class ArtifactUse:
    """Which artifacts the definitions use: who may download one, and who references it.

    A node may download an artifact a definition assigned to it uses (at the
    revision assigned, so a rollback's old artifact too); an artifact is
    referenced while a live definition's current or stable revision uses it.
    """

    def __init__(self, repo: DesiredStateRepository) -> None:
        self._repo = repo

    async def may_download(self, node_id: str, digest: str) -> bool:
        """True if a definition assigned to `node_id` uses the content `digest`."""

        async def body(tx: DesiredTx) -> bool:
            assigned = await tx.assignments(node_ids=[node_id])
            records = await tx.revisions_of({(a.name, a.revision) for a in assigned})
            return any(_artifact_of(r).digest == digest for r in records.values())

        return await self._repo.run(body, write=False)

    async def references(self, name: str, version: str) -> list[str]:
        """The definitions ("web@4") whose current or stable revision uses `name` `version`."""

        async def body(tx: DesiredTx) -> list[str]:
            heads = [h for h in (await tx.definitions()).values() if not h.deleted_ms]
            pairs = {(h.name, r) for h in heads for r in (h.revision, h.stable_revision) if r}
            records = await tx.revisions_of(pairs)
            return sorted(
                f"{n}@{r}"
                for (n, r), record in records.items()
                if (a := _artifact_of(record)).name == name and a.version == version
            )

        return await self._repo.run(body, write=False)


def _artifact_of(record: RevisionRecord) -> common_pb2.ArtifactRef:
    if record.deleted:
        return common_pb2.ArtifactRef()
    return load_definition(record.body).artifact


# --- the service ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DefinitionState:
    """A definition and how far the fleet is with it."""

    head: DefinitionRecord
    """Its current and stable revisions."""
    current: RevisionRecord
    """The current revision."""
    nodes: int = 0
    """Nodes it is assigned to."""
    nodes_current: int = 0
    """Nodes that run the current revision, RUNNING and healthy."""
    nodes_failed: int = 0
    """Nodes whose daemon reports an error applying it."""
    rollout: RolloutRecord | None = None
    """Its latest rollout."""
    rollout_counts: Mapping[str, int] | None = None
    """That rollout's nodes per phase, and offline."""
    unplaced: int = 0
    """Instances placement could not place."""
    unplaced_reason: str = ""
    """Why."""


@dataclass(frozen=True)
class NodeChange:
    """What applying (or deleting) a definition does to one node."""

    node_id: str
    """The node."""
    action: str
    """add, restart, reconfigure, remove, unchanged or refused."""
    reason: str = ""
    """A note ("offline: converges when it returns") or why it is refused."""


@dataclass(frozen=True)
class Change:
    """The outcome (or forecast) of applying one definition."""

    name: str
    """The definition."""
    revision: int
    """Stored (or would be), or the current one when unchanged."""
    previous_revision: int
    """What the fleet ran before (0: new)."""
    changed: bool
    """False when identical to the current revision."""
    summary: str
    """One line for people."""
    nodes: tuple[NodeChange, ...] = ()
    """Per node."""
    batches: tuple[tuple[int, tuple[str, ...]], ...] = ()
    """The rollout's batches in order, numbered (0 is the canary batch)."""
    rollout_id: int = 0
    """The rollout started (0 with plan or when unchanged)."""


@dataclass(frozen=True)
class _Draft:
    """One definition of an apply, decided but not yet stored."""

    checked: CheckedDefinition
    head: DefinitionRecord | None
    revision: int


def _live(head: DefinitionRecord | None) -> bool:
    return head is not None and head.deleted_ms == 0


class Definitions:
    """Apply, plan, delete, undo and read definitions (see the module docstring)."""

    def __init__(
        self,
        repo: DesiredStateRepository,
        nodes: NodeRepository,
        *,
        artifacts: ArtifactResolver | None = None,
        candidates: CandidateSource | None = None,
        clock: Callable[[], float],
        on_change: Callable[[], None] = lambda: None,
        on_apply: Callable[[], None] | None = None,
    ) -> None:
        """`on_change`: desired state changed (a delete, an undo); `on_apply`: an apply
        stored new revisions and started their rollouts (`on_change` if not given)."""
        self._repo = repo
        self._nodes = nodes
        self._artifacts = artifacts or NoArtifacts()
        self._candidates = candidates
        self._clock = clock
        self._on_change = on_change
        self._on_apply = on_apply or on_change

    # --- writes -------------------------------------------------------------------------------

    async def apply(
        self,
        messages: Sequence[desired_pb2.Definition],
        *,
        expected: Mapping[str, int],
        message: str,
        plan: bool,
        actor: str,
    ) -> list[Change]:
        """Store a new revision of each definition that changed and start its rollout.

        All or nothing. `expected` (name -> revision, 0 = must not exist)
        makes a definition that moved on meanwhile FAILED_PRECONDITION.
        """
        checked = await self._check_all(messages, expected, message)
        # A count definition's placement needs the nodes' room (a query of its own):
        # the nodes are read first. Otherwise the transaction reads them, and on SQLite
        # runs in one hop to aiosqlite's thread (`run_in_one_hop`): the apply is at the
        # front of every rollout.
        listed = await self._nodes.list() if any(c.count for c in checked) else None
        room = await self._room(listed) if listed is not None else {}
        now_ms = int(self._clock() * 1000)

        async def body(tx: DesiredTx) -> list[Change]:
            nodes = listed if listed is not None else await tx.all_nodes()
            heads = await tx.definitions([c.name for c in checked], for_update=not plan)
            drafts = []
            for c in checked:
                head = heads.get(c.name)
                _check_expected(c.name, head, expected, await self._head_revision(tx, head))
                current = await self._current(tx, head)
                if current is not None and _live(head) and current.content_hash == c.content_hash:
                    drafts.append(_Draft(c, head, 0))
                else:
                    drafts.append(_Draft(c, head, (head.revision if head else 0) + 1))
            changes = [await self._forecast(tx, d, nodes, room) for d in drafts]
            if plan:
                return changes
            stored = []
            for draft, change in zip(drafts, changes, strict=True):
                if draft.revision == 0:
                    stored.append(change)
                    continue
                rollout_id = await self._store(
                    tx, draft, actor=actor, message=message, now_ms=now_ms
                )
                stored.append(dataclasses.replace(change, rollout_id=rollout_id))
            tx.audit(
                actor=actor,
                action="definitions.apply",
                target=",".join(c.name for c in checked),
                detail={
                    "revisions": ",".join(f"{c.name}@{c.revision}" for c in stored),
                    "message": message,
                },
                outcome="ok" if any(c.changed for c in stored) else "unchanged",
                now_ms=now_ms,
            )
            return stored

        result = await self._repo.run_in_one_hop(body, write=not plan)
        if not plan and any(c.changed for c in result):
            self._on_apply()
        return result

    async def delete(self, name: str, *, message: str, plan: bool, actor: str) -> Change:
        """Remove a definition's agent from every node; its history is kept."""
        _check_name(name)
        _check_message(message)
        now_ms = int(self._clock() * 1000)

        async def body(tx: DesiredTx) -> Change:
            head = (await tx.definitions([name], for_update=not plan)).get(name)
            if not _live(head):
                raise NotFound(f"definition {name!r} does not exist")
            assert head is not None
            current = await tx.assignments(names=[name])
            change = Change(
                name=name,
                revision=head.revision + 1,
                previous_revision=head.revision,
                changed=True,
                summary=f"delete {name}: remove its agent from {len(current)} node(s)",
                nodes=tuple(NodeChange(a.node_id, "remove") for a in current),
            )
            if plan:
                return change
            last = await tx.revision(name, head.revision)
            assert last is not None
            await tx.add_revision(
                dataclasses.replace(
                    last,
                    revision=head.revision + 1,
                    actor=actor,
                    message=message,
                    created_ms=now_ms,
                    deleted=True,
                )
            )
            await tx.put_definition(
                dataclasses.replace(
                    head, revision=head.revision + 1, deleted_ms=now_ms, updated_ms=now_ms
                )
            )
            await self._cancel_live(tx, name, head.revision + 1, now_ms, reason="deleted")
            tx.event(
                "DEFINITION_DELETED",
                now_ms=now_ms,
                actor=actor,
                message=f"{actor} deleted definition {name}" + (f": {message}" if message else ""),
                attributes={"name": name, "revision": str(head.revision + 1)},
            )
            tx.audit(
                actor=actor,
                action="definitions.delete",
                target=name,
                detail={"message": message},
                outcome="ok",
                now_ms=now_ms,
            )
            return change

        result = await self._repo.run(body, write=not plan)
        if not plan:
            self._on_change()
        return result

    async def undo(
        self, name: str, *, to_revision: int, message: str, plan: bool, actor: str
    ) -> Change:
        """Apply the content of an earlier revision as a new revision (and roll it out)."""
        _check_name(name)
        _check_message(message)
        if to_revision < 0:
            raise InvalidArgument(f"must be >= 0, got {to_revision}", field="to_revision")

        async def find(tx: DesiredTx) -> tuple[int, str]:
            head = (await tx.definitions([name])).get(name)
            if not _live(head):
                raise NotFound(f"definition {name!r} does not exist")
            assert head is not None
            target = to_revision or await self._last_good_before(tx, head)
            record = await tx.revision(name, target)
            if record is None or record.deleted:
                raise NotFound(f"definition {name!r} has no revision {target}")
            return target, record.body

        target, body = await self._repo.run(find, write=False)
        why = f"undo to revision {target}" + (f": {message}" if message else "")
        (change,) = await self.apply(
            [load_definition(body)], expected={}, message=why, plan=plan, actor=actor
        )
        if not change.changed:
            return dataclasses.replace(
                change,
                summary=f"{name} already runs the content of revision {target}: nothing changed",
            )
        return change

    # --- reads --------------------------------------------------------------------------------

    async def states(
        self, *, names: Collection[str] | None = None, include_deleted: bool = False
    ) -> list[DefinitionState]:
        """Definitions (all, or those named) with their progress, by name."""
        nodes = await self._nodes.list()
        online = {n.node_id for n in nodes if n.status == "online"}
        room = await self._room(nodes)
        now = self._clock()

        async def body(tx: DesiredTx) -> list[DefinitionState]:
            placed: tuple[list[tuple[str, str]], dict[str, Resources]] | None = None
            heads = await tx.definitions(names)
            wanted = {n: h for n, h in heads.items() if include_deleted or h.deleted_ms == 0}
            current = await tx.revisions_of({(n, h.revision) for n, h in wanted.items()})
            assigned: dict[str, list[AssignmentRecord]] = {}
            for a in await tx.assignments(names=list(wanted)):
                assigned.setdefault(a.name, []).append(a)
            desired = await tx.node_desired()
            out = []
            for name, head in sorted(wanted.items()):
                mine = assigned.get(name, [])
                agents = {
                    s.node_id: s
                    for s in await tx.agent_states(
                        node_ids=[a.node_id for a in mine], agent_id=name
                    )
                }
                healthy = sum(
                    1
                    for a in mine
                    if a.revision == head.revision
                    and (s := agents.get(a.node_id)) is not None
                    and s.revision == head.revision
                    and s.status == "RUNNING"
                    and s.health != "UNHEALTHY"
                )
                failed = sum(
                    1 for d in desired.values() if any(e.agent_id == name for e in d.update_errors)
                )
                latest = await tx.rollouts(name=name, limit=1)
                rollout_counts = (
                    (await tx.rollout_node_counts([latest[0].id], online)).get(latest[0].id, {})
                    if latest
                    else None
                )
                unplaced, why = 0, ""
                record = current[name, head.revision]
                if head.deleted_ms == 0 and not record.deleted:
                    checked = check_definition(load_definition(record.body))
                    if checked.count:
                        placed = placed or await _placed(tx)
                        scope, why = scope_of(
                            checked,
                            nodes,
                            {a.node_id for a in mine},
                            room,
                            now,
                            reservations(*placed, exclude=name),
                        )
                        unplaced = max(0, checked.count - len(scope))
                out.append(
                    DefinitionState(
                        head=head,
                        current=record,
                        nodes=len(mine),
                        nodes_current=healthy,
                        nodes_failed=failed,
                        rollout=latest[0] if latest else None,
                        rollout_counts=rollout_counts,
                        unplaced=unplaced,
                        unplaced_reason=why,
                    )
                )
            return out

        return await self._repo.run(body, write=False)

    async def get(self, name: str, revision: int = 0) -> tuple[DefinitionRecord, RevisionRecord]:
        """A definition's head and one revision (the current one by default)."""
        _check_name(name)

        async def body(tx: DesiredTx) -> tuple[DefinitionRecord, RevisionRecord]:
            head = (await tx.definitions([name])).get(name)
            if head is None:
                raise NotFound(f"definition {name!r} does not exist")
            record = await tx.revision(name, revision or head.revision)
            if record is None:
                raise NotFound(f"definition {name!r} has no revision {revision}")
            return head, record

        return await self._repo.run(body, write=False)

    async def history(self, name: str) -> list[RevisionRecord]:
        """Every revision, newest first; NotFound for a definition never applied."""
        _check_name(name)

        async def body(tx: DesiredTx) -> list[RevisionRecord]:
            found = await tx.history(name)
            if not found:
                raise NotFound(f"definition {name!r} does not exist")
            return found

        return await self._repo.run(body, write=False)

    # --- helpers ------------------------------------------------------------------------------

    async def _check_all(
        self, messages: Sequence[desired_pb2.Definition], expected: Mapping[str, int], why: str
    ) -> list[CheckedDefinition]:
        if not messages:
            raise InvalidArgument("at least one definition is required", field="definitions")
        if len(messages) > MAX_DEFINITIONS_PER_APPLY:
            raise InvalidArgument(
                f"at most {MAX_DEFINITIONS_PER_APPLY} per apply, got {len(messages)}",
                field="definitions",
            )
        _check_message(why)
        checked = []
        seen: set[str] = set()
        for i, msg in enumerate(messages):
            c = check_definition(msg, index=i)
            if c.name in seen:
                raise InvalidArgument(
                    f"{c.name!r} is given twice", field=f"definitions[{c.name}].name"
                )
            seen.add(c.name)
            if c.message.HasField("artifact"):
                resolved = await self._artifacts.resolve(
                    c.message.artifact, field=f"definitions[{c.name}].artifact"
                )
                message = desired_pb2.Definition()
                message.CopyFrom(c.message)
                message.artifact.CopyFrom(resolved)
                body = canonical_json(message)
                c = dataclasses.replace(
                    c,
                    message=message,
                    body=body,
                    content_hash=hashlib.sha256(body.encode()).hexdigest(),
                )
            checked.append(c)
        for name, revision in expected.items():
            if name not in seen:
                raise InvalidArgument(
                    f"{name!r} is not among the definitions applied", field="expected_revisions"
                )
            if revision < 0:
                raise InvalidArgument(f"must be >= 0, got {revision}", field="expected_revisions")
        return checked

    async def _head_revision(self, tx: DesiredTx, head: DefinitionRecord | None) -> int:
        return head.revision if _live(head) and head is not None else 0

    async def _current(self, tx: DesiredTx, head: DefinitionRecord | None) -> RevisionRecord | None:
        if head is None:
            return None
        return await tx.revision(head.name, head.revision)

    async def _last_good_before(self, tx: DesiredTx, head: DefinitionRecord) -> int:
        for r in await tx.rollouts(name=head.name, limit=1000):
            if r.state == ro.RolloutState.SUCCESSFUL.value and r.target != head.revision:
                return r.target
        if head.stable_revision and head.stable_revision != head.revision:
            return head.stable_revision
        raise FailedPrecondition(
            f"{head.name} has no earlier revision that rolled out successfully; name the"
            " revision to go back to"
        )

    async def _room(self, nodes: Sequence[NodeRecord]) -> dict[str, Candidate]:
        """Every node's room for placement, by id (none known without a source)."""
        if self._candidates is None:
            return {}
        return {c.node_id: c for c in await self._candidates(nodes)}

    async def _forecast(
        self,
        tx: DesiredTx,
        draft: _Draft,
        nodes: Sequence[NodeRecord],
        room: Mapping[str, Candidate],
    ) -> Change:
        c, head = draft.checked, draft.head
        previous = head.revision if _live(head) and head is not None else 0
        if draft.revision == 0:
            return Change(
                c.name, previous, previous, False, f"{c.name}: unchanged (revision {previous})"
            )
        current = await tx.assignments(names=[c.name])
        assigned = {a.node_id: a for a in current}
        held = reservations(*await _placed(tx), exclude=c.name) if c.count else {}
        scope, unplaced = scope_of(c, nodes, assigned, room, self._clock(), held)
        old = await tx.revisions_of({(a.name, a.revision) for a in current})
        # Only the rows with refusals (what `_node_change` reads of a row): not 500 rows
        # decoded at the front of every rollout.
        desired = await tx.observed_rows(scope)
        status = {n.node_id: n.status for n in nodes}
        out: list[NodeChange] = []
        parsed: dict[tuple[str, int], CheckedDefinition] = {}
        verdicts: dict[tuple[str, int], str] = {}
        for node_id in scope:
            out.append(
                _node_change(
                    node_id,
                    c,
                    assigned.get(node_id),
                    old,
                    desired.get(node_id),
                    status[node_id],
                    parsed,
                    verdicts,
                )
            )
        out = await _host_clashes(tx, c.name, out)
        out.extend(NodeChange(n, "remove") for n in sorted(set(assigned) - set(scope)))
        moving = [
            n.node_id
            for n in out
            if n.action in ("add", "restart", "reconfigure") and status.get(n.node_id) == "online"
        ]
        first = 0 if c.policy.canary.of(len(scope)) else 1
        batches = tuple(
            (first + i, tuple(b))
            for i, b in enumerate(ro.plan_batches(c.policy, len(scope), moving))
        )
        counts: dict[str, int] = {}
        for n in out:
            counts[n.action] = counts.get(n.action, 0) + 1
        parts = [f"{action} on {k} node(s)" for action, k in sorted(counts.items())]
        was = f" (was {previous})" if previous else " (new)"
        summary = (
            f"{c.name}: revision {draft.revision}{was}: {', '.join(parts) or 'no node matches'}"
        )
        if unplaced:
            summary += f"; {unplaced}"
        return Change(c.name, draft.revision, previous, True, summary, tuple(out), batches)

    async def _store(
        self, tx: DesiredTx, draft: _Draft, *, actor: str, message: str, now_ms: int
    ) -> int:
        c, head = draft.checked, draft.head
        await tx.add_revision(
            RevisionRecord(c.name, draft.revision, c.body, c.content_hash, actor, message, now_ms)
        )
        stable = head.stable_revision if head is not None and _live(head) else 0
        await tx.put_definition(
            DefinitionRecord(
                name=c.name,
                revision=draft.revision,
                stable_revision=stable,
                deleted_ms=0,
                created_ms=head.created_ms if head is not None and _live(head) else now_ms,
                updated_ms=now_ms,
            )
        )
        await self._cancel_live(tx, c.name, draft.revision, now_ms, reason="superseded")
        rollout, note = ro.start(c.name, draft.revision, stable, c.policy, now_ms / 1000)
        rollout_id = await tx.add_rollout(
            RolloutRecord(
                id=0,
                name=c.name,
                target=draft.revision,
                previous=stable,
                state=rollout.state.value,
                record=json.dumps(ro.to_dict(rollout)),
                actor=actor,
                message=message,
                created_ms=now_ms,
                updated_ms=now_ms,
            )
        )
        tx.event(
            "DEFINITION_APPLIED",
            now_ms=now_ms,
            actor=actor,
            message=f"{actor} applied {c.name} revision {draft.revision}"
            + (f": {message}" if message else ""),
            attributes={"name": c.name, "revision": str(draft.revision), "message": message},
        )
        tx.event(
            "ROLLOUT_STARTED",
            now_ms=now_ms,
            actor=actor,
            message=note.message,
            attributes={**note.attributes, "name": c.name, "rollout_id": str(rollout_id)},
        )
        return rollout_id

    async def _cancel_live(
        self, tx: DesiredTx, name: str, revision: int, now_ms: int, *, reason: str
    ) -> None:
        for record in await tx.rollouts(name=name, live=True, for_update=True):
            old = ro.from_dict(json.loads(record.record))
            cancelled, note = ro.supersede(old, revision, now_ms / 1000)
            if reason == "deleted":
                cancelled = dataclasses.replace(cancelled, reason="the definition was deleted")
            await tx.update_rollout(
                dataclasses.replace(
                    record,
                    state=cancelled.state.value,
                    record=json.dumps(ro.to_dict(cancelled)),
                    updated_ms=now_ms,
                    ended_ms=now_ms,
                )
            )
            tx.event(
                "ROLLOUT_CANCELLED",
                now_ms=now_ms,
                actor="manager",
                message=note.message
                if reason != "deleted"
                else f"{name}: rollout of revision"
                f" {old.target} cancelled: the definition was deleted",
                attributes={**note.attributes, "name": name, "rollout_id": str(record.id)},
            )


async def _placed(tx: DesiredTx) -> tuple[list[tuple[str, str]], dict[str, Resources]]:
    """(node, definition) of every assignment, and each live definition's requests."""
    heads = await tx.definitions()
    live = {n: h for n, h in heads.items() if h.deleted_ms == 0}
    bodies = await tx.revisions_of({(n, h.revision) for n, h in live.items()})
    requests = {
        n: check_definition(load_definition(bodies[n, h.revision].body)).requests
        for n, h in live.items()
        if (n, h.revision) in bodies and not bodies[n, h.revision].deleted
    }
    return [(a.node_id, a.name) for a in await tx.assignments()], requests


def without_metrics(matching: Sequence[NodeRecord]) -> list[Candidate]:
    """Placement candidates knowing only labels and liveness (no resource figures)."""
    return [
        Candidate(n.node_id, n.labels, n.status == "online", offline_since=n.last_seen_ms / 1000)
        for n in matching
    ]


def _check_message(message: str) -> None:
    """The change cause: stored in audit and events (PostgreSQL text cannot hold NUL)."""
    if len(message) > 1000 or "\x00" in message:
        raise InvalidArgument("at most 1000 characters, without NUL", field="message")


def _check_name(name: str) -> None:
    if not name:
        raise InvalidArgument("is required", field="name")
    try:
        validate_label_value(name)
    except LabelError as exc:
        raise InvalidArgument(exc.message.split(": ", 1)[-1], field="name") from None


def _check_expected(
    name: str, head: DefinitionRecord | None, expected: Mapping[str, int], current: int
) -> None:
    if name not in expected or expected[name] == current:
        return
    want = expected[name]
    now = f"it is at revision {current}" if current else "it does not exist"
    if not current and want:
        raise FailedPrecondition(f"{name} changed since revision {want}: {now}")
    raise FailedPrecondition(
        f"{name} changed since revision {want}: {now}" if want else f"{name} already exists: {now}"
    )


HOST_CLASH = (
    "agent {name!r} is defined in this host's own config; the host's own agent is kept:"
    " rename the definition or remove the agent from the host's config"
)
"""Why a node will refuse a definition whose name its daemon's own agent has (the
daemon's refusal, which the plan foresees from the agent states the daemon reported)."""


async def _host_clashes(tx: DesiredTx, name: str, changes: list[NodeChange]) -> list[NodeChange]:
    """`changes` with each node that would get the agent added, but already reported a host
    agent of that name (revision 0: not one the manager placed), marked refused."""
    adding = [n.node_id for n in changes if n.action == "add"]
    if not adding:
        return changes
    hosts = {n for n, a in (await tx.agent_briefs(adding, name)).items() if a.revision == 0}
    return [
        NodeChange(n.node_id, "refused", HOST_CLASH.format(name=name))
        if n.action == "add" and n.node_id in hosts
        else n
        for n in changes
    ]


def _node_change(
    node_id: str,
    c: CheckedDefinition,
    assignment: AssignmentRecord | None,
    old: Mapping[tuple[str, int], RevisionRecord],
    desired: NodeDesiredRecord | None,
    status: str,
    parsed: dict[tuple[str, int], CheckedDefinition] | None = None,
    verdicts: dict[tuple[str, int], str] | None = None,
) -> NodeChange:
    """add / restart / reconfigure / unchanged / refused for one node in the scope;
    `parsed` memoizes the old revisions across the nodes (parsing one per node was most
    of an apply's time on 500 nodes), `verdicts` what moving from each one to `c` is."""
    note = "offline: converges when it returns" if status != "online" else ""
    if desired is not None:
        for err in desired.update_errors:
            if err.agent_id == c.name:
                return NodeChange(node_id, "refused", err.reason)
    before = old.get((assignment.name, assignment.revision)) if assignment else None
    if before is None or before.deleted:
        return NodeChange(node_id, "add", note)
    key = (before.name, before.revision)
    memo = {} if parsed is None else parsed
    previous = memo.get(key)
    if previous is None:
        previous = memo[key] = check_definition(load_definition(before.body))
    # The same for every node on `previous`: once per old revision (two process hashes
    # per node were a good part of a 500-node apply).
    verdict = None if verdicts is None else verdicts.get(key)
    if verdict is None:
        verdict = _verdict(previous, c)
        if verdicts is not None:
            verdicts[key] = verdict
    return NodeChange(node_id, verdict, note)


def _verdict(previous: CheckedDefinition, c: CheckedDefinition) -> str:
    """unchanged / restart / reconfigure from `previous` to `c`."""
    if previous.content_hash == c.content_hash:
        return "unchanged"
    if (
        previous.spec.process_hash() != c.spec.process_hash()
        or previous.message.artifact != c.message.artifact
    ):
        return "restart"
    return "reconfigure"
