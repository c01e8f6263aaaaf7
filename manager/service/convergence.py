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
   the pool (`delivery.Pusher`: bounded concurrency; backoff per node on
   failure; offline nodes wait until they are back). The push asks for the
   node's agents in the answer; they are stored as a SyncAgentStates is
   (`delivery.record`) and judged at once, so a batch needs no report round
   trip. A pass (full or incremental) that pushed a live rollout's batch and
   whose every answer carried them leaves them to the next pass, due at
   once, which judges its step on them and records them (`_record`) in a
   transaction of their own while the pushes of the batch that step starts
   go out (`_record_while`).

A full pass runs when something changes (`poke`: a definition, a
registration, a label change, an operator's rollout action; coalesced),
every `safety_interval` seconds anyway (other replicas' writes) and, with
replicas, every `rollout_poll` seconds while a rollout moves nodes: their
daemons may report to a replica that cannot poke this one. It leaves a memo
(`_Memo`: the nodes, each live rollout's stored row, node records and
observations). Agent reports (`touched`: the nodes whose report changed
something) and the earliest time a rollout decision can change
(`Step.wake_at`) run an incremental pass instead: it re-reads only the
touched nodes, re-judges on the memo and persists a step with the node sets
it changes in one transaction, after checking under the rollout's row lock
that the row is the one this driver stored (otherwise: no step, a full pass
next). A batch costs O(batch), not O(fleet). An apply (`applied`) that keeps its
definitions' selectors starts its rollout the same way: the next incremental pass takes
the first step on the memo's nodes and scope (`_start_in`), reading only the scope's
observations; anything else changed (a rollout the memo holds superseded, a new
selector, a `count` definition live) means a full pass.

Agents' state changes (`states_changed`) come at a rate that grows with the
fleet and only a live rollout judges them: they wake the driver only while
one is live. A full pass reads every node, so a poked one waits until
`pace` times the last full pass's duration (less its wait for push answers)
has passed (`pass_gap`): when full passes are due back to back (a push keeps
failing, pokes are steady) they take at most a quarter of the event loop.

Exactly one driver: the leader checks the lock before every pass and every
`lock_check` seconds while idle, and a new leader waits `lock_check` before
its first pass, so one whose lock connection died (PostgreSQL dropped the
lock; another replica may take it) stops before the next one starts (a pass
already running finishes first; its pushes carry versions the daemons
order, and its rollout steps lock the rollout's row).

Rollout deadlines are stored wall-clock times. A pass that sees the wall
clock stepped (`liveness.StepWatch`) first moves every live rollout's
times with the step (`rollout.rebase`, stored) and runs as a full pass: a
+1 h step must not fail a batch's nodes not yet healthy at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from fleet.errors import FleetError
from fleet.selectors import Selector
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
from manager.service.delivery import Answer, Outcome, Pusher, answers_of, record
from manager.service.desired import (
    EMPTY_SET_HASH,
    assignment_changes,
    next_version,
    node_set,
    observe,
    push_retry_at,
    undelivered,
)
from manager.service.liveness import StepWatch
from manager.service.placement import Candidate, reservations
from manager.service.rollout_store import (
    Inputs,
    PassReads,
    note_kind,
    observation_inputs,
    observations,
    persist_step,
    progress_of,
)
from manager.storage import Database, NodeRecord
from manager.storage.desired import DesiredStateRepository, DesiredTx
from manager.storage.records import (
    AgentStateRecord,
    AssignmentRecord,
    NodeDesiredRecord,
    RevisionRecord,
    RolloutRecord,
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

_PARSED_KEPT = 256
"""Parsed revisions a driver keeps (a few per definition live at once)."""


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
    incremental: bool = False
    """An incremental pass (only the nodes touched since the last one re-read)."""
    push_wait: float = 0.0
    """Seconds spent waiting for push answers (not work of this manager's: not paced)."""


@dataclass
class _RolloutMemo:
    """A live rollout as the driver last stored it: what `rollout.step` needs."""

    record: RolloutRecord
    """Its row as stored (compared under the row lock before a step is persisted)."""
    rollout: ro.Rollout
    progress: dict[str, ro.NodeProgress]
    inputs: dict[str, Inputs]
    """What each node's observation is made of (kept so a step's assignments and a push's
    answer update it without reading it again)."""
    observed: dict[str, ro.Observation]

    def assign(self, node_ids: Iterable[str], revision: int, now_ms: int) -> None:
        """The step moved these nodes to `revision` (a new set: its push is in flight, no
        error yet, as `_refresh_in` stores it)."""
        for n in node_ids:
            if n in self.inputs:
                node, _, agent, errors, _ = self.inputs[n]
                a = AssignmentRecord(n, self.record.name, revision, now_ms)
                self.inputs[n] = (node, a, agent, errors, "")
                self.observed[n] = observe(*self.inputs[n])

    def answered(self, node_id: str, answer: Answer) -> None:
        """The node's daemon answered a push with these refusals (and agents, if the
        answer carried them and they were stored): its set is delivered."""
        if node_id in self.inputs:
            node, a, agent, _, _ = self.inputs[node_id]
            errors, states = answer
            if states is not None:
                agent = next((st for st in states if st.agent_id == self.record.name), None)
            self.inputs[node_id] = (node, a, agent, errors, "")
            self.observed[node_id] = observe(*self.inputs[node_id])


@dataclass
class _Memo:
    """What the last full pass saw, kept current by the incremental passes after it.

    Only the driving replica keeps it, only between full passes; the database stays the
    source of truth (a full pass rebuilds it, a new driver starts with a full pass).
    """

    nodes: dict[str, NodeRecord]
    rollouts: dict[int, _RolloutMemo]
    scopes: dict[str, tuple[Selector, list[str]]]
    """Each live definition's scope and the selector it was computed from; empty when a
    `count` definition is live (placement also depends on room and the others' requests).
    A rollout an apply starts on a definition that keeps its selector takes its first
    step on it (`_start_in`)."""
    undelivered: set[str]
    """Nodes whose set is not delivered (for the gauge)."""
    backoff_at: float | None
    """The earliest retry of a backed-off push (a full pass does it)."""

    def answered(self, answers: Mapping[str, Answer]) -> None:
        """Push answers (node -> refusals, agents) into every rollout's view of those
        nodes."""
        for node_id, answer in answers.items():
            self.undelivered.discard(node_id)
            for m in self.rollouts.values():
                m.answered(node_id, answer)


def pass_gap(*, spent: float, since: float, debounce: float, pace: float) -> float:
    """Seconds to wait before a poked full pass (pure).

    At least `debounce`, and until `pace` times the last full pass's duration
    has passed since it ended: a full pass reads every node, and pokes may come
    at a rate that grows with the fleet, so unpaced passes would grow as nodes
    squared and take the whole loop; paced, they take at most 1 / (1 + pace)
    of it and a change waits at most a pass and its gap.
    """
    return max(debounce, spent * pace - since)


class Convergence:
    """The desired-state driver (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        pool: DaemonPool,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] | None = None,
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
        self._pusher = Pusher(pool, clock=clock, concurrency=push_concurrency, timeout=push_timeout)
        self._clock = clock
        self._monotonic = monotonic or clock  # what a step of `clock` is measured against
        self._steps = StepWatch()
        self._candidates = candidates
        self._debounce = debounce
        self._pace = pace
        self._safety = safety_interval
        self._lock_check = lock_check
        self._rollout_poll = rollout_poll
        self._on_leader = on_leader
        self._on_pass = on_pass
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pass_lock = asyncio.Lock()
        self._full = True
        """A full pass is due (a poke; anything but an agent report)."""
        self._urgent = False
        """The due full pass is an operator's (`act`): no debounce."""
        self._applied = False
        """An apply started rollouts since the last pass (`applied`)."""
        self._touched: set[str] = set()
        """Nodes whose agents reported since the last pass began."""
        self._memo: _Memo | None = None
        self._next_full = 0.0
        """time.monotonic() at which a full pass is due anyway."""
        self._full_spent = 0.0
        self._full_ended = 0.0
        """How long the last full pass took and when it ended (time.monotonic())."""
        self._rollouts_live = True  # until a pass says otherwise
        self._unplaced: dict[str, str] = {}
        """Why a count definition's instances were not all placed (by name), as the last
        full pass placed them: its rollout waits for room rather than end short."""
        self._unrecorded: list[Outcome] = []
        """Push answers (all with the agents' states) the next pass judges its step on
        and records while that step's pushes go out (`_record_while`)."""
        self._parsed: dict[tuple[str, int, str], common_pb2.AgentSpec] = {}
        """Pushed specs by (name, revision, stored body), kept across passes: a pass
        re-parsed each assigned revision's JSON (json_format, ~0.2 ms), one per batch."""
        self.parsed = 0
        """Revisions parsed into pushed specs so far (tests read it)."""
        self.passes = 0
        """Passes run so far, full and incremental (tests read it)."""
        self.leading = False
        """True while this replica holds the lock and converges."""

    # --- lifecycle ------------------------------------------------------------------------

    def poke(self) -> None:
        """Something changed: run a full pass soon (several pokes make one pass)."""
        self._full = True
        self._wake.set()

    def act(self) -> None:
        """An operator changed desired state (apply, delete, undo, a rollout action): a
        full pass as soon as pacing allows, without the debounce (operator actions do
        not come in bursts, and a rollout waits for this pass to start)."""
        self._urgent = True
        self.poke()

    def applied(self) -> None:
        """An operator's apply stored new revisions and started their rollouts: their
        first step at once (no debounce), in an incremental pass on the last full pass's
        nodes and scopes when the apply changed no selector (`_start_in`), else in a
        full pass."""
        self._applied = True
        self._wake.set()

    def touched(self, node_ids: Iterable[str]) -> None:
        """These nodes' agents reported (stored): re-judge only them, at once."""
        self._touched.update(node_ids)
        self._wake.set()

    def states_changed(self, node_ids: Iterable[str]) -> None:
        """These nodes' agents' states changed (stored): re-judge them only if a rollout
        is live (only a rollout judges agents by their states; agent syncs come at a
        rate that grows with the fleet). Kept either way: a pass that finds a rollout
        live wakes for the ones that came while it ran."""
        self._touched.update(node_ids)
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
        if self._unrecorded:
            try:
                await self._record_unrecorded(PassResult())
            except Exception:  # the next driver pushes again; the answers repeat
                log.exception("recording the last push answers failed")

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
        # What a previous term here remembered may be stale (another replica drove since,
        # or a pass failed half-way): the first pass of a term is a full one.
        self._forget()
        self.leading = True
        self._on_leader(True)
        log.info("this manager converges desired state")
        while not self._stop.is_set():
            if not await self._db.advisory_lock_held(DESIRED_LOCK):
                log.warning("lost the desired-state lock; competing for it again")
                return
            self._wake.clear()
            result = None if self._full_due() else await self.run_incremental()
            if result is None:
                self._full = self._urgent = False
                started = time.monotonic()
                result = await self.run_once()
                self._full_ended = time.monotonic()
                # Paced by the pass's own work: a daemon slow to answer its push
                # (one waiting for an artifact) must not hold the next change back.
                self._full_spent = max(0.0, self._full_ended - started - result.push_wait)
                interval = self._safety
                if replicas and {"RUNNING", "REVERTING"} & set(result.live_rollouts):
                    # Daemons may report to another replica, which cannot poke this one.
                    interval = self._rollout_poll
                self._next_full = time.monotonic() + interval
            delay = max(0.0, self._next_full - time.monotonic())
            if result.wake_at is not None:
                delay = min(delay, max(0.0, result.wake_at - self._clock()))
            if not await self._idle(delay):
                log.warning("lost the desired-state lock; competing for it again")
                return
            if self._full_due():
                # Let a burst of pokes settle into one full pass, and keep full passes
                # (each O(nodes)) from running back to back.
                await asyncio.sleep(
                    pass_gap(
                        spent=self._full_spent,
                        since=time.monotonic() - self._full_ended,
                        debounce=0.0 if self._urgent or self._applied else self._debounce,
                        pace=self._pace,
                    )
                )

    def _full_due(self) -> bool:
        """Whether the next pass must be a full one."""
        memo = self._memo
        return (
            self._full
            or memo is None
            or time.monotonic() >= self._next_full
            or (memo.backoff_at is not None and self._clock() >= memo.backoff_at)
        )

    def _forget(self) -> None:
        """Drop the memo: the next pass is a full one."""
        self._memo = None

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
        """Scope, rollouts, node sets, pushes (see the module docstring); a full pass,
        which rebuilds what the incremental passes after it start from."""
        async with self._pass_lock:
            await self._clock_stepped()
            self._memo = None
            self._touched.clear()  # this pass reads everything they reported so far
            self._applied = False  # and steps every live rollout
            result = PassResult()
            await self._record_unrecorded(result)
            nodes, scopes, live, selectors = await self._rescope(result)
            memos: dict[int, _RolloutMemo] = {}
            now_ms, undelivered, sets = await self._step_rollouts(
                nodes, scopes, live, result, memos
            )
            answers = await self._push(sets, nodes, result, defer=bool(memos))
            later = [row_at for n, row_at in undelivered.items() if row_at > now_ms and n in nodes]
            self._memo = _Memo(
                nodes=nodes,
                rollouts=memos,
                scopes={name: (selectors[name], scopes[name]) for name in selectors},
                undelivered=set(undelivered) - set(result.pushed),
                backoff_at=min(later) / 1000 if later else None,
            )
            self._memo.answered(answers)
            if result.push_failed:
                self._memo = None  # the retry is a full pass's (backoff per node)
            self.passes += 1
            self._rollouts_live = bool(result.live_rollouts)
            if self._rollouts_live and self._touched:
                self._wake.set()  # states changed during this pass, maybe after it read them
            self._on_pass(result)
            return result

    async def run_incremental(self) -> PassResult | None:
        """Re-judge the live rollouts on what the nodes touched since the last pass
        reported, persist a step with the node sets it changes in one transaction, push
        them: O(nodes touched), not O(fleet); after an apply, the first step of the
        rollouts it started (`_start_in`). None (a full pass is needed instead): no
        memo, a touched node unknown or relabelled, a rollout whose stored row is not
        the one this replica last stored, or an apply that changed more than revisions."""
        async with self._pass_lock:
            if await self._clock_stepped():
                self._memo = None  # the memo holds the rollouts' old times
            memo = self._memo
            if memo is None:
                return None
            applied, self._applied = self._applied, False
            touched, self._touched = self._touched, set()
            ids = touched
            if not ids <= memo.nodes.keys():
                self._memo = None
                return None
            result = PassResult(incremental=True, wake_at=memo.backoff_at)
            names = {m.record.name for m in memo.rollouts.values()}

            async def read(
                tx: DesiredTx,
            ) -> tuple[
                dict[str, NodeRecord],
                dict[str, NodeDesiredRecord],
                list[AssignmentRecord],
                dict[str, list[AgentStateRecord]],
            ]:
                fresh = await tx.nodes(ids) if ids else {}
                rows = await tx.node_desired(ids) if ids else {}
                assigned = await tx.assignments(node_ids=ids) if ids else []
                states = {
                    name: await tx.judged_agents(ids, name) if ids else [] for name in sorted(names)
                }
                return fresh, rows, assigned, states

            # Nothing reported since the last pass (a batch judged on its push answers):
            # no read transaction.
            fresh, rows, assigned, states = (
                await self._repo.run(read, write=False) if ids else ({}, {}, [], {})
            )
            for n in ids:
                node = fresh.get(n)
                if node is None or node.labels != memo.nodes[n].labels:
                    self._memo = None  # gone or relabelled: scopes may change
                    return None
                memo.nodes[n] = node
            now = self._clock()
            now_ms = int(now * 1000)
            pushes: dict[str, tuple[int, list[common_pb2.AgentSpec], int]] = {}
            for m in memo.rollouts.values():
                by_node = {a.node_id: a for a in assigned if a.name == m.record.name}
                agent = {st.node_id: st for st in states.get(m.record.name, [])}
                for n in ids & m.observed.keys():
                    row = rows.get(n)
                    errors, why = (row.update_errors, undelivered(row)) if row else ((), "")
                    m.inputs[n] = (memo.nodes[n], by_node.get(n), agent.get(n), errors, why)
                    m.observed[n] = observe(*m.inputs[n])
            # The last pass's push answers, not recorded yet: the step below is judged on
            # them, and they are recorded in their own transaction while the pushes it
            # leads to go out (see `_record_while`).
            pending = self._unrecorded
            if pending:
                memo.answered(answers_of(pending, rows))
                if applied:  # the apply's first steps read observations from the database
                    await self._record_unrecorded(result)
            for rollout_id in sorted(memo.rollouts):
                m = memo.rollouts[rollout_id]
                step = ro.step(
                    m.rollout, m.progress, m.observed, now, self._unplaced.get(m.record.name, "")
                )
                if step.rollout == m.rollout and not step.nodes and not step.assign:
                    self._note_live(result, step)
                    continue
                if not step.assign:
                    # No pushes follow to record them beside; and a rollout that ends has
                    # the answers it ended on stored when it does.
                    await self._record_unrecorded(result)

                async def body(
                    tx: DesiredTx, m: _RolloutMemo = m, step: ro.Step = step
                ) -> tuple[RolloutRecord, dict[str, tuple[int, list[common_pb2.AgentSpec], int]]]:
                    record = await tx.rollout(m.record.id, for_update=True)
                    if record is None or record != m.record:
                        raise _Stale  # another writer (an operator, another replica)
                    stored = await persist_step(tx, record, step, now_ms)
                    _, sets = await self._refresh_in(tx, memo.nodes, result, now_ms, step.assign)
                    return stored, sets

                try:
                    stored, sets = await self._repo.run_in_one_hop(body)
                except _Stale:
                    self._memo = None
                    await self._record_unrecorded(result)
                    return None
                self._note_live(result, step)
                result.stepped.append(m.record.name)
                result.failed_rollouts += sum(n.kind == "rollout-failed" for n in step.notes)
                pushes.update(sets)
                memo.undelivered.update(sets)
                if step.rollout.state in ro.TERMINAL:
                    del memo.rollouts[rollout_id]
                    continue
                m.record, m.rollout = stored, step.rollout
                m.progress.update(step.nodes)
                m.assign(step.assign, step.rollout.target, now_ms)
            if applied:
                # After the answers above: the new rollouts' observations include them.
                started = await self._repo.run_in_one_hop(
                    lambda tx: self._start_in(tx, memo, result, now)
                )
                if started is None:
                    self._memo = None
                    return None
                stepped, sets = started
                self._took(result, stepped, memo.rollouts)
                pushes.update(sets)
                memo.undelivered.update(sets)
            # A touched node whose answer to a push was lost but that reports the version:
            # delivered (as a full pass would record it).
            lost = [n for n in ids if n in rows and rows[n].delivered_version < rows[n].version]
            lost = [n for n in lost if rows[n].version <= rows[n].reported_version]
            if lost:
                await self._repo.run_in_one_hop(
                    lambda tx: self._refresh_in(tx, memo.nodes, result, now_ms, lost)
                )
                memo.undelivered.difference_update(lost)
            outcomes = await self._record_while(self._pusher.send(pushes, memo.nodes), result)
            if outcomes and all(o.states is not None and not o.error for o in outcomes):
                # Every answer carried the agents: the next pass, due at once, judges
                # its step on them and records them while its own pushes go out.
                self._unrecorded = outcomes
                self._wake.set()
            elif outcomes:
                answers = await self._repo.run_in_one_hop(
                    lambda tx: self._record(tx, outcomes, result)
                )
                memo.answered(answers)
                self._answered(answers)
            if result.push_failed:
                self._memo = None  # the retry with backoff is a full pass's
            result.undelivered = len(memo.undelivered)
            self.passes += 1
            self._rollouts_live = bool(memo.rollouts)
            self._on_pass(result)
            return result

    async def _clock_stepped(self) -> bool:
        """Whether the wall clock was stepped since the last look; if so, every live
        rollout's deadlines were moved with the step (stored) first."""
        step = self._steps.observe(self._clock(), self._monotonic())
        if not step:
            return False
        now_ms = int(self._clock() * 1000)

        async def body(tx: DesiredTx) -> int:
            moved = 0
            for live in await tx.rollouts(live=True, limit=10_000):
                record = await tx.rollout(live.id, for_update=True)
                if record is None or record.ended_ms:
                    continue
                rollout = ro.from_dict(json.loads(record.record))
                progress = {n: progress_of(r) for n, r in (await tx.rollout_nodes(live.id)).items()}
                after, nodes = ro.rebase(rollout, progress, step)
                await persist_step(tx, record, ro.Step(after, nodes), now_ms)
                moved += 1
            return moved

        moved = await self._repo.run(body)
        log.warning("the wall clock jumped %+.1f s: %d live rollout(s) moved with it", step, moved)
        return True

    async def _rescope(
        self, result: PassResult
    ) -> tuple[dict[str, NodeRecord], dict[str, list[str]], list[int], dict[str, Selector]]:
        """Every node (by id), read in the scoping's own read transaction (one hop on
        SQLite, not a query of its own); assign newcomers, drop leavers; each live
        definition's scope, the live rollouts those scopes are for, and the selector of
        each scope (none if a `count` definition is live: see `_Memo.scopes`)."""
        now = self._clock()
        listed: list[NodeRecord] = []
        selectors: dict[str, Selector] = {}

        async def body(
            tx: DesiredTx, write: bool, room: Mapping[str, Candidate] | None
        ) -> tuple[dict[str, list[str]], bool, list[int]]:
            """(scopes, whether assignments change, the live rollouts the scopes are for);
            without `room`, ({}, True, []) as soon as a count definition needs it. The
            first (read) run reads the nodes into `listed`; the write run scopes the same
            ones, as the read decided on them."""
            if not write:
                listed[:] = await tx.all_nodes()
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
            counted = any(c.count for c in checked.values())
            selectors.clear()
            selectors.update({} if counted else {n: c.selector for n, c in checked.items()})
            by_name: dict[str, set[str]] = {}
            for a in current:
                by_name.setdefault(a.name, set()).add(a.node_id)
            requests = {name: c.requests for name, c in checked.items()}
            scopes: dict[str, list[str]] = {}
            unplaced: dict[str, str] = {}
            self._unplaced = unplaced
            for name, c in checked.items():
                held = None
                if c.count:  # what the others placed reserves room, as decided so far
                    placed = [(n, other) for other, ns in by_name.items() for n in ns]
                    held = reservations(placed, requests, exclude=name)
                scope, why = scope_of(c, listed, by_name.get(name, set()), room or {}, now, held)
                scopes[name] = scope
                if why:
                    unplaced[name] = why
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

        scopes, changing, rollouts = await self._repo.run_in_one_hop(
            lambda tx: body(tx, False, None), write=False
        )
        nodes = {n.node_id: n for n in listed}
        if not changing:
            return nodes, scopes, rollouts, selectors
        # A count definition needs the nodes' room (one query), or assignments change:
        # decide again under the write lock (the read may be stale by now).
        room = {c.node_id: c for c in await self._candidates(listed)} if self._candidates else {}
        scopes, _, rollouts = await self._repo.run_in_one_hop(lambda tx: body(tx, True, room))
        return nodes, scopes, rollouts, selectors

    async def _step_rollouts(
        self,
        nodes: Mapping[str, NodeRecord],
        scopes: Mapping[str, Sequence[str]],
        live: Sequence[int],
        result: PassResult,
        memos: dict[int, _RolloutMemo] | None = None,
    ) -> tuple[int, dict[str, int], dict[str, tuple[int, list[common_pb2.AgentSpec], int]]]:
        """Step the `live` rollouts (ids) over the `scopes` computed with them, then bump
        the node sets they changed, in ONE transaction: every node's assignments and node
        row are read once for both (`PassReads`). Each rollout still live afterwards goes
        into `memos`. Returns when (ms) and `_refresh_in`'s (undelivered, sets)."""
        now = self._clock()
        now_ms = int(now * 1000)

        async def body(
            tx: DesiredTx,
        ) -> tuple[
            list[tuple[int, _RolloutMemo, ro.Step, bool]],
            dict[str, int],
            dict[str, tuple[int, list[common_pb2.AgentSpec], int]],
        ]:
            reads = await PassReads.load(tx)
            stepped = []
            for rollout_id in sorted(live):
                one = await self._step_in(tx, rollout_id, nodes, scopes, now, reads)
                if one is not None:
                    stepped.append((rollout_id, *one))
            undelivered, sets = await self._refresh_in(tx, nodes, result, now_ms, None, reads=reads)
            return stepped, undelivered, sets

        stepped, undelivered, sets = await self._repo.run_in_one_hop(body)
        self._took(result, stepped, memos)
        return now_ms, undelivered, sets

    async def _start_in(
        self, tx: DesiredTx, memo: _Memo, result: PassResult, now: float
    ) -> (
        tuple[
            list[tuple[int, _RolloutMemo, ro.Step, bool]],
            dict[str, tuple[int, list[common_pb2.AgentSpec], int]],
        ]
        | None
    ):
        """Take the first step of the rollouts started since the memo was built (an
        apply's) on the memo's nodes and scopes, and bump the node sets it changes, in
        `tx`: no node row read and nothing re-scoped, only the scope's observations.
        None (nothing written: a full pass decides) unless every rollout the memo holds
        is still live and every other live one is of a definition the memo has a scope
        for, whose new revision keeps the selector (an apply that changed only what the
        nodes run). Returns the steps (as `_step_in`'s) and `_refresh_in`'s sets."""
        live = await tx.rollouts(live=True, limit=10_000)
        if not memo.rollouts.keys() <= {r.id for r in live}:
            return None  # one ended or was superseded since this driver stored it
        new = [r for r in live if r.id not in memo.rollouts]
        heads = await tx.definitions([r.name for r in new])
        bodies = await tx.revisions_of({(h.name, h.revision) for h in heads.values()})
        for r in new:
            head, kept = heads.get(r.name), memo.scopes.get(r.name)
            if head is None or head.deleted_ms or head.revision != r.target or kept is None:
                return None
            checked = check_definition(load_definition(bodies[r.name, head.revision].body))
            if checked.count or checked.selector != kept[0]:
                return None
        stepped = []
        for r in sorted(new, key=lambda r: r.id):
            scope = {r.name: memo.scopes[r.name][1]}
            one = await self._step_in(tx, r.id, memo.nodes, scope, now)
            if one is not None:
                stepped.append((r.id, *one))
        moved = sorted({n for _, _, step, _ in stepped for n in step.assign})
        _, sets = await self._refresh_in(tx, memo.nodes, result, int(now * 1000), moved)
        return stepped, sets

    def _took(
        self,
        result: PassResult,
        stepped: Iterable[tuple[int, _RolloutMemo, ro.Step, bool]],
        memos: dict[int, _RolloutMemo] | None,
    ) -> None:
        """Note in `result` the steps `_step_in` took; each rollout still live goes into
        `memos`."""
        for rollout_id, memo, step, persisted in stepped:
            self._note_live(result, step)
            if step.rollout.state not in ro.TERMINAL and memos is not None:
                memos[rollout_id] = memo
            if persisted:
                result.stepped.append(memo.record.name)
                result.failed_rollouts += sum(n.kind == "rollout-failed" for n in step.notes)

    async def _step_in(
        self,
        tx: DesiredTx,
        rollout_id: int,
        nodes: Mapping[str, NodeRecord],
        scopes: Mapping[str, Sequence[str]],
        now: float,
        reads: PassReads | None = None,
    ) -> tuple[_RolloutMemo, ro.Step, bool] | None:
        """Judge one rollout over the definition's scope and persist its step in `tx`
        (None: gone or ended); `reads` (a full pass's) follows the assignments it moves;
        without it, the observations' rows are read for the scope alone."""
        now_ms = int(now * 1000)
        record = await tx.rollout(rollout_id, for_update=True)
        if record is None or record.ended_ms:
            return None
        scope = scopes.get(record.name, ())
        rollout = ro.from_dict(json.loads(record.record))
        progress = {n: progress_of(r) for n, r in (await tx.rollout_nodes(rollout_id)).items()}
        inputs = await observation_inputs(tx, record.name, scope, nodes, reads)
        observed = {n: observe(*i) for n, i in inputs.items()}
        step = ro.step(rollout, progress, observed, now, self._unplaced.get(record.name, ""))
        if step.rollout == rollout and not step.nodes and not step.assign:
            return _RolloutMemo(record, rollout, progress, inputs, observed), step, False
        stored = await persist_step(tx, record, step, now_ms)
        if reads is not None:
            reads.assign(step.assign, record.name, step.rollout.target, now_ms)
        memo = _RolloutMemo(stored, step.rollout, {**progress, **step.nodes}, inputs, observed)
        memo.assign(step.assign, step.rollout.target, now_ms)
        return memo, step, True

    def _specs(
        self,
        assigned: Sequence[AssignmentRecord],
        revisions: Mapping[tuple[str, int], RevisionRecord],
    ) -> list[common_pb2.AgentSpec]:
        """The specs of a node's assignments, each revision parsed once for every node and
        pass (parsing a definition's JSON per node was a tenth of a 500-node pass). Keyed
        by the stored body too, so a memo never outlives what it was parsed from."""
        out = []
        for a in assigned:
            record = revisions.get((a.name, a.revision))
            if record is None or record.deleted:
                continue
            key = (a.name, a.revision, record.body)
            spec = self._parsed.get(key)
            if spec is None:
                spec = self._parsed[key] = pushed_spec(load_definition(record.body), a.revision)
                self.parsed += 1
            out.append(spec)
        return out

    async def _refresh_in(
        self,
        tx: DesiredTx,
        nodes: Mapping[str, NodeRecord],
        result: PassResult,
        now_ms: int,
        only: Collection[str] | None,
        *,
        reads: PassReads | None = None,
    ) -> tuple[dict[str, int], dict[str, tuple[int, list[common_pb2.AgentSpec], int]]]:
        """Bump the version of every node (of `only`, if given) whose managed set changed.

        `reads`: every assignment and node row as this transaction has them (a full
        pass's), instead of reading them.

        Returns the undelivered nodes (with when their push may be retried, ms) and, for
        those due now, what to push: (version, specs, when the row last changed).
        """
        if only is not None and not only:
            return {}, {}
        if reads is not None and only is None:
            current = reads.assignments()
            rows = dict(reads.desired)
        else:
            current = await tx.assignments(node_ids=only)
            rows = await tx.node_desired(only)
        revisions = await tx.revisions_of({(a.name, a.revision) for a in current})
        per_node: dict[str, list[AssignmentRecord]] = {}
        for a in current:
            per_node.setdefault(a.node_id, []).append(a)
        changed = []
        if len(self._parsed) > _PARSED_KEPT:
            self._parsed.clear()  # old revisions: the next pass parses what it needs
        ordered: dict[str, list[common_pb2.AgentSpec]] = {}
        # Nodes with the same assignments have the same set: hashed once, not per node.
        by_assigned: dict[tuple[tuple[str, int], ...], tuple[list[common_pb2.AgentSpec], str]] = {}
        candidates = set(per_node) | set(rows) if only is None else set(only)
        for node_id in sorted(candidates):
            if node_id not in nodes:
                continue
            mine = per_node.get(node_id, [])
            key = tuple((a.name, a.revision) for a in mine)
            known = by_assigned.get(key)
            if known is None:
                known = by_assigned[key] = node_set(self._specs(mine, revisions))
            specs, digest = list(known[0]), known[1]
            ordered[node_id] = specs
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
        undelivered = {
            n: push_retry_at(row.next_push_ms, now_ms)
            for n, row in sorted(rows.items())
            if row.version > row.delivered_version
        }
        result.undelivered = len(undelivered)
        later = [t / 1000 for t in undelivered.values() if t > now_ms]
        if later:  # wake up for the retries backed off
            result.wake_at = _earliest(result.wake_at, min(later))
        due = [n for n, t in undelivered.items() if t <= now_ms and n in ordered]
        return undelivered, {n: (rows[n].version, ordered[n], rows[n].updated_ms) for n in due}

    async def _push(
        self,
        sets: Mapping[str, tuple[int, list[common_pb2.AgentSpec], int]],
        nodes: Mapping[str, NodeRecord],
        result: PassResult,
        *,
        defer: bool = False,
    ) -> dict[str, Answer]:
        """Push each online node its set; record the answers in one transaction. The
        answers that were recorded (refusals; agents when the answer carried them).

        `defer` (a rollout is live): if every answer carried the agents, none is
        recorded here; the next pass, due at once, records them in the transaction of
        the step they lead to, as an incremental pass leaves its answers."""
        started = time.monotonic()
        outcomes = await self._pusher.send(sets, nodes)
        result.push_wait += time.monotonic() - started
        if not outcomes:
            return {}
        if defer and all(o.states is not None and not o.error for o in outcomes):
            self._unrecorded = outcomes
            self._wake.set()
            return {}
        answers = await self._repo.run_in_one_hop(lambda tx: self._record(tx, outcomes, result))
        self._answered(answers)
        return answers

    async def _record(
        self,
        tx: DesiredTx,
        outcomes: Sequence[Outcome],
        result: PassResult,
    ) -> dict[str, Answer]:
        """Record push outcomes in `tx` (`delivery.record`) and note them in `result`."""
        done = await record(tx, outcomes, int(self._clock() * 1000))
        result.pushed.extend(done.pushed)
        result.push_failed.update(done.failed)
        if done.refusals_changed:
            # A rollout waiting on such a node judges the refusal in the next pass, now,
            # not at the safety interval.
            result.wake_at = self._clock()
        return done.answers

    async def _record_while(
        self, pushes: Awaitable[list[Outcome]], result: PassResult
    ) -> list[Outcome]:
        """Await `pushes` (the next batch's) while the last pass's answers, which this
        pass's step was judged on, are recorded in their own transaction (`_record`:
        delivered versions, refusals, the agents and their events), so that write is not
        between two push waves. Until it commits the answers' versions are undelivered:
        a driver killed before pushes them again (a no-op the daemon answers again, as
        for answers a kill lost before any step). A failed write keeps them for the next
        pass (`_record_unrecorded`) and fails this one. An answer whose agents were not
        stored as it came (a newer report, the node gone) is re-read by the next pass."""
        pending = self._unrecorded
        if not pending:
            return await pushes
        recording = asyncio.ensure_future(
            self._repo.run_in_one_hop(lambda tx: self._record(tx, pending, result))
        )
        try:
            outcomes = await pushes
        finally:
            answers = await recording
            self._unrecorded = []
        again = {o.node_id for o in pending if answers.get(o.node_id, ((), None))[1] is None}
        if again:
            self._touched |= again
            self._wake.set()
        return outcomes

    async def _record_unrecorded(self, result: PassResult) -> None:
        """Record the push answers the last incremental pass left (own transaction)."""
        pending = self._unrecorded
        if pending:
            await self._repo.run_in_one_hop(lambda tx: self._record(tx, pending, result))
            self._unrecorded = []

    @staticmethod
    def _note_live(result: PassResult, step: ro.Step) -> None:
        if step.rollout.state not in ro.TERMINAL:
            state = step.rollout.state.value
            result.live_rollouts[state] = result.live_rollouts.get(state, 0) + 1
        if step.wake_at is not None:
            result.wake_at = _earliest(result.wake_at, step.wake_at)

    def _answered(self, answers: Mapping[str, Answer]) -> None:
        """Answers that carried agents were stored: a rollout judges them in the next
        pass, at once (the memo holds them; no report needs to come first)."""
        if any(states is not None for _, states in answers.values()):
            self._wake.set()


class _Stale(Exception):
    """The rollout's row changed since this replica stored it: a full pass decides."""


def _earliest(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)
