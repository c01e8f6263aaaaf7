"""Pure health decisions: one notion of an agent's health, for every kind of check.

`judge` turns what is known (the spec's check, whether a process is live,
the last heartbeat, what the probes said so far) and `now` into a `Verdict`:
none / pending / healthy / unhealthy with a one-line reason. No I/O and no
clock: the supervisor (`daemon.supervisor.agent`) runs the probes
(`daemon.supervisor.probes`), records their results here with `record`, and
asks `judge` again after each result, heartbeat and state change.

- "none": a live process is all there is; health is "none".
- "heartbeat": unhealthy once `policy.heartbeat_deadline` passed, healthy
  after a heartbeat since the daemon began watching, else pending.
- "http" / "tcp" / "command" (probes): pending until the first probe passes
  (failing ones included, while fewer than `failure_threshold` in a row);
  healthy after a pass; unhealthy after `failure_threshold` failures in a
  row, until the next pass. The first probe runs `initial_delay` after the
  agent is RUNNING, each next one `interval` after the previous ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from daemon.supervisor.policy import heartbeat_deadline
from fleet.agentspec import PROBE_KINDS, HealthSpec

__all__ = ["Health", "ProbeResult", "Probes", "Verdict", "judge", "next_probe_at", "record"]

Health = Literal["none", "healthy", "unhealthy", "pending"]


@dataclass(frozen=True)
class ProbeResult:
    """One probe: passed or not, and what it saw."""

    ok: bool
    """The probe passed."""
    detail: str
    """One line: "GET http://127.0.0.1:8080/healthz: status 503 Service Unavailable"."""
    at: float
    """When it ended (epoch seconds)."""


@dataclass(frozen=True)
class Probes:
    """What the probes of the current process said so far (reset for each process)."""

    count: int = 0
    """Probes run."""
    failures: int = 0
    """Failures in a row, up to the last probe."""
    passed: bool = False
    """A probe passed (since this process started)."""
    last_at: float = 0.0
    """When the last probe ended (epoch seconds; 0 before the first)."""
    last_failure: str = ""
    """Detail of the latest failure ("" if none failed yet)."""


@dataclass(frozen=True)
class Verdict:
    """An agent's health and, when not healthy, why."""

    health: Health
    """none, pending, healthy or unhealthy."""
    reason: str
    """Why unhealthy (or the last failure while still pending); "" otherwise."""


def record(probes: Probes, result: ProbeResult) -> Probes:
    """`probes` after `result`."""
    if result.ok:
        return Probes(probes.count + 1, 0, True, result.at, probes.last_failure)
    failures = probes.failures + 1
    return Probes(probes.count + 1, failures, probes.passed, result.at, result.detail)


def next_probe_at(check: HealthSpec, probes: Probes, *, probing_since: float) -> float:
    """When the next probe starts: `initial_delay` after `probing_since`, then every `interval`."""
    if probes.count == 0:
        return probing_since + check.initial_delay
    return probes.last_at + check.interval


def judge(
    check: HealthSpec,
    *,
    live: bool,
    now: float,
    last_heartbeat: float = 0.0,
    watched_since: float = 0.0,
    grace: float = 0.0,
    probes: Probes = Probes(),
) -> Verdict:
    """The health of an agent whose process is `live` (STARTING or RUNNING) or not."""
    if not live or check.kind == "none":
        return Verdict("none", "")
    if check.kind == "heartbeat":
        deadline = heartbeat_deadline(
            last_heartbeat=last_heartbeat,
            watched_since=watched_since,
            timeout=check.timeout,
            grace=grace,
        )
        if now >= deadline:
            silent = now - max(last_heartbeat, watched_since)
            return Verdict(
                "unhealthy", f"no heartbeat for {silent:.1f}s (timeout {check.timeout:g}s)"
            )
        return Verdict("healthy" if last_heartbeat >= watched_since else "pending", "")
    assert check.kind in PROBE_KINDS, check.kind  # validated specs only
    if probes.failures >= check.failure_threshold:
        # The threshold, not the running count: the reason stays the same from probe to
        # probe, so a steadily failing check is not a state change every interval.
        n = check.failure_threshold
        return Verdict(
            "unhealthy", probes.last_failure + (f" ({n} times in a row)" if n > 1 else "")
        )
    if probes.passed:
        return Verdict("healthy", "")
    return Verdict("pending", probes.last_failure)
