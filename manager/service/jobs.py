"""Jobs: the pure decisions. Plain values and `now` in, plain values out.

A job's targets move through these states (the table `ALLOWED` enforces it):

    PENDING --dispatch--> QUEUED --> RUNNING --> SUCCESS | FAILED | TIMEOUT | CANCELLED
       |                    |__________|__________^ (the node reports; or the lost-node rule)
       +--> FAILED (jobs disabled on the node; the daemon refused it)
       +--> SKIPPED (max_errors reached; the canary stage failed)
       +--> UNDELIVERABLE (node unreachable until the delivery timeout)
       +--> CANCELLED (an operator cancelled it before it was sent)

`plan` decides, for one job at `now`, which targets change state without
the node (skips, undeliverables, lost nodes, jobs disabled) and which to
send now; `job_state` derives the job's state from its targets' counts.
`JobTargets` keeps one job's targets for the driver and plans a pass as
`plan` would without walking them all when nothing a walk reads changed.
The driver (`manager.service.job_driver`) applies what they say.

**The lost-node rule.** A QUEUED or RUNNING target whose node stops
reporting must not keep the job running forever. Such a target ends:
- when its node has been offline (the sweeper's verdict) for longer than
  the job's delivery timeout: FAILED (CANCELLED if a cancel was asked),
  "node lost: offline since ...";
- when it has been RUNNING longer than the job's execution timeout plus
  `LOST_GRACE` with no final report although its node is online (the daemon
  enforces the timeout and reports the end, so its silence means the report
  was lost for good): FAILED, "no result ...".
A late report of a target that ended this way changes nothing (terminal
states are final).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from manager.service.rollout import Amount

__all__ = [
    "ALLOWED",
    "COUNTS_AS_ERROR",
    "DEFAULT_DELIVERY_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "LOST_GRACE",
    "TERMINAL",
    "JobLimits",
    "JobState",
    "JobTargets",
    "NodeFacts",
    "OutputAccepted",
    "Plan",
    "Target",
    "TargetState",
    "accept_output",
    "foreseen",
    "format_time",
    "job_id_problem",
    "job_state",
    "plan",
    "replans",
    "resolve_concurrency",
    "retry_delay",
    "stages",
    "transition_allowed",
]

DEFAULT_DELIVERY_TIMEOUT = 300.0
"""Seconds a job waits for an unreachable node (JobSpec.delivery_timeout_seconds)."""
DEFAULT_TIMEOUT = 3600.0
"""Execution timeout per target (JobSpec.timeout_seconds)."""
LOST_GRACE = 120.0
"""A RUNNING target silent this long past its execution timeout is lost."""


class TargetState(enum.StrEnum):
    """Where one target is (JobTargetState without its prefix)."""

    PENDING = "PENDING"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"
    SKIPPED = "SKIPPED"
    UNDELIVERABLE = "UNDELIVERABLE"


class JobState(enum.StrEnum):
    """A job's derived state (JobState without its prefix)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    PARTIAL = "PARTIAL"
    CANCELLED = "CANCELLED"


T = TargetState
TERMINAL: frozenset[TargetState] = frozenset(
    {T.SUCCESS, T.FAILED, T.TIMEOUT, T.CANCELLED, T.SKIPPED, T.UNDELIVERABLE}
)
"""Final states: nothing changes a target in one of them."""
COUNTS_AS_ERROR: frozenset[TargetState] = frozenset({T.FAILED, T.TIMEOUT})
"""What max_errors counts (UNDELIVERABLE and CANCELLED do not)."""

ALLOWED: Mapping[TargetState, frozenset[TargetState]] = {
    T.PENDING: frozenset({T.QUEUED, T.RUNNING} | TERMINAL),
    T.QUEUED: frozenset({T.RUNNING, T.SUCCESS, T.FAILED, T.TIMEOUT, T.CANCELLED}),
    T.RUNNING: frozenset({T.SUCCESS, T.FAILED, T.TIMEOUT, T.CANCELLED}),
    **{s: frozenset() for s in TERMINAL},
}
"""From each state, the states a target may move to (a report or decision that
would move it elsewhere is stale and changes nothing)."""


