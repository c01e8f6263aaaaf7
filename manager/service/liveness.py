"""Liveness decisions as pure functions of plain values and `now`.

Nomad's rule: the manager scales the heartbeat interval with the fleet so the
total heartbeat rate stays under a ceiling, ``ttl = max(min_ttl, nodes /
max_rate)``. Each interval handed to a node is stretched by a random factor in
``[1, 1 + jitter]`` so a fleet registered at once does not heartbeat in
lock-step; stretching (never shrinking) keeps the rate under the ceiling. A
node is offline once ``ttl * (1 + jitter) + grace`` passed without a heartbeat,
i.e. it missed the longest interval it could have been given, plus grace.

After a manager start, or when a replica takes over the sweeper, nothing is
marked offline for `failover_grace`: daemons that were talking to a dead
manager need time to reconnect (with backoff) before their silence means
anything.

A node on a control stream (`ManagerService.Connect`) needs no heartbeats:
`stream_verdict` says it is online while the stream is open and for a grace
after it breaks, and never offline within this manager's failover grace
(a stream that breaks while a restarted manager takes the fleet's hellos in
turn is the herd, not a dead node); the manager holding the stream
refreshes its last-seen.

Every deadline here is a wall-clock time (last-seen times are shared by the
replicas and survive restarts), so a step of the wall clock (an NTP
correction, a VM resumed, `date -s`) would move them all at once: +1 h and
every node is an hour silent, -10 min and nobody can go offline for ten
minutes. `StepWatch` compares how far the wall clock moved with how far the
monotonic clock did; the sweeper and the stream liveness re-base on a step
instead of judging across it.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

__all__ = [
    "STEP_TOLERANCE",
    "LivenessPolicy",
    "StepWatch",
    "StreamVerdict",
    "TtlHighWater",
    "clock_step",
    "heartbeat_ttl",
    "jittered_interval",
    "offline_after",
    "stream_offline_at",
    "stream_refresh_interval",
    "stream_verdict",
    "sweep_cutoff",
]


@dataclass(frozen=True)
class LivenessPolicy:
    """The liveness knobs in seconds (see `manager.config.LivenessConfig`)."""

    min_ttl: float = 10.0
    """Shortest interval handed out."""
    max_rate: float = 1000.0
    """Fleet-wide heartbeats/s ceiling."""
    jitter: float = 0.1
    """Intervals are ttl * uniform(1, 1 + jitter)."""
    grace: float = 10.0
    """Extra time past the longest interval before a node is offline."""
    failover_grace: float = 300.0
    """Quiet period after a (sweeper) start during which nobody goes offline."""


def heartbeat_ttl(nodes: int, min_ttl: float, max_rate: float) -> float:
    """The base interval in seconds: max(min_ttl, nodes / max_rate)."""
    if min_ttl <= 0 or max_rate <= 0:
        raise ValueError("min_ttl and max_rate must be positive")
    return max(min_ttl, max(nodes, 0) / max_rate)


def jittered_interval(ttl: float, jitter: float, rng: random.Random) -> float:
    """The interval handed to one node: ttl stretched by uniform(0, jitter)."""
    return ttl * (1.0 + rng.uniform(0.0, jitter))


def offline_after(ttl: float, policy: LivenessPolicy) -> float:
    """Seconds of silence after which a node on base interval `ttl` is offline."""
    return ttl * (1.0 + policy.jitter) + policy.grace


def sweep_cutoff(
    *, now: float, active_since: float, ttl: float, policy: LivenessPolicy
) -> float | None:
    """The last-seen time before which online nodes become offline, or None.

    None while ``now < active_since + failover_grace``: right after the
    sweeper became active nobody may be marked offline.
    """
    if now < active_since + policy.failover_grace:
        return None
    return now - offline_after(ttl, policy)


@dataclass
class TtlHighWater:
    """The largest base ttl handed out recently.

    When the fleet shrinks the ttl shrinks, but nodes still hold the longer
    interval they were last given; the sweeper must judge them by that one.
    A ttl stops counting once every node has heartbeated since it was handed
    out (`offline_after` of it has passed).
    """

    ttl: float = 0.0
    """Largest base ttl handed out within its own offline window."""
    handed_at: float = 0.0
    """When `ttl` was last handed out."""

    def note(self, ttl: float, now: float, policy: LivenessPolicy) -> None:
        """Record that `ttl` was handed out at `now`."""
        if ttl >= self.effective(now, policy):
            self.ttl, self.handed_at = ttl, now

    def effective(self, now: float, policy: LivenessPolicy) -> float:
        """The recorded ttl while some node may still hold it, else 0."""
        if now - self.handed_at > offline_after(self.ttl, policy):
            return 0.0
        return self.ttl


class StreamVerdict(enum.Enum):
    """What a node's control stream says about its liveness."""

    CONNECTED = "connected"
    """The stream is open: online, its last-seen is refreshed."""
    GRACE = "grace"
    """The stream broke less than the grace ago: still online, refreshed."""
    OFFLINE = "offline"
    """The stream broke the grace ago or more and did not come back."""


