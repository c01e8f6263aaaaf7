"""Convergence: make every node run what the definitions say, rollouts included.

One replica at a time (PostgreSQL advisory lock ``fleet-desired``; SQLite has
one manager) runs passes, each:

1. **Scope**: which nodes each live definition runs on (selector on the
   effective labels, placement for `count`); a node that comes into scope
   gets the definition's stable revision, one that leaves it loses its
   assignment (`desired.assignment_changes`).
2. **Rollouts**: each live rollout is loaded, judged and stepped
   (`rollout.step`) in ONE transaction with its node records, the
   assignments it moves and its events, so a manager killed between two
   steps resumes from the database: no batch skipped, no node moved twice.
3. **Node sets**: each node's managed set (its assignments' specs) gets a
   new version when its content changed (`desired.node_set`).
4. **Pushes**: nodes whose set was not delivered get a `PushUpdate` through
   the pool (bounded concurrency, backoff per node on failure; offline
   nodes wait until they are back).

A pass runs when something changes (`poke`: a definition, a registration, a
label change, a daemon's report of the set it runs, an operator's rollout
action; coalesced; agents' state changes only while a rollout is live,
`poke_agents`), at the earliest time a rollout decision can change
(`Step.wake_at`), and every `safety_interval` seconds anyway (other
replicas' writes). A pass reads every node, so poked passes are paced by
their own cost (`pass_gap`). With replicas,
also every `rollout_poll` seconds while a rollout moves nodes: their daemons
may report to a replica that cannot poke this one.

Exactly one driver: the leader checks the lock before every pass and every
`lock_check` seconds while idle, and a new leader waits `lock_check` before
its first pass, so one whose lock connection died (PostgreSQL dropped the
lock; another replica may take it) stops before the next one starts (a pass
already running finishes first; its pushes carry versions the daemons
order, and its rollout steps lock the rollout's row).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from fleet.errors import FailedPrecondition, FleetError
from fleet.v1 import common_pb2
from manager.pool import DaemonPool
from manager.service import rollout as ro
from manager.service.definitions import (
    CandidateSource,
    check_definition,
    load_definition,
    pushed_spec,
    scope_of,
)
from manager.service.desired import (
    EMPTY_SET_HASH,
    assignment_changes,
    next_version,
    node_set,
    observe,
    push_backoff,
)
from manager.service.placement import Candidate, reservations
from manager.service.reports import update_errors_event
from manager.storage import Database, NodeRecord, NodeRepository
from manager.storage.desired import DesiredStateRepository, DesiredTx
from manager.storage.records import (
    AssignmentRecord,
    NodeDesiredRecord,
    RevisionRecord,
    RolloutNodeRecord,
    RolloutRecord,
    UpdateErrorRecord,
)

__all__ = [
    "DESIRED_LOCK",
    "Convergence",
    "PassResult",
    "note_kind",
    "observations",
    "pass_gap",
    "persist_step",
    "progress_of",
]

log = logging.getLogger(__name__)

DESIRED_LOCK = "fleet-desired"


def note_kind(kind: str) -> str:
    """A rollout note's kind as an event kind: rollout-batch -> ROLLOUT_BATCH."""
    return kind.upper().replace("-", "_")


@dataclass
class PassResult:
    """What one pass did (for logs and tests)."""

    assigned: int = 0
    """Assignments created."""
    dropped: int = 0
    """Assignments dropped."""
    stepped: list[str] = field(default_factory=list)
    """Definitions whose rollout changed."""
    pushed: list[str] = field(default_factory=list)
    """Nodes that got a PushUpdate that succeeded."""
    push_failed: dict[str, str] = field(default_factory=dict)
    """Nodes whose push failed, and why."""
    wake_at: float | None = None
    """The earliest time a rollout decision can change."""
    live_rollouts: dict[str, int] = field(default_factory=dict)
    """Live rollouts by state after the pass."""
    failed_rollouts: int = 0
    """Rollouts that failed in this pass."""
    undelivered: int = 0
    """Nodes whose managed set is not delivered after the pass."""


def pass_gap(*, spent: float, since: float, debounce: float, pace: float) -> float:
    """Seconds to wait before a poked pass (pure).

    At least `debounce`, and until `pace` times the last pass's duration has
    passed since it ended: a pass reads every node, and agent syncs poke at a
    rate that grows with the fleet, so unpaced passes would grow as nodes
    squared and take the whole loop; paced, they take at most 1 / (1 + pace)
    of it and a change waits at most a pass and its gap.
    """
    return max(debounce, spent * pace - since)