def transition_allowed(current: TargetState, new: TargetState) -> bool:
    """True if a target in `current` may move to `new` (same state: an update, allowed
    unless terminal)."""
    if current == new:
        return current not in TERMINAL
    return new in ALLOWED[current]


def format_time(seconds: float) -> str:
    """A UTC timestamp for reasons ("2026-12-13 10:15:30Z")."""
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(seconds))


def resolve_concurrency(text: str, total: int) -> int:
    """Targets running at once: "10", "25%" of `total`, or every target when empty.

    ValueError (naming max_concurrency) when malformed or zero.
    """
    if not text.strip():
        return max(total, 1)
    amount = Amount.parse(text, what="max_concurrency")
    if amount.value == 0:
        raise ValueError("max_concurrency: must allow at least one target (1 or 1%), got 0")
    return max(1, amount.of(total))


def stages(node_ids: Iterable[str], canary: int) -> list[tuple[str, int]]:
    """(node, stage) in the job's order: the first `canary` nodes are stage 0."""
    return [(n, 0 if i < canary else 1) for i, n in enumerate(node_ids)]


def retry_delay(attempts: int) -> float:
    """Seconds before the next StartJob to a node that could not be reached
    `attempts` times in a row (1, 2, 4 ... 15)."""
    return float(min(15.0, 2.0 ** max(0, attempts - 1)))


@dataclass(frozen=True)
class Target:
    """What `plan` needs of one target."""

    node_id: str
    """The node."""
    state: TargetState = TargetState.PENDING
    """Where it is."""
    stage: int = 1
    """0: the canary stage; 1: the rest."""
    attempts: int = 0
    """StartJob attempts that could not reach the node (reset when it answers)."""
    next_attempt: float = 0.0
    """Not sent again before this time."""
    updated: float = 0.0
    """When the manager last changed it or heard of it (RUNNING: when it started)."""
    cancel_requested: bool = False
    """An operator asked to cancel it."""
    last_error: str = ""
    """Why the last of `attempts` failed ("" if none did)."""


@dataclass(frozen=True)
class NodeFacts:
    """What the manager knows of a target's node."""

    online: bool = True
    """The sweeper's verdict."""
    last_seen: float = 0.0
    """Its last heartbeat or registration (offline: roughly since when)."""
    jobs_disabled: bool = False
    """Its daemon refuses remote jobs."""
    known: bool = True
    """The node is registered (a deleted node is never reachable)."""


@dataclass(frozen=True)
class JobLimits:
    """A job's settings as `plan` applies them. Times in seconds."""

    created: float
    """When the job started."""
    concurrency: int
    """Targets QUEUED, RUNNING or being sent at once."""
    max_errors: int = 0
    """FAILED + TIMEOUT targets that stop launching (0: no limit)."""
    delivery_timeout: float = DEFAULT_DELIVERY_TIMEOUT
    """An unreachable node's target is UNDELIVERABLE this long after `created`."""
    timeout: float = DEFAULT_TIMEOUT
    """The execution timeout (for the lost-node rule)."""


@dataclass(frozen=True)
class Plan:
    """What to do with a job now."""

    changes: dict[str, tuple[TargetState, str]] = field(default_factory=dict)
    """Targets to move without the node: node -> (new state, reason)."""
    dispatch: list[str] = field(default_factory=list)
    """Targets to send now (StartJob), in the job's order."""
    wake_at: float | None = None
    """The earliest time a decision can change without a report (None: only a report
    or a node coming back can change one)."""
    reason: str = ""
    """Why the job stops launching targets ("max_errors=3 reached: ..."), if it does."""
    counts: dict[TargetState, int] = field(default_factory=dict)
    """How many targets are in each state once `changes` are applied (the driver
    derives the job's state from them without another walk of the targets)."""
    ready: list[str] = field(default_factory=list)
    """Targets sendable now that the window has no room for, in the job's order: the
    next `dispatch` as slots free while nothing else changes (`JobTargets`)."""
    ready_until: float | None = None
    """When a target beyond the window leaves its retry backoff (then `ready` may
    miss it); None: none waits."""