def stream_offline_at(broken_at: float, grace: float, quiet_until: float = 0.0) -> float:
    """When a node whose stream broke at `broken_at` goes offline unless it reconnects:
    `grace` later, and not before `quiet_until` (the end of the failover grace)."""
    return max(broken_at + grace, quiet_until)


def stream_verdict(
    *,
    connected: bool,
    broken_at: float | None,
    now: float,
    grace: float,
    quiet_until: float = 0.0,
) -> StreamVerdict:
    """A node's liveness from its control stream: open, broken within `grace` (or before
    `quiet_until`), or gone.

    `broken_at` is when its last stream ended (None: never broke here).
    """
    if connected:
        return StreamVerdict.CONNECTED
    if broken_at is not None and now < stream_offline_at(broken_at, grace, quiet_until):
        return StreamVerdict.GRACE
    return StreamVerdict.OFFLINE


def stream_refresh_interval(configured: float, policy: LivenessPolicy) -> float:
    """How often the stream holder refreshes its nodes' last-seen.

    At most a third of the shortest offline window (`min_ttl`'s): the
    sweeper (any replica's) judges streamed nodes by the same window as
    heartbeating ones, and a refresh plus a flush must land inside it.
    """
    return min(configured, offline_after(policy.min_ttl, policy) / 3.0)


STEP_TOLERANCE = 2.0
"""Seconds the wall clock may drift from the monotonic one between two readings before it
counts as stepped: NTP's slewing (at most 500 ppm) stays far below it, a step does not."""


def clock_step(
    *,
    wall_then: float,
    mono_then: float,
    wall_now: float,
    mono_now: float,
    tolerance: float = STEP_TOLERANCE,
) -> float:
    """How far the wall clock was stepped between two readings (seconds, negative
    backwards): its advance minus the monotonic clock's, 0 within `tolerance`.

    A stall of the process (a GC pause, SIGSTOP) moves both clocks alike and is no
    step; a suspended VM moves only the wall clock (Linux's CLOCK_MONOTONIC stops
    while suspended) and is one, which is right: nobody was watching meanwhile.
    """
    step = (wall_now - wall_then) - (mono_now - mono_then)
    return step if abs(step) > tolerance else 0.0


@dataclass
class StepWatch:
    """Successive (wall, monotonic) readings; says when the wall clock was stepped."""

    wall: float | None = None
    """The last wall reading (None before the first)."""
    mono: float = 0.0
    """The monotonic reading taken with it."""

    def observe(self, wall: float, mono: float) -> float:
        """Record a reading; the step since the previous one (0: none, or the first)."""
        step = 0.0
        if self.wall is not None:
            step = clock_step(
                wall_then=self.wall, mono_then=self.mono, wall_now=wall, mono_now=mono
            )
        self.wall, self.mono = wall, mono
        return step