class Convergence:
    """The desired-state driver (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        nodes: NodeRepository,
        pool: DaemonPool,
        *,
        clock: Callable[[], float] = time.time,
        candidates: CandidateSource | None = None,
        debounce: float = 0.05,
        pace: float = 3.0,
        safety_interval: float = 10.0,
        push_concurrency: int = 64,
        push_timeout: float | None = None,
        lock_check: float = 1.0,
        rollout_poll: float = 1.0,
        on_leader: Callable[[bool], None] = lambda held: None,
        on_pass: Callable[[PassResult], None] = lambda result: None,
    ) -> None:
        self._db = db
        self._repo = DesiredStateRepository(db)
        self._nodes = nodes
        self._pool = pool
        self._clock = clock
        self._candidates = candidates
        self._debounce = debounce
        self._pace = pace
        self._safety = safety_interval
        self._push_sem = asyncio.Semaphore(push_concurrency)
        self._push_timeout = push_timeout
        self._lock_check = lock_check
        self._rollout_poll = rollout_poll
        self._on_leader = on_leader
        self._on_pass = on_pass
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pass_lock = asyncio.Lock()
        self._rollouts_live = True  # until a pass says otherwise
        self._states_changed = False
        self.passes = 0
        """Passes run so far (tests read it)."""
        self.leading = False
        """True while this replica holds the lock and converges."""

    # --- lifecycle ------------------------------------------------------------------------

    def poke(self) -> None:
        """Something changed: run a pass soon (several pokes make one pass)."""
        self._wake.set()

    def poke_agents(self) -> None:
        """Agents' states changed: a pass only if a rollout is live (only a rollout
        judges agents by their states). Agent syncs come at a rate that grows with
        the fleet, and a pass reads every node: with no rollout they would run passes
        back to back for nothing."""
        self._states_changed = True
        if self._rollouts_live:
            self._wake.set()

    def start(self) -> None:
        """Compete for the lock and converge while holding it."""
        self._stop.clear()
        self._task = asyncio.create_task(self._run(), name="convergence")

    async def stop(self) -> None:
        """Stop after the pass in progress."""
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                async with self._db.advisory_lock(DESIRED_LOCK) as held:
                    if held:
                        await self._lead()
            except FleetError as exc:
                log.warning("convergence: %s; retrying", exc)
            except Exception:
                log.exception("convergence failed unexpectedly; retrying")
            finally:
                if self.leading:
                    log.info("no longer converging desired state")
                self.leading = False
                self._on_leader(False)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 1.0)

    async def _lead(self) -> None:
        replicas = self._db.dialect == "postgresql"
        if replicas:
            # A predecessor whose lock connection died stops within `lock_check` (it
            # checks that often, and before every pass): wait that out before driving.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._lock_check)
            if self._stop.is_set() or not await self._db.advisory_lock_held(DESIRED_LOCK):
                return
        self.leading = True
        self._on_leader(True)
        log.info("this manager converges desired state")
        while not self._stop.is_set():
            if not await self._db.advisory_lock_held(DESIRED_LOCK):
                log.warning("lost the desired-state lock; competing for it again")
                return
            self._wake.clear()
            started = time.monotonic()
            result = await self.run_once()
            ended = time.monotonic()
            delay = self._safety
            if result.wake_at is not None:
                delay = min(delay, max(0.0, result.wake_at - self._clock()))
            if replicas and {"RUNNING", "REVERTING"} & set(result.live_rollouts):
                # Daemons may report to another replica, which cannot poke this one.
                delay = min(delay, self._rollout_poll)
            if not await self._idle(delay):
                log.warning("lost the desired-state lock; competing for it again")
                return
            # Let a burst of pokes settle into one pass, and keep passes (each O(nodes))
            # from running back to back when pokes are steady (agent syncs: O(nodes)/s).
            await asyncio.sleep(
                pass_gap(
                    spent=ended - started,
                    since=time.monotonic() - ended,
                    debounce=self._debounce,
                    pace=self._pace,
                )
            )

    async def _idle(self, delay: float) -> bool:
        """Wait up to `delay` s for a poke, checking every `lock_check` s that the lock is
        still held (False as soon as it is not: stop driving, the gauge says so)."""
        deadline = time.monotonic() + delay
        while not self._wake.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(left, self._lock_check))
            if not self._wake.is_set() and not await self._db.advisory_lock_held(DESIRED_LOCK):
                return False
        return True

    # --- one pass -------------------------------------------------------------------------

    async def run_once(self) -> PassResult:
        """Scope, rollouts, node sets, pushes (see the module docstring)."""
        async with self._pass_lock:
            result = PassResult()
            self._states_changed = False
            nodes = {n.node_id: n for n in await self._nodes.list()}
            scopes, live = await self._rescope(nodes, result)
            await self._step_rollouts(nodes, scopes, live, result)
            pushes = await self._refresh_sets(nodes, result)
            await self._push(pushes, nodes, result)
            self.passes += 1
            self._rollouts_live = bool(result.live_rollouts)
            if self._rollouts_live and self._states_changed:
                self._wake.set()  # states changed during this pass, maybe after it read them
            self._on_pass(result)
            return result

    async def _rescope(
        self, nodes: Mapping[str, NodeRecord], result: PassResult
    ) -> tuple[dict[str, list[str]], list[int]]:
        """Assign newcomers, drop leavers; each live definition's scope, and the live
        rollouts those scopes are for."""
        now = self._clock()
        listed = list(nodes.values())

        async def body(
            tx: DesiredTx, write: bool, room: Mapping[str, Candidate] | None
        ) -> tuple[dict[str, list[str]], bool, list[int]]:
            """(scopes, whether assignments change, the live rollouts the scopes are for);
            without `room`, ({}, True, []) as soon as a count definition needs it."""
            # Rollouts first: one seen here was committed with its definition's revision,
            # so the definitions read next include it (even on READ COMMITTED). A rollout
            # started after this read waits for the next pass (its apply pokes one), rather
            # than be judged on a scope computed without its definition: that empty scope
            # ended it SUCCESSFUL without moving a node.
            live_rollouts = [r.id for r in await tx.rollouts(live=True, limit=10_000)]
            heads = await tx.definitions(for_update=write)
            live = {name: h for name, h in heads.items() if h.deleted_ms == 0}
            current = await tx.assignments()
            bodies = await tx.revisions_of({(n, h.revision) for n, h in live.items()})
            checked = {
                name: check_definition(load_definition(bodies[name, head.revision].body))
                for name, head in live.items()
            }
            if room is None and any(c.count for c in checked.values()):
                return {}, True, []
            by_name: dict[str, set[str]] = {}
            for a in current:
                by_name.setdefault(a.name, set()).add(a.node_id)
            requests = {name: c.requests for name, c in checked.items()}
            scopes: dict[str, list[str]] = {}
            for name, c in checked.items():
                held = None
                if c.count:  # what the others placed reserves room, as decided so far
                    placed = [(n, other) for other, ns in by_name.items() for n in ns]
                    held = reservations(placed, requests, exclude=name)
                scope, _ = scope_of(c, listed, by_name.get(name, set()), room or {}, now, held)
                scopes[name] = scope
                by_name[name] = set(scope)
            changes = assignment_changes(
                scopes, {n: h.stable_revision for n, h in live.items()}, current, int(now * 1000)
            )
            if not write:
                # Most passes change no assignment: decide that in a read transaction,
                # which on SQLite does not queue behind the agents' reports for the
                # write lock.
                return scopes, bool(changes.add or changes.drop), live_rollouts
            await tx.set_assignments(changes.add)
            await tx.delete_assignments(changes.drop)
            result.assigned, result.dropped = len(changes.add), len(changes.drop)
            return scopes, True, live_rollouts

        scopes, changing, rollouts = await self._repo.run(
            lambda tx: body(tx, False, None), write=False
        )
        if not changing:
            return scopes, rollouts
        # A count definition needs the nodes' room (one query), or assignments change:
        # decide again under the write lock (the read may be stale by now).
        room = {c.node_id: c for c in await self._candidates(listed)} if self._candidates else {}
        scopes, _, rollouts = await self._repo.run(lambda tx: body(tx, True, room))
        return scopes, rollouts

    async def _step_rollouts(
        self,
        nodes: Mapping[str, NodeRecord],
        scopes: Mapping[str, Sequence[str]],
        live: Sequence[int],
        result: PassResult,
    ) -> None:
        """Step the `live` rollouts (ids) over the `scopes` computed with them."""
        for rollout_id in sorted(live):
            wake = await self._step_one(rollout_id, nodes, scopes, result)
            if wake is not None:
                result.wake_at = wake if result.wake_at is None else min(result.wake_at, wake)

    async def _step_one(
        self,
        rollout_id: int,
        nodes: Mapping[str, NodeRecord],
        scopes: Mapping[str, Sequence[str]],
        result: PassResult,
    ) -> float | None:
        """Judge one rollout over the definition's scope and persist its step atomically."""
        now = self._clock()
        now_ms = int(now * 1000)

        async def body(tx: DesiredTx) -> float | None:
            record = await tx.rollout(rollout_id, for_update=True)
            if record is None or record.ended_ms:
                return None
            scope = scopes.get(record.name, ())
            rollout = ro.from_dict(json.loads(record.record))
            progress = {n: progress_of(r) for n, r in (await tx.rollout_nodes(rollout_id)).items()}
            observed = await observations(tx, record.name, scope, nodes)
            step = ro.step(rollout, progress, observed, now)
            if step.rollout.state not in ro.TERMINAL:
                state = step.rollout.state.value
                result.live_rollouts[state] = result.live_rollouts.get(state, 0) + 1
            if step.rollout == rollout and not step.nodes and not step.assign:
                return step.wake_at
            await persist_step(tx, record, step, now_ms)
            result.stepped.append(record.name)
            result.failed_rollouts += sum(n.kind == "rollout-failed" for n in step.notes)
            return step.wake_at

        return await self._repo.run(body)

    async def _refresh_sets(self, nodes: Mapping[str, NodeRecord], result: PassResult) -> list[str]:
        """Bump the version of every node whose managed set changed; the nodes to push."""
        now_ms = int(self._clock() * 1000)

        async def body(tx: DesiredTx) -> list[str]:
            current = await tx.assignments()
            rows = await tx.node_desired()
            revisions = await tx.revisions_of({(a.name, a.revision) for a in current})
            per_node: dict[str, list[AssignmentRecord]] = {}
            for a in current:
                per_node.setdefault(a.node_id, []).append(a)
            changed = []
            parsed: dict[tuple[str, int], common_pb2.AgentSpec] = {}
            for node_id in sorted(set(per_node) | set(rows)):
                if node_id not in nodes:
                    continue
                specs = _specs(per_node.get(node_id, []), revisions, parsed)
                _, digest = node_set(specs)
                row = rows.get(node_id, NodeDesiredRecord(node_id, content_hash=EMPTY_SET_HASH))
                if digest != (row.content_hash or EMPTY_SET_HASH):
                    row = dataclasses.replace(
                        row,
                        version=next_version(row),
                        content_hash=digest,
                        push_attempts=0,
                        next_push_ms=0,
                        push_error="",
                        updated_ms=now_ms,
                    )
                    changed.append(row)
                elif row.delivered_version < row.version <= row.reported_version:
                    # Delivered, but the answer was lost; the daemon says it runs it.
                    changed.append(dataclasses.replace(row, delivered_version=row.version))
                    continue
                rows[node_id] = row
            await tx.put_node_desired(changed)
            for row in changed:
                rows[row.node_id] = row
            undelivered = [
                n for n, row in sorted(rows.items()) if row.version > row.delivered_version
            ]
            result.undelivered = len(undelivered)
            backed_off = [rows[n].next_push_ms / 1000 for n in undelivered]
            later = [t for t in backed_off if t * 1000 > now_ms]
            if later:  # wake up for the retries backed off
                soonest = min(later)
                result.wake_at = soonest if result.wake_at is None else min(result.wake_at, soonest)
            return [n for n in undelivered if rows[n].next_push_ms <= now_ms]

        return await self._repo.run(body)

    async def _push(
        self, node_ids: Sequence[str], nodes: Mapping[str, NodeRecord], result: PassResult
    ) -> None:
        targets = [n for n in node_ids if n in nodes and nodes[n].status == "online"]
        if not targets:
            return
        sets = await self._repo.run(lambda tx: self._sets_of(tx, targets), write=False)
        targets = [n for n in targets if n in sets]
        outcomes = await asyncio.gather(
            *(self._push_one(nodes[n], sets[n][0], sets[n][1]) for n in targets)
        )
        now_ms = int(self._clock() * 1000)

        async def body(tx: DesiredTx) -> None:
            rows = await tx.node_desired(targets)
            updated = []
            for node_id, (version, refused, error) in zip(targets, outcomes, strict=True):
                row = rows.get(node_id)
                if row is None or row.version != version:
                    continue  # a newer set was decided meanwhile: the next pass pushes it
                if error and row.updated_ms != sets[node_id][2]:
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
                    result.push_failed[node_id] = error
                else:
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
                        # A rollout waiting on this node judges the refusal in the next
                        # pass, now, not at the safety interval.
                        result.wake_at = self._clock()
                    result.pushed.append(node_id)
            await tx.put_node_desired(updated)

        await self._repo.run(body)

    async def _sets_of(
        self, tx: DesiredTx, node_ids: Sequence[str]
    ) -> dict[str, tuple[int, list[common_pb2.AgentSpec], int]]:
        """Per node: the version to push, its specs, and when its row last changed."""
        rows = await tx.node_desired(node_ids)
        current = await tx.assignments(node_ids=node_ids)
        revisions = await tx.revisions_of({(a.name, a.revision) for a in current})
        per_node: dict[str, list[AssignmentRecord]] = {}
        for a in current:
            per_node.setdefault(a.node_id, []).append(a)
        parsed: dict[tuple[str, int], common_pb2.AgentSpec] = {}
        return {
            n: (
                rows[n].version,
                node_set(_specs(per_node.get(n, []), revisions, parsed))[0],
                rows[n].updated_ms,
            )
            for n in node_ids
            if n in rows
        }

    async def _push_one(
        self, node: NodeRecord, version: int, specs: list[common_pb2.AgentSpec]
    ) -> tuple[int, tuple[UpdateErrorRecord, ...], str]:
        async with self._push_sem:
            try:
                reply = await self._pool.push_update(
                    node.node_id,
                    node.daemon_address,
                    version,
                    specs,
                    call_timeout=self._push_timeout,
                )
            except FailedPrecondition as exc:
                # The daemon holds this version or a newer one; its next report says which.
                return version, (), f"refused: {exc.message}"
            except FleetError as exc:
                return version, (), exc.message
        refused = tuple(UpdateErrorRecord(r.agent_id, r.revision, r.reason) for r in reply.refused)
        return version, refused, ""