_UNKNOWN = NodeFacts(online=False, known=False)
"""A node `plan` is not told of: never reachable (made once: it runs for every target)."""


def _names(targets: Iterable[Target], limit: int = 5) -> str:
    listed = [f"{t.node_id} {t.state.value}" for t in targets]
    shown = ", ".join(listed[:limit])
    return shown + (f" and {len(listed) - limit} more" if len(listed) > limit else "")


def _soonest(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)


def plan(
    targets: Mapping[str, Target],
    nodes: Mapping[str, NodeFacts],
    limits: JobLimits,
    now: float,
    *,
    in_flight: Collection[str] = (),
    cancelled: bool = False,
) -> Plan:
    """Decide for one job at `now` (see the module docstring).

    `targets` in the job's order; `nodes` by node id (a node missing is
    treated as unknown: never reachable); `in_flight`: targets whose StartJob
    is being sent (they hold a window slot); `cancelled`: the whole job was
    cancelled (nothing more is sent).
    """
    changes: dict[str, tuple[TargetState, str]] = {}
    wake: float | None = None
    after: dict[str, Target] = dict(targets)

    counts: dict[TargetState, int] = dict.fromkeys(TargetState, 0)
    # Enum members as locals: `T.PENDING` is a class attribute lookup through the enum's
    # metaclass (~75 ns on 3.11), and the loops below make several per target per pass.
    PENDING, QUEUED, RUNNING, FAILED, TIMEOUT = T.PENDING, T.QUEUED, T.RUNNING, T.FAILED, T.TIMEOUT

    def move(t: Target, state: TargetState, reason: str) -> None:
        changes[t.node_id] = (state, reason)
        after[t.node_id] = Target(t.node_id, state, t.stage)

    def skip(t: Target, reason: str) -> None:
        # A PENDING target (as counted in the pass) moved after the pass.
        move(t, T.SKIPPED, reason)
        counts[T.PENDING] -= 1
        counts[T.SKIPPED] += 1

    # One pass over the targets (the driver plans after every few answers): the
    # decisions of the lost-node rule and the delivery timeout, and what the rest needs
    # of the targets as they are after them. Ended targets cost a few comparisons.
    pending: list[Target] = []  # PENDING after the pass, in the job's order
    canary_ids: list[str] = []  # stage 0
    errors = busy = 0
    deadline = limits.created + limits.delivery_timeout
    for t in targets.values():
        state = t.state
        if t.stage == 0:
            canary_ids.append(t.node_id)
        if state is PENDING:
            facts = nodes.get(t.node_id, _UNKNOWN)
            if t.cancel_requested:
                state = T.CANCELLED
                move(t, state, "cancelled before it was sent to the node")
            elif facts.jobs_disabled:
                state = FAILED
                move(
                    t,
                    state,
                    f"{t.node_id} refuses remote jobs (its daemon has [jobs] enabled = false)",
                )
            elif t.node_id in in_flight:
                pass
            elif not facts.known:
                state = T.UNDELIVERABLE
                move(t, state, f"node {t.node_id} is not registered any more")
            elif (not facts.online or t.attempts) and now >= deadline:
                since = (
                    f"offline since {format_time(facts.last_seen)}"
                    if not facts.online
                    else f"unreachable ({t.attempts} attempt(s) failed"
                    + (f", the last: {t.last_error})" if t.last_error else ")")
                )
                state = T.UNDELIVERABLE
                move(
                    t,
                    state,
                    f"node {since}; not delivered within the delivery timeout of "
                    f"{limits.delivery_timeout:g}s (does not count against max_errors)",
                )
            elif not facts.online or t.attempts:
                wake = _soonest(wake, deadline)
        elif state is QUEUED or state is RUNNING:
            facts = nodes.get(t.node_id, _UNKNOWN)
            lost_at = _lost_at(t, facts, limits)
            if now >= lost_at:
                state = T.CANCELLED if t.cancel_requested else FAILED
                move(t, state, _lost(t, facts, limits))
            elif wake is None or lost_at < wake:
                wake = lost_at
        counts[state] += 1
        if state is PENDING:
            pending.append(t)
        elif state is QUEUED or state is RUNNING:
            busy += 1
        elif state is FAILED or state is TIMEOUT:  # COUNTS_AS_ERROR
            errors += 1

    # max_errors: once reached, nothing PENDING is launched any more.
    stop_reason = ""
    if limits.max_errors and errors >= limits.max_errors:
        failed = [t for t in after.values() if t.state in COUNTS_AS_ERROR]
        stop_reason = (
            f"max_errors={limits.max_errors} reached: {len(failed)} target(s) failed or "
            f"timed out ({_names(failed)})"
        )
        for t in pending:
            if t.node_id not in in_flight:
                skip(t, stop_reason)

    # The canary stage: stage 1 waits until stage 0 is all terminal, then runs only
    # if stage 0 all succeeded.
    canary = [after[n] for n in canary_ids]
    canary_open = any(t.state not in TERMINAL for t in canary)
    failed_canary = [t for t in canary if t.state in TERMINAL and t.state is not T.SUCCESS]
    if not canary_open and failed_canary:
        reason = f"the canary stage failed: {_names(failed_canary)}"
        stop_reason = stop_reason or reason
        for t in pending:
            if t.stage == 1 and after[t.node_id].state is T.PENDING and t.node_id not in in_flight:
                skip(t, reason)

    dispatch: list[str] = []
    ready: list[str] = []  # sendable beyond the window
    ready_until: float | None = None
    if not cancelled:
        busy += sum(1 for n in in_flight if n in after and after[n].state is PENDING)
        room = limits.concurrency - busy
        for t in pending:
            if t.node_id in in_flight or after[t.node_id].state is not PENDING:
                continue
            if t.stage == 1 and canary_open:
                break  # targets are in order: every later one is stage 1 too
            facts = nodes.get(t.node_id, _UNKNOWN)
            if not facts.online:
                continue  # waits for its node (or the delivery timeout)
            if t.next_attempt > now:
                if room > 0:
                    wake = _soonest(wake, t.next_attempt)
                else:
                    ready_until = _soonest(ready_until, t.next_attempt)
                continue
            if room > 0:
                dispatch.append(t.node_id)
                room -= 1
            else:
                ready.append(t.node_id)
    return Plan(
        changes,
        dispatch,
        wake,
        stop_reason,
        {s: n for s, n in counts.items() if n},
        ready,
        ready_until,
    )


