"""Pure decisions about jobs on the node: plain values in, plain values out.

No I/O and no clock reads: the engine (daemon.jobs.engine) and the reporter
(daemon.jobs.reporter) gather the facts and act on the answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "FINAL",
    "Queued",
    "StepOutcome",
    "TargetResult",
    "UploadPlan",
    "admit",
    "next_upload",
    "step_runs",
    "target_result",
]

State = Literal["QUEUED", "RUNNING", "SUCCESS", "FAILED", "TIMEOUT", "CANCELLED", "SKIPPED"]
"""A target's or a step's state on the node (JobTargetState without the manager's own)."""
When = Literal["on_success", "on_failure", "always"]

FINAL: frozenset[str] = frozenset({"SUCCESS", "FAILED", "TIMEOUT", "CANCELLED", "SKIPPED"})
"""States a job or a step never leaves."""


def step_runs(when: When, failed_before: bool) -> bool:
    """Whether a step runs, given whether any step before it failed (or timed out)."""
    if when == "always":
        return True
    if when == "on_failure":
        return failed_before
    return not failed_before


def skip_reason(when: When) -> str:
    """Why a step whose `when` did not hold was skipped."""
    if when == "on_failure":
        return "skipped: no earlier step failed (when = on_failure)"
    return "skipped: an earlier step failed"


@dataclass(frozen=True)
class StepOutcome:
    """How one step ended (or that it never ran)."""

    state: State
    """SUCCESS, FAILED, TIMEOUT, CANCELLED or SKIPPED."""
    exit_code: int = 0
    """Exit code, -N for signal N."""
    reason: str = ""
    """Why it failed or was skipped."""


@dataclass(frozen=True)
class TargetResult:
    """The target's final state on this node, from its steps."""

    state: State
    exit_code: int
    reason: str


def target_result(
    steps: Sequence[StepOutcome], stopped: Literal["", "timeout", "cancel"]
) -> TargetResult:
    """The deciding step's result: the first that did not succeed, else the last that ran.

    A job stopped by its timeout or a cancel is TIMEOUT or CANCELLED whatever
    its steps did; a step's own timeout makes the target TIMEOUT; any other
    failure makes it FAILED. A step that ran after a failure (on_failure,
    always) does not turn a failed target into a success.
    """
    ran = [s for s in steps if s.state != "SKIPPED"]
    bad = next((s for s in ran if s.state != "SUCCESS"), None)
    if stopped:
        decider = next((s for s in ran if s.state in ("TIMEOUT", "CANCELLED")), bad)
        state: State = "TIMEOUT" if stopped == "timeout" else "CANCELLED"
        if decider is None:
            return TargetResult(state, 0, "")
        return TargetResult(state, decider.exit_code, decider.reason)
    if bad is not None:
        state = "TIMEOUT" if bad.state == "TIMEOUT" else "FAILED"
        return TargetResult(state, bad.exit_code, bad.reason)
    if not ran:
        return TargetResult("SUCCESS", 0, "")
    # A successful step's reason is a note (what it left running, ended): shown, not lost.
    notes = "; ".join(s.reason for s in ran if s.reason)
    return TargetResult("SUCCESS", ran[-1].exit_code, notes)


@dataclass(frozen=True)
class Queued:
    """A job waiting for (or holding) a slot on this node."""

    job_id: str
    lock: str
    """Exclusive lock name; empty: none."""


def admit(queued: Sequence[Queued], running: Sequence[Queued], max_concurrent: int) -> list[str]:
    """Which queued jobs start now, in queue order.

    At most `max_concurrent` run at once; a job whose lock a running (or
    just admitted) job holds waits, and does not hold up jobs behind it
    that need another lock or none.
    """
    held = {j.lock for j in running if j.lock}
    free = max_concurrent - len(running)
    out: list[str] = []
    for job in queued:
        if free <= 0:
            break
        if job.lock and job.lock in held:
            continue
        out.append(job.job_id)
        free -= 1
        if job.lock:
            held.add(job.lock)
    return out


@dataclass(frozen=True)
class UploadPlan:
    """What the uploader does next for one job's output."""

    action: Literal["ask", "send", "done", "wait"]
    """ask: send an empty chunk to learn the manager's offset; send: the bytes
    [offset, offset+length); done: everything is stored (or cut) on the
    manager; wait: nothing new yet, the job is still writing."""
    offset: int = 0
    length: int = 0


def next_upload(
    acked: int | None, size: int, *, finished: bool, truncated: bool, chunk: int
) -> UploadPlan:
    """The next upload step for an output file of `size` bytes.

    `acked` is the manager's acknowledged offset (None: unknown, after a
    (re)connect or an error). The output is complete on the manager once the
    job finished and every byte is acknowledged, or once the manager says it
    keeps no more (`truncated`).
    """
    if truncated:
        return UploadPlan("done")
    if acked is None:
        return UploadPlan("ask")
    if acked < size:
        return UploadPlan("send", acked, min(chunk, size - acked))
    if finished:
        return UploadPlan("done")
    return UploadPlan("wait")