async def observations(
    tx: DesiredTx,
    name: str,
    scope: Sequence[str],
    nodes: Mapping[str, NodeRecord],
) -> dict[str, ro.Observation]:
    """What a rollout of `name` sees of each node of its scope (and of each node still
    assigned to it)."""
    assigned = {a.node_id: a for a in await tx.assignments(names=[name])}
    wanted = sorted((set(scope) | set(assigned)) & set(nodes))
    desired = await tx.node_desired(wanted)
    states = {s.node_id: s for s in await tx.agent_states(node_ids=wanted, agent_id=name)}
    return {
        n: observe(
            nodes[n],
            assigned.get(n),
            states.get(n),
            desired[n].update_errors if n in desired else (),
        )
        for n in wanted
    }


async def persist_step(tx: DesiredTx, record: RolloutRecord, step: ro.Step, now_ms: int) -> None:
    """Store a rollout step: its record, node records, the assignments it moves, its
    events; a success makes the target the definition's stable revision."""
    after = step.rollout
    ended = after.state in ro.TERMINAL
    await tx.update_rollout(
        dataclasses.replace(
            record,
            target=after.target,
            previous=after.previous,
            state=after.state.value,
            record=json.dumps(ro.to_dict(after)),
            updated_ms=now_ms,
            ended_ms=now_ms if ended else 0,
        )
    )
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


def progress_of(record: RolloutNodeRecord) -> ro.NodeProgress:
    """A stored node record as the pure decisions' NodeProgress."""
    return ro.NodeProgress(
        phase=ro.NodePhase(record.phase),
        batch=record.batch,
        since=record.since_ms / 1000,
        offline=record.offline,
        reason=record.reason,
    )


def _specs(
    assigned: Sequence[AssignmentRecord],
    revisions: Mapping[tuple[str, int], RevisionRecord],
    parsed: dict[tuple[str, int], common_pb2.AgentSpec] | None = None,
) -> list[common_pb2.AgentSpec]:
    """The specs of a node's assignments; `parsed` memoizes them across the nodes of a
    pass (parsing a definition's JSON per node was a tenth of a 500-node pass)."""
    memo = {} if parsed is None else parsed
    out = []
    for a in assigned:
        key = (a.name, a.revision)
        spec = memo.get(key)
        if spec is None:
            record = revisions.get(key)
            if record is None or record.deleted:
                continue
            spec = memo[key] = pushed_spec(load_definition(record.body), a.revision)
        out.append(spec)
    return out