def foreseen(node_id: str, facts: NodeFacts, delivery_timeout: float) -> str:
    """What a job's plan can say of one target from its node as it is now ("": nothing),
    in the words `plan` would use for what then happens to it."""
    if facts.jobs_disabled:
        return f"will fail: {node_id} refuses remote jobs (its daemon has [jobs] enabled = false)"
    if not facts.online:
        return (
            f"offline since {format_time(facts.last_seen)}: runs if it returns within the"
            f" delivery timeout of {delivery_timeout:g}s, else UNDELIVERABLE"
        )
    return ""


def replans(was: Target, now: Target) -> bool:
    """Whether `plan` may decide differently once `now` replaces `was` (the same target):
    not when it was final and stays in that state, since `plan` reads nothing else of a
    final target (the driver skips the pass a commit of an end it already had would
    cost; pure)."""
    return now.state is not was.state or now.state not in TERMINAL


_RUNNING = T.RUNNING
_NEVER = float("inf")


def _lost_at(t: Target, facts: NodeFacts, limits: JobLimits) -> float:
    if not facts.online:
        return facts.last_seen + limits.delivery_timeout
    if t.state is _RUNNING:
        return t.updated + limits.timeout + LOST_GRACE
    return _NEVER  # QUEUED on an online node: it may wait for a lock for long


