"""Rollout decisions as pure functions of plain values and `now`.

A rollout moves the nodes a definition runs on from what they run to one
target revision, in batches gated by health. Everything here is a function
of a `Rollout` record, one `NodeProgress` per node in the rollout's scope,
what the manager observes of each node's agent (`Observation`) and the
time; it returns the next record, the changed node records, the nodes to
move to the target now, and what happened (`Note`s, which the driver turns
into events). The driver (`rollout_driver`) persists a `Step` in one
transaction, so a rollout resumes from the database after a crash and no
node is moved twice.

::

    PENDING ─▶ RUNNING ─(every node done, every instance placed)─▶ SUCCESSFUL
    RUNNING ─(canary batch done, manual promotion)─▶ AWAITING_PROMOTION
    AWAITING_PROMOTION ─promote─▶ RUNNING
    RUNNING ─pause─▶ PAUSED ─resume─▶ RUNNING
    RUNNING ─(a node failed / no progress / abort)─▶ REVERTING   (auto_revert and a good
                                                                   earlier revision)
                                                  └▶ FAILED      (otherwise)
    REVERTING ─(every node back and healthy)─▶ REVERTED
    REVERTING ─(a node failed)─▶ FAILED     (never a second revert: no loops)
    any live state ─(a newer revision applied)─▶ CANCELLED

A node is *done* once it runs the target revision and has been healthy for
`min_healthy_time`; it has *failed* when its daemon reports that it cannot
run the revision, or when it is not done `healthy_deadline` after the
revision was delivered to it (as Kubernetes counts a pod's readiness from
when it got the update). An online node its push cannot reach (its stream
just cut, its listen port unreachable) waits, undelivered, and blocks its
batch: the rollout's reason names it, and `progress_deadline` fails the
rollout if it never gets through. An offline node neither fails nor blocks:
a batch completes without it, and it converges when it returns (a rollout
that ends while such a node is still offline assigns it the revision it
ended on). A revert moves the nodes back in the
same batches and behind the same health gates, the nodes that failed first,
so it never stops a healthy instance before the old revision has proved
healthy on the batch before.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "LIVE",
    "TERMINAL",
    "Amount",
    "NodePhase",
    "NodeProgress",
    "Note",
    "Observation",
    "Rollout",
    "RolloutState",
    "Step",
    "UpdatePolicy",
    "abort",
    "from_dict",
    "pause",
    "plan_batches",
    "promote",
    "rebase",
    "resume",
    "start",
    "step",
    "supersede",
    "to_dict",
]


class RolloutState(enum.Enum):
    """Where a rollout is (see the module docstring for the moves)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    AWAITING_PROMOTION = "AWAITING_PROMOTION"
    SUCCESSFUL = "SUCCESSFUL"
    FAILED = "FAILED"
    REVERTING = "REVERTING"
    REVERTED = "REVERTED"
    CANCELLED = "CANCELLED"


S = RolloutState
TERMINAL = frozenset({S.SUCCESSFUL, S.FAILED, S.REVERTED, S.CANCELLED})
"""States a rollout never leaves."""
LIVE = frozenset(S) - TERMINAL
"""States in which the driver still evaluates a rollout."""


class NodePhase(enum.Enum):
    """Where one node is in a rollout."""

    PENDING = "PENDING"
    """Not moved to the target yet."""
    UPDATING = "UPDATING"
    """Moved to the target; not yet healthy for min_healthy_time."""
    DONE = "DONE"
    """Runs the target and stayed healthy for min_healthy_time (or already ran it)."""
    FAILED = "FAILED"
    """Could not run the target, or not healthy within healthy_deadline."""


@dataclass(frozen=True)
class Amount:
    """A number of nodes, absolute (``5``) or a percentage of the scope (``"25%"``)."""

    value: int
    """The number, or the percentage (0..100)."""
    percent: bool = False
    """True for a percentage."""

    @classmethod
    def parse(cls, text: str | int, *, what: str) -> Amount:
        """``3`` / ``"3"`` / ``"25%"``; ValueError naming `what` if malformed or out of range."""
        raw = str(text).strip()
        percent = raw.endswith("%")
        digits = raw[:-1].strip() if percent else raw
        if not digits.isdigit():
            raise ValueError(f"{what}: expected a number or a percentage like 25%, got {text!r}")
        value = int(digits)
        if percent and value > 100:
            raise ValueError(f"{what}: a percentage must be at most 100%, got {raw}")
        return cls(value, percent)

    def of(self, total: int) -> int:
        """How many of `total` nodes: a percentage rounds up, and is at least 1 if not 0%."""
        if not self.percent:
            return self.value
        if self.value == 0 or total <= 0:
            return 0
        return max(1, math.ceil(total * self.value / 100))

    def __str__(self) -> str:
        return f"{self.value}%" if self.percent else str(self.value)