def _lost(t: Target, facts: NodeFacts, limits: JobLimits) -> str:
    """Why a QUEUED/RUNNING target past `_lost_at` is lost (the lost-node rule)."""
    if not facts.online:
        return (
            f"node lost: {t.node_id} offline since {format_time(facts.last_seen)} while the "
            f"target was {t.state.value}, longer than the delivery timeout of "
            f"{limits.delivery_timeout:g}s"
        )
    return (
        f"no result from {t.node_id}: RUNNING since {format_time(t.updated)}, past the "
        f"timeout of {limits.timeout:g}s plus {LOST_GRACE:g}s"
    )


class JobTargets:
    """One job's targets as the driver keeps them, planned a pass in O(window), not
    O(targets) (pure: plain values and `now` in, no I/O, no clock).

    `plan` walks every target (`plan`, the function) only when something since its
    last walk may change a decision: the node facts (a new mapping), the job's
    cancel, `now` reaching a time that walk named (a deadline, a lost node, a retry),
    a target moved other than on its usual way (see `_quiet`), or that walk's
    changes coming back. Otherwise the pass is what that walk would decide: no
    changes, and the window refilled from its `Plan.ready`, in the job's order.
    The counts per state follow every `put`.
    """

    __slots__ = (
        "_cancelled",
        "_nodes",
        "_ready",
        "_reason",
        "_stale",
        "_until",
        "counts",
        "limits",
        "targets",
        "walks",
    )

    def __init__(self, targets: Mapping[str, Target], limits: JobLimits) -> None:
        self.targets: dict[str, Target] = dict(targets)
        """The targets in the job's order (read only: change them with `put`)."""
        self.limits = limits
        self.counts: dict[TargetState, int] = dict.fromkeys(TargetState, 0)
        """Targets in each state (zeros included)."""
        for t in self.targets.values():
            self.counts[t.state] += 1
        self.walks = 0
        """Passes that walked every target (for tests and the benchmark)."""
        self._ready: collections.deque[str] = collections.deque()
        self._stale = True
        self._nodes: Mapping[str, NodeFacts] | None = None
        self._cancelled = False
        self._until = _NEVER  # the last walk holds before this time
        self._reason = ""

    def __len__(self) -> int:
        return len(self.targets)

    def put(self, target: Target) -> None:
        """Replace the target of `target.node_id` (one of the job's)."""
        was = self.targets[target.node_id]
        self.targets[target.node_id] = target
        if was.state is not target.state:
            self.counts[was.state] -= 1
            self.counts[target.state] += 1
        if not self._stale and not self._quiet(was, target):
            self._stale = True

    def replan(self) -> None:
        """Walk every target at the next `plan`: a change `put` does not show (a target
        whose StartJob ended with nothing stored is PENDING and sendable again)."""
        self._stale = True

    def _quiet(self, was: Target, now: Target) -> bool:
        """Whether the last walk still decides as a walk would with `now` for `was`:
        a target sent, started or ended as usual. Its new lost-node time is kept."""
        if was.stage == 0 or was.cancel_requested is not now.cancel_requested:
            return False  # the canary stage's outcome; a cancel
        if was.state in TERMINAL:
            return now.state is was.state  # final: `plan` reads only its state
        state = now.state
        if state is T.PENDING:
            return now == was  # a retry's backoff; a target back from in flight
        if state is T.QUEUED or state is T.RUNNING:
            assert self._nodes is not None  # not stale: walked with these facts
            lost_at = _lost_at(now, self._nodes.get(now.node_id, _UNKNOWN), self.limits)
            self._until = min(self._until, lost_at)
            return True
        return not (self.limits.max_errors and state in COUNTS_AS_ERROR)

    def plan(
        self,
        nodes: Mapping[str, NodeFacts],
        now: float,
        *,
        in_flight: Collection[str] = (),
        cancelled: bool = False,
    ) -> Plan:
        """`plan(self.targets, nodes, self.limits, now, ...)` but for `wake_at`, which
        may be earlier; `nodes` is a new mapping whenever a node's facts change. The
        targets it dispatches are taken to be in flight from now on."""
        if (
            self._stale
            or nodes is not self._nodes
            or cancelled != self._cancelled
            or now >= self._until
        ):
            return self._walk(nodes, now, in_flight, cancelled)
        targets, counts, ready = self.targets, self.counts, self._ready
        PENDING = T.PENDING
        room = self.limits.concurrency - counts[T.QUEUED] - counts[T.RUNNING]
        room -= sum(1 for n in in_flight if n in targets and targets[n].state is PENDING)
        dispatch: list[str] = []
        while room > 0 and ready:
            node_id = ready.popleft()
            if node_id in in_flight or targets[node_id].state is not PENDING:
                continue  # sent or moved since the walk (a move that matters made it stale)
            dispatch.append(node_id)
            room -= 1
        return Plan(
            {},
            dispatch,
            None if self._until == _NEVER else self._until,
            self._reason,
            {s: n for s, n in counts.items() if n},
        )

    def _walk(
        self,
        nodes: Mapping[str, NodeFacts],
        now: float,
        in_flight: Collection[str],
        cancelled: bool,
    ) -> Plan:
        self.walks += 1
        p = plan(self.targets, nodes, self.limits, now, in_flight=in_flight, cancelled=cancelled)
        self._ready = collections.deque(p.ready)
        self._nodes, self._cancelled, self._reason = nodes, cancelled, p.reason
        until = min(
            _NEVER if p.wake_at is None else p.wake_at,
            _NEVER if p.ready_until is None else p.ready_until,
        )
        self._until = until
        self._stale = bool(p.changes)  # they come back as `put`s: walk after them
        if p.ready_until is not None and (p.wake_at is None or p.ready_until < p.wake_at):
            # A target beyond the window leaves its backoff then: a pass must look.
            p = dataclasses.replace(p, wake_at=until)
        return p