@dataclass(frozen=True)
class UpdatePolicy:
    """How a new revision rolls out (a definition's `update` table). Durations in seconds."""

    max_parallel: Amount = Amount(25, percent=True)
    """Nodes moved per batch."""
    canary: Amount = Amount(0)
    """Nodes in a first batch that must succeed before the rest (0: no canary batch)."""
    auto_promote: bool = False
    """Continue after the canary batch by itself; otherwise wait for `rollout promote`."""
    min_healthy_time: float = 10.0
    """A node counts as done after staying healthy this long on the new revision."""
    healthy_deadline: float = 300.0
    """A node not done this long after the revision was delivered to it has failed."""
    progress_deadline: float = 600.0
    """The rollout fails if no node becomes done for this long while it waits on one."""
    auto_revert: bool = False
    """On failure, move every node back to the last revision that succeeded."""
    pause_between_batches: float = 0.0
    """Wait this long after a batch completes before the next one."""

    def problems(self) -> list[tuple[str, str]]:
        """(field, what is wrong) for each invalid setting; empty when valid."""
        out: list[tuple[str, str]] = []
        if self.max_parallel.value == 0:
            out.append(("max_parallel", "must move at least one node per batch"))
        for name in ("min_healthy_time", "healthy_deadline", "progress_deadline"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                out.append((name, f"must be a finite number of seconds >= 0, got {value}"))
        if not (math.isfinite(self.pause_between_batches) and self.pause_between_batches >= 0):
            out.append(("pause_between_batches", "must be a finite number of seconds >= 0"))
        if not out and self.healthy_deadline <= self.min_healthy_time:
            out.append(
                (
                    "healthy_deadline",
                    f"must be longer than min_healthy_time ({self.min_healthy_time:g}s),"
                    f" got {self.healthy_deadline:g}s",
                )
            )
        if not out and self.progress_deadline < self.healthy_deadline:
            out.append(
                (
                    "progress_deadline",
                    f"must be at least healthy_deadline ({self.healthy_deadline:g}s),"
                    f" got {self.progress_deadline:g}s",
                )
            )
        return out


@dataclass(frozen=True)
class Rollout:
    """A rollout's record: everything the decisions need besides the nodes."""

    name: str
    """The definition being rolled out."""
    target: int
    """The revision the nodes are moved to (while reverting: the revision moved back to)."""
    previous: int
    """The last revision that succeeded before this rollout (the revert target); 0: none."""
    policy: UpdatePolicy
    """The update policy of the target revision."""
    state: RolloutState = RolloutState.PENDING
    """Where the rollout is."""
    batch: int = -1
    """The current batch (0 is the canary batch when there is one); -1 before the first."""
    batch_done_at: float | None = None
    """When the current batch completed (for the pause between batches); None while in flight."""
    progress_at: float = 0.0
    """The last progress: start, a node done, resume, promote."""
    reverted_from: int = 0
    """While reverting (and once reverted): the revision that failed; 0 otherwise."""
    reason: str = ""
    """Why the rollout is in its state (for FAILED, REVERTING, REVERTED, CANCELLED, PAUSED)."""
    paused_from: RolloutState | None = None
    """While PAUSED: the state `resume` returns to."""
    promoted: bool = False
    """The canary batch was promoted (by an operator, or by `auto_promote`)."""

    @property
    def reverting(self) -> bool:
        """True while (or after) moving nodes back to the previous revision."""
        return self.reverted_from != 0


@dataclass(frozen=True)
class NodeProgress:
    """One node's record in a rollout."""

    phase: NodePhase = NodePhase.PENDING
    """Where the node is."""
    batch: int = -1
    """The batch that moved it (-1: not moved by this rollout)."""
    since: float = 0.0
    """When it entered its phase (for UPDATING: when it was moved, came back online, or
    was last seen undelivered)."""
    offline: bool = False
    """UPDATING while its node is offline: neither failing nor blocking its batch."""
    reason: str = ""
    """Why it failed."""


@dataclass(frozen=True)
class Observation:
    """What the manager knows right now about the definition's agent on one node."""

    online: bool
    """The node is online."""
    assigned: int
    """The revision the manager currently assigns the node (0: none)."""
    running: int
    """The revision the node's agent runs, as its daemon reported (0: none or unknown)."""
    healthy_since: float | None = None
    """Running `running` and healthy without a break since then; None if not healthy."""
    error: str = ""
    """Why the node cannot run `assigned` (refused, artifact, spawn failure); empty if none."""
    detail: str = ""
    """The agent's state in words ("BACKOFF: exited with code 1"), for failure reasons."""
    undelivered: str = ""
    """Why the node's current set has not reached it: the last push's error; "" when it
    was delivered or its push is in flight."""


@dataclass(frozen=True)
class Note:
    """Something that happened, for the event feed (kind as in the event names)."""

    kind: str
    """rollout-started, rollout-batch, rollout-node-failed, rollout-awaiting-promotion,
    rollout-succeeded, rollout-failed, rollout-reverting, rollout-reverted,
    rollout-paused, rollout-resumed, rollout-promoted, rollout-cancelled."""
    message: str
    """One line for people."""
    attributes: Mapping[str, str] = field(default_factory=dict)
    """Details for programs."""
    node_id: str = ""
    """The node it is about, if one."""


@dataclass(frozen=True)
class Step:
    """The outcome of one evaluation: persist it in one transaction, then act on it."""

    rollout: Rollout
    """The rollout's new record."""
    nodes: Mapping[str, NodeProgress]
    """Node records that changed (or are new)."""
    assign: tuple[str, ...] = ()
    """Nodes to move to `rollout.target` now."""
    notes: tuple[Note, ...] = ()
    """What happened, in order."""
    wake_at: float | None = None
    """Evaluate again no later than this, even if nothing is observed to change."""


def rebase(
    r: Rollout, nodes: Mapping[str, NodeProgress], step: float
) -> tuple[Rollout, dict[str, NodeProgress]]:
    """The rollout and its UPDATING nodes after the manager's wall clock was stepped by
    `step` s: their deadlines (healthy, progress, the pause between batches) move with
    it and count the time that passed, not the step. Returns the nodes that moved.

    The agents' health times are the daemons' (their clocks were not stepped) and stay.
    """
    done_at = r.batch_done_at
    moved = dataclasses.replace(
        r,
        progress_at=r.progress_at + step,
        batch_done_at=None if done_at is None else done_at + step,
    )
    return moved, {
        n: dataclasses.replace(p, since=p.since + step)
        for n, p in nodes.items()
        if p.phase is NodePhase.UPDATING
    }


# --- operator actions -------------------------------------------------------------------


def start(
    name: str, target: int, previous: int, policy: UpdatePolicy, now: float
) -> tuple[Rollout, Note]:
    """A new rollout of `target` (PENDING until its first `step`)."""
    rollout = Rollout(name, target, previous, policy, progress_at=now)
    since = f" from revision {previous}" if previous else ""
    return rollout, Note(
        "rollout-started",
        f"{name}: rolling out revision {target}{since} ({_policy_words(policy)})",
        {"revision": str(target), "previous": str(previous)},
    )


def _by(actor: str, why: str) -> str:
    return f"{actor}: {why}" if why else actor


def pause(r: Rollout, now: float, actor: str, why: str = "") -> tuple[Rollout, Note]:
    """Hold a running rollout: no new batch starts; nodes already moved are still judged."""
    if r.state not in (S.RUNNING, S.REVERTING, S.PENDING):
        raise ValueError(f"{r.name}: cannot pause a rollout that is {r.state.value}")
    reason = f"paused by {_by(actor, why)}"
    paused = dataclasses.replace(r, state=S.PAUSED, paused_from=r.state, reason=reason)
    return paused, Note("rollout-paused", f"{r.name}: revision {r.target} {reason}")


def resume(r: Rollout, now: float, actor: str, why: str = "") -> tuple[Rollout, Note]:
    """Continue a paused rollout; the progress deadline counts from now."""
    if r.state is not S.PAUSED:
        raise ValueError(f"{r.name}: only a PAUSED rollout can be resumed; it is {r.state.value}")
    back = r.paused_from or S.RUNNING
    resumed = dataclasses.replace(r, state=back, paused_from=None, progress_at=now, reason="")
    return resumed, Note(
        "rollout-resumed", f"{r.name}: revision {r.target} resumed by {_by(actor, why)}"
    )


def promote(r: Rollout, now: float, actor: str, why: str = "") -> tuple[Rollout, Note]:
    """Let a rollout continue past its canary batch."""
    if r.state is not S.AWAITING_PROMOTION:
        raise ValueError(
            f"{r.name}: only a rollout AWAITING_PROMOTION can be promoted; it is {r.state.value}"
        )
    promoted = dataclasses.replace(r, state=S.RUNNING, progress_at=now, reason="", promoted=True)
    return promoted, Note(
        "rollout-promoted",
        f"{r.name}: canaries of revision {r.target} promoted by {_by(actor, why)}",
    )


def abort(
    r: Rollout,
    progress: Mapping[str, NodeProgress],
    observed: Mapping[str, Observation],
    now: float,
    actor: str,
    why: str = "",
) -> Step:
    """Fail a live rollout now, as if a node had failed (auto_revert applies)."""
    if r.state in TERMINAL:
        raise ValueError(f"{r.name}: the rollout already ended ({r.state.value})")
    current = {n: _admit(r, progress.get(n), obs, now) for n, obs in observed.items()}
    return _failed_step(r, current, {}, [], observed, now, f"aborted by {_by(actor, why)}")


def supersede(r: Rollout, revision: int, now: float) -> tuple[Rollout, Note]:
    """A newer revision was applied: this rollout ends CANCELLED; nodes stay where they are."""
    reason = f"superseded by revision {revision}"
    cancelled = dataclasses.replace(r, state=S.CANCELLED, reason=reason, paused_from=None)
    return cancelled, Note(
        "rollout-cancelled",
        f"{r.name}: rollout of revision {r.target} {reason}",
        {"revision": str(r.target), "superseded_by": str(revision)},
    )


# --- the evaluation ---------------------------------------------------------------------


def step(
    r: Rollout,
    progress: Mapping[str, NodeProgress],
    observed: Mapping[str, Observation],
    now: float,
    unplaced: str = "",
) -> Step:
    """Judge every node, then fail, finish, wait or start the next batch.

    `observed` has one entry per node in the rollout's scope (the nodes the
    definition runs on now); `progress` the stored records, some of which
    may be missing (a node that joined the scope). Records of nodes that
    left the scope are ignored. `unplaced` says why instances of a `count`
    definition are not placed ("" when all are): the rollout does not end
    SUCCESSFUL short of its count; it waits for room as for progress.
    """
    if r.state in TERMINAL:
        return Step(r, {})
    changed: dict[str, NodeProgress] = {}
    notes: list[Note] = []
    # One walk over the scope; everything after it looks only at the nodes in flight and
    # the ones still to move (a batch is judged in O(batch), not O(scope), but for this).
    current: dict[str, NodeProgress] = {}
    updating: list[str] = []  # in `observed`'s order, as the messages name them
    pending: list[str] = []
    for n, obs in observed.items():
        rec = progress.get(n)
        if rec is None:  # a node that joined the scope
            rec = changed[n] = _admit(r, None, obs, now)
        current[n] = rec
        if rec.phase is NodePhase.UPDATING:
            updating.append(n)
        elif rec.phase is NodePhase.PENDING:
            pending.append(n)
    if r.state is S.PENDING:
        r = dataclasses.replace(r, state=S.REVERTING if r.reverting else S.RUNNING)

    # 1. Judge the nodes this rollout moved (judging leaves none PENDING).
    failures: list[tuple[str, str]] = []
    progressed = False
    for n in sorted(updating):
        rec = current[n]
        judged = _judge(r, rec, observed[n], now)
        if judged is not rec:  # _judge returns `rec` itself when nothing changed
            current[n] = changed[n] = judged
            if judged.phase is NodePhase.DONE:
                progressed = True
            elif judged.phase is NodePhase.FAILED:
                failures.append((n, judged.reason))
                notes.append(
                    Note(
                        "rollout-node-failed",
                        f"{r.name}: revision {r.target} failed on {n}: {judged.reason}",
                        {"revision": str(r.target), "reason": judged.reason},
                        node_id=n,
                    )
                )

    if progressed:  # once, not per node done (a batch is many)
        r = dataclasses.replace(r, progress_at=now)

    # 2. A failure, or no progress for too long, fails the rollout.
    if failures:
        node, why = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        reason = f"revision {r.target} failed on {node}{more}: {why}"
        return _failed_step(r, current, changed, notes, observed, now, reason)
    updating = [n for n in updating if current[n].phase is NodePhase.UPDATING]
    waiting = [n for n in updating if not current[n].offline]
    if (
        r.state in (S.RUNNING, S.REVERTING)
        and waiting
        and now - r.progress_at >= r.policy.progress_deadline
    ):
        held = _undelivered(r, waiting, observed)
        reason = (
            f"no progress for {_seconds(r.policy.progress_deadline)} (progress_deadline);"
            f" still waiting on {_names(waiting)}" + (f"; {held}" if held else "")
        )
        return _failed_step(r, current, changed, notes, observed, now, reason)

    # 3. Waiting: paused, awaiting promotion, or a batch in flight.
    wake = _next_deadline(r, current, observed, updating)
    if r.state in (S.PAUSED, S.AWAITING_PROMOTION) or waiting:
        if r.state is S.RUNNING:
            # What the batch waits for beyond health: nodes the push has not reached. (A
            # revert's reason keeps saying why it reverts; a pause's, who paused it.)
            held = _undelivered(r, waiting, observed)
            if held != r.reason:
                r = dataclasses.replace(r, reason=held)
        return Step(r, changed, (), tuple(notes), wake)

    # 4. The canary batch is done: promote by policy, or wait for an operator (even when
    # every other node is offline: they must not get the revision without a promotion).
    remaining = bool(pending)
    if r.batch == 0 and not r.promoted and remaining:
        if not r.policy.auto_promote:
            r = dataclasses.replace(r, state=S.AWAITING_PROMOTION, reason="canaries healthy")
            notes.append(
                Note(
                    "rollout-awaiting-promotion",
                    # For every client (the console has its own Promote button): no command.
                    f"{r.name}: canaries of revision {r.target} are healthy; the rest waits"
                    " for a promotion",
                )
            )
            return Step(r, changed, (), tuple(notes), None)
        r = dataclasses.replace(r, promoted=True)
        notes.append(
            Note(
                "rollout-promoted",
                f"{r.name}: canaries of revision {r.target} promoted automatically",
            )
        )
    pending = [n for n in pending if observed[n].online]  # the ones that can move now
    if not pending:
        unproven = _unproven(r, current)
        if not unproven and (not unplaced or r.reverting):  # a revert ends where the old fit
            return _finished_step(r, current, changed, notes, observed)
        if not unproven:
            # Every placed instance runs the revision, but not as many as the definition
            # asks for: placement retries every pass, and a node it places joins the scope.
            if now - r.progress_at >= r.policy.progress_deadline:
                reason = (
                    f"not every instance of revision {r.target} was placed within"
                    f" {_seconds(r.policy.progress_deadline)} (progress_deadline): {unplaced}"
                )
                return _failed_step(r, current, changed, notes, observed, now, reason)
            r = dataclasses.replace(r, reason=f"waiting for room: {unplaced}")
            return Step(r, changed, (), tuple(notes), r.progress_at + r.policy.progress_deadline)
        # Every node is offline and none proved the revision: it must not become the
        # stable one untested. Wait for one to return, within the progress deadline.
        if now - r.progress_at >= r.policy.progress_deadline:
            reason = (
                f"no node proved revision {r.target} healthy within"
                f" {_seconds(r.policy.progress_deadline)} (progress_deadline); offline:"
                f" {_names(unproven)}"
            )
            return _failed_step(r, current, changed, notes, observed, now, reason)
        reason = f"waiting for a node to prove revision {r.target}; offline: {_names(unproven)}"
        r = dataclasses.replace(r, reason=reason)
        return Step(r, changed, (), tuple(notes), r.progress_at + r.policy.progress_deadline)

    # 5. The pause between batches.
    if r.batch >= 0 and r.policy.pause_between_batches > 0:
        done_at = now if r.batch_done_at is None else r.batch_done_at
        r = dataclasses.replace(r, batch_done_at=done_at)
        resume_at = done_at + r.policy.pause_between_batches
        if now < resume_at:
            return Step(r, changed, (), tuple(notes), resume_at)

    # 6. The next batch.
    scope = len(observed)
    canaries = 0 if r.reverting else r.policy.canary.of(scope)
    if r.batch < 0 and canaries:
        batch_no, size = 0, canaries
    else:
        batch_no, size = max(r.batch + 1, 1), r.policy.max_parallel.of(scope)
    chosen = _order(pending, observed, reverting=r.reverting)[: max(1, size)]
    for n in chosen:
        current[n] = changed[n] = NodeProgress(NodePhase.UPDATING, batch_no, now)
    # A RUNNING rollout's reason says what it waited for; a revert's says why it reverts.
    reason = r.reason if r.reverting else ""
    r = dataclasses.replace(r, batch=batch_no, batch_done_at=None, progress_at=now, reason=reason)
    what = "canary batch" if batch_no == 0 else f"batch {batch_no}"
    verb = "moving back to" if r.reverting else "updating to"
    notes.append(
        Note(
            "rollout-batch",
            f"{r.name}: {what}: {verb} revision {r.target}: {_names(chosen)}",
            {"batch": str(batch_no), "revision": str(r.target), "nodes": ",".join(chosen)},
        )
    )
    wake = _next_deadline(r, current, observed, [*updating, *chosen])
    return Step(r, changed, tuple(chosen), tuple(notes), wake)


# --- helpers ----------------------------------------------------------------------------


def _admit(r: Rollout, rec: NodeProgress | None, obs: Observation, now: float) -> NodeProgress:
    """The record of a node: stored, or new for a node that joined the scope."""
    if rec is not None:
        return rec
    if obs.assigned == r.target:
        return NodeProgress(NodePhase.DONE, -1, now)  # not moved by this rollout
    return NodeProgress(NodePhase.PENDING, -1, now)


def _judge(r: Rollout, rec: NodeProgress, obs: Observation, now: float) -> NodeProgress:
    """An UPDATING node: done, failed, or still updating (offline: on hold)."""
    p = r.policy
    if obs.error:
        return dataclasses.replace(rec, phase=NodePhase.FAILED, since=now, reason=obs.error)
    if not obs.online:
        return rec if rec.offline else dataclasses.replace(rec, offline=True)
    if rec.offline:  # back online: its health deadline counts from now
        return dataclasses.replace(rec, offline=False, since=now)
    if _held(r, obs):
        # Online but the push cannot reach it (a cut stream not yet noticed, an unreachable
        # listen port): the revision is not there to judge. Its health deadline counts from
        # delivery; the batch waits, bounded by progress_deadline.
        return rec if rec.since == now else dataclasses.replace(rec, since=now)
    healthy = obs.running == r.target and obs.healthy_since is not None
    if healthy and obs.healthy_since is not None and now - obs.healthy_since >= p.min_healthy_time:
        # Not dataclasses.replace: a batch's nodes all get here (a tenth of a step's cost).
        return NodeProgress(
            NodePhase.DONE, batch=rec.batch, since=now, offline=rec.offline, reason=rec.reason
        )
    if now - rec.since >= p.healthy_deadline:
        detail = obs.detail
        if obs.running != r.target:
            runs = f"revision {obs.running}" if obs.running else "nothing"
            state = f"it still runs {runs}"
        elif obs.healthy_since is None:
            # The daemon's words are the reason ("BACKOFF: exited with code 3").
            state, detail = obs.detail or "its health checks have not passed", ""
        else:
            state = f"healthy only since {_seconds(now - obs.healthy_since)} ago"
        detail = f" ({detail})" if detail else ""
        reason = f"not healthy within {_seconds(p.healthy_deadline)}: {state}{detail}"
        return dataclasses.replace(rec, phase=NodePhase.FAILED, since=now, reason=reason)
    return rec


def _held(r: Rollout, obs: Observation) -> bool:
    """The node's set is not delivered and it does not run the target (one that does got
    it: what is undelivered is a later change, and its health is judged as usual)."""
    return bool(obs.undelivered) and obs.running != r.target


def _undelivered(
    r: Rollout, nodes: Iterable[str], observed: Mapping[str, Observation], limit: int = 3
) -> str:
    """The waiting nodes the push has not reached, with its error ("" if none)."""
    held = sorted(n for n in nodes if _held(r, observed[n]))
    # The pool's errors start with the node's name; said once.
    words = "; ".join(
        f"{n}: not delivered yet: {observed[n].undelivered.removeprefix(f'{n}: ')}"
        for n in held[:limit]
    )
    more = f" (and {len(held) - limit} more not delivered)" if len(held) > limit else ""
    return words + more


def _order(
    nodes: Iterable[str], observed: Mapping[str, Observation], *, reverting: bool
) -> list[str]:
    """Batch order: by node id; a revert takes the nodes that are worst off first
    (an error reported, then not healthy, then the healthy ones)."""
    if not reverting:
        return sorted(nodes)
    return sorted(
        nodes, key=lambda n: (not observed[n].error, observed[n].healthy_since is not None, n)
    )


def _next_deadline(
    r: Rollout,
    current: Mapping[str, NodeProgress],
    observed: Mapping[str, Observation],
    updating: Iterable[str],
) -> float | None:
    """The earliest moment a time-based decision can change (`updating`: the nodes of
    `current` that may be UPDATING; the others have no deadline)."""
    p = r.policy
    times: list[float] = []
    waiting = False
    for n in updating:
        rec = current[n]
        if rec.phase is not NodePhase.UPDATING or rec.offline:
            continue
        waiting = True
        obs = observed[n]
        if _held(r, obs):
            continue  # its deadline counts from delivery (a push retry's pass judges it)
        times.append(rec.since + p.healthy_deadline)
        if obs.running == r.target and obs.healthy_since is not None:
            times.append(obs.healthy_since + p.min_healthy_time)
    if waiting and r.state in (S.RUNNING, S.REVERTING):
        times.append(r.progress_at + p.progress_deadline)
    return min(times) if times else None


def _failed_step(
    r: Rollout,
    current: Mapping[str, NodeProgress],
    changed: dict[str, NodeProgress],
    notes: list[Note],
    observed: Mapping[str, Observation],
    now: float,
    reason: str,
) -> Step:
    """The rollout failed: revert if the policy says so and there is something to go back to."""
    p = r.policy
    if r.reverting:
        reason = f"reverting to revision {r.target} failed: {reason}; stopped, no further revert"
    elif p.auto_revert and not r.previous:
        reason += "; no earlier revision succeeded, so there is nothing to revert to"
    if r.reverting or not p.auto_revert or not r.previous:
        failed = dataclasses.replace(r, state=S.FAILED, paused_from=None, reason=reason)
        notes.append(Note("rollout-failed", f"{r.name}: {reason}", {"revision": str(r.target)}))
        return Step(failed, changed, (), tuple(notes), None)
    # Revert: every node not on the previous revision goes back, in batches, the worst first.
    reverting = Rollout(
        name=r.name,
        target=r.previous,
        previous=r.previous,
        policy=p,
        state=S.REVERTING,
        progress_at=now,
        reverted_from=r.target,
        reason=reason,
    )
    back: dict[str, NodeProgress] = {}
    for n in current:
        on_previous = observed[n].assigned == r.previous
        back[n] = NodeProgress(NodePhase.DONE if on_previous else NodePhase.PENDING, -1, now)
    notes.append(Note("rollout-failed", f"{r.name}: {reason}", {"revision": str(r.target)}))
    notes.append(
        Note(
            "rollout-reverting",
            f"{r.name}: reverting to revision {r.previous} (auto_revert)",
            {"revision": str(r.previous), "failed_revision": str(r.target)},
        )
    )
    first = step(reverting, back, observed, now)
    changed.update(back)
    changed.update(first.nodes)
    return Step(first.rollout, changed, first.assign, (*notes, *first.notes), first.wake_at)


def _unproven(r: Rollout, current: Mapping[str, NodeProgress]) -> list[str]:
    """The (offline) nodes left when a rollout would end with none of them proven.

    Empty when a node is DONE, when nothing is in scope, or while reverting (its target
    was proven before).
    """
    if r.reverting or not current or any(p.phase is NodePhase.DONE for p in current.values()):
        return []
    return sorted(current)


def _finished_step(
    r: Rollout,
    current: Mapping[str, NodeProgress],
    changed: dict[str, NodeProgress],
    notes: list[Note],
    observed: Mapping[str, Observation],
) -> Step:
    offline = sorted(
        n
        for n, rec in current.items()
        if (rec.phase is NodePhase.PENDING and not observed[n].online) or rec.offline
    )
    later = (
        f"; {len(offline)} offline node(s) will converge when they return: {_names(offline)}"
        if offline
        else ""
    )
    # The offline nodes never moved are assigned the revision the rollout ended on now: the
    # manager delivers it when they are back, as to a node that comes into scope. Left on
    # their old assignment, nothing would ever move them (the rollout has ended).
    deferred = tuple(
        sorted(
            n
            for n, rec in current.items()
            if rec.phase is NodePhase.PENDING
            and not observed[n].online
            and observed[n].assigned != r.target
        )
    )
    if r.reverting:
        done = dataclasses.replace(
            r, state=S.REVERTED, reason=f"{r.reason}; reverted to revision {r.target}{later}"
        )
        notes.append(
            Note(
                "rollout-reverted",
                f"{r.name}: back on revision {r.target} after revision {r.reverted_from}"
                f" failed{later}",
                {"revision": str(r.target), "failed_revision": str(r.reverted_from)},
            )
        )
    else:
        done = dataclasses.replace(r, state=S.SUCCESSFUL, reason=later.removeprefix("; "))
        notes.append(
            Note(
                "rollout-succeeded",
                f"{r.name}: revision {r.target} rolled out to {len(current) - len(offline)}"
                f" node(s){later}",
                {"revision": str(r.target), "offline": ",".join(offline)},
            )
        )
    return Step(done, changed, deferred, tuple(notes), None)


def _names(nodes: Iterable[str], limit: int = 5) -> str:
    items = sorted(nodes)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _seconds(value: float) -> str:
    if value >= 120 and value % 60 == 0:
        return f"{value / 60:g}m"
    return f"{value:g}s"


def _policy_words(p: UpdatePolicy) -> str:
    parts = [f"max_parallel {p.max_parallel}"]
    if p.canary.value:
        parts.append(f"canary {p.canary}" + (" auto-promoted" if p.auto_promote else ""))
    parts.append(f"min_healthy_time {_seconds(p.min_healthy_time)}")
    if p.auto_revert:
        parts.append("auto_revert")
    return ", ".join(parts)


# --- planning and storage -----------------------------------------------------------------


def plan_batches(policy: UpdatePolicy, scope: int, nodes: Iterable[str]) -> list[list[str]]:
    """The batches a rollout would make of `nodes` (the online nodes to move, in order)
    when the definition runs on `scope` nodes: the canary batch first, if any."""
    order = sorted(nodes)
    batches: list[list[str]] = []
    canaries = policy.canary.of(scope)
    if canaries and order:
        batches.append(order[:canaries])
        order = order[canaries:]
    size = max(1, policy.max_parallel.of(scope))
    batches.extend(order[i : i + size] for i in range(0, len(order), size))
    return batches


def to_dict(r: Rollout) -> dict[str, object]:
    """A rollout record as plain JSON-ready values."""
    p = r.policy
    return {
        "name": r.name,
        "target": r.target,
        "previous": r.previous,
        "state": r.state.value,
        "batch": r.batch,
        "batch_done_at": r.batch_done_at,
        "progress_at": r.progress_at,
        "reverted_from": r.reverted_from,
        "reason": r.reason,
        "paused_from": r.paused_from.value if r.paused_from else None,
        "promoted": r.promoted,
        "policy": {
            "max_parallel": str(p.max_parallel),
            "canary": str(p.canary),
            "auto_promote": p.auto_promote,
            "min_healthy_time": p.min_healthy_time,
            "healthy_deadline": p.healthy_deadline,
            "progress_deadline": p.progress_deadline,
            "auto_revert": p.auto_revert,
            "pause_between_batches": p.pause_between_batches,
        },
    }


def from_dict(data: Mapping[str, Any]) -> Rollout:
    """The inverse of `to_dict`."""
    p = data["policy"]
    policy = UpdatePolicy(
        max_parallel=Amount.parse(p["max_parallel"], what="max_parallel"),
        canary=Amount.parse(p["canary"], what="canary"),
        auto_promote=bool(p["auto_promote"]),
        min_healthy_time=float(p["min_healthy_time"]),
        healthy_deadline=float(p["healthy_deadline"]),
        progress_deadline=float(p["progress_deadline"]),
        auto_revert=bool(p["auto_revert"]),
        pause_between_batches=float(p["pause_between_batches"]),
    )
    done_at = data["batch_done_at"]
    paused_from = data["paused_from"]
    return Rollout(
        name=str(data["name"]),
        target=int(data["target"]),
        previous=int(data["previous"]),
        policy=policy,
        state=RolloutState(data["state"]),
        batch=int(data["batch"]),
        batch_done_at=None if done_at is None else float(done_at),
        progress_at=float(data["progress_at"]),
        reverted_from=int(data["reverted_from"]),
        reason=str(data["reason"]),
        paused_from=None if paused_from is None else RolloutState(paused_from),
        promoted=bool(data["promoted"]),
    )