def job_state(counts: Mapping[TargetState, int], *, cancelled: bool = False) -> JobState:
    """A job's state from how many targets are in each state.

    PENDING until a target leaves PENDING; RUNNING while any target is not
    final; then CANCELLED if an operator cancelled the whole job, SUCCESS if
    every target succeeded, PARTIAL if some did, FAILED if none did.
    """
    total = sum(counts.values())
    pending = counts.get(T.PENDING, 0)
    live = pending + counts.get(T.QUEUED, 0) + counts.get(T.RUNNING, 0)
    if live:
        return JobState.PENDING if pending == total and not cancelled else JobState.RUNNING
    if cancelled:
        return JobState.CANCELLED
    success = counts.get(T.SUCCESS, 0)
    if total and success == total:
        return JobState.SUCCESS
    return JobState.PARTIAL if success else JobState.FAILED


@dataclass(frozen=True)
class OutputAccepted:
    """What to store of an uploaded chunk (`accept_output`)."""

    skip: int
    """Leading bytes of the chunk already stored."""
    keep: int
    """Bytes to store after those (at the stored end)."""
    stored: int
    """The stored output's end afterwards."""
    acked: int
    """What to acknowledge: everything before it is stored or deliberately cut."""
    truncated: bool
    """The output reached the bound: the node should stop sending."""


def accept_output(
    *, stored: int, truncated: bool, offset: int, size: int, bound: int
) -> OutputAccepted:
    """Decide what of a chunk of `size` bytes at `offset` to store, given the target's
    stored end and the bound. ValueError for a chunk that would leave a gap."""
    end = offset + size
    if truncated:
        return OutputAccepted(0, 0, stored, max(stored, end) if offset <= stored else stored, True)
    if offset > stored:
        raise ValueError(
            f"offset {offset} leaves a gap: the manager has stored up to {stored}; "
            f"send from {stored}"
        )
    skip = min(size, stored - offset)
    room = max(0, bound - stored)
    keep = min(size - skip, room)
    cut = keep < size - skip
    return OutputAccepted(skip, keep, stored + keep, max(stored, end), cut)


def job_id_problem(job_id: str) -> str | None:
    """What is wrong with a job id ("" and ids the manager never makes), or None."""
    if not job_id:
        return "is required"
    if len(job_id) > 64 or not job_id.isascii() or not job_id.replace("-", "").isalnum():
        return f"not a job id: {job_id[:80]!r} (ids are like 20261213-101530-123-a1b2c3)"
    return None
