"""What daemons tell the manager about jobs: target states and output chunks.

A node may only speak of its own targets (the servicer checked that the
caller is `node/<node_id>`; a job it is not a target of is PermissionDenied,
an unknown job NotFound). A report is acknowledged once stored (group
commit, `JobUpdates`); its answer says whether an operator cancelled the
target meanwhile. Output chunks are offset-idempotent (`jobs.accept_output`)
and stored up to `[jobs] max_output_bytes` per target, group-committed with
the reports (`JobUpdates.submit_output`): acknowledged once stored.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from fleet.errors import InvalidArgument, NotFound, PermissionDenied
from fleet.v1 import daemon_pb2, jobs_pb2, manager_pb2
from manager.service.job_updates import Change, JobUpdates, Upload
from manager.service.jobs import TERMINAL, TargetState, job_id_problem

__all__ = [
    "MAX_OUTPUT_CHUNK",
    "JobReports",
    "StepReport",
    "UploadResult",
    "report_change",
    "reported_change",
    "state_name",
    "step_reports",
]

MAX_OUTPUT_CHUNK = 1024 * 1024
"""Largest output chunk a daemon may send in one UploadJobOutput."""
_MAX_REASON = 4096
_MAX_STEPS = 100
_STATES = frozenset(s for s in TargetState if s is not TargetState.PENDING)
_S = TypeVar("_S")


@dataclass(frozen=True)
class StepReport:
    """One step's result as the daemon reports it."""

    index: int
    """Its place in the job."""
    name: str
    """Its name."""
    state: str
    """JobTargetState name without its prefix."""
    exit_code: int
    """Exit code (-N: signal N)."""
    started_ms: int
    """When it started."""
    ended_ms: int
    """When it ended."""
    reason: str
    """Why it failed or did not run."""


@dataclass(frozen=True)
class UploadResult:
    """The answer to an output chunk."""

    acked_offset: int
    """Everything before it is stored (or deliberately cut)."""
    truncated: bool
    """The manager keeps no more of this output."""


_BY_NAME: dict[str, TargetState] = {s.value: s for s in TargetState}
_NAMES: dict[int, str] = {
    number: name.removeprefix("JOB_TARGET_STATE_")
    for name, number in jobs_pb2.JobTargetState.items()
}
_COMPACT = json.JSONEncoder(separators=(",", ":"))
"""Step rows as stored JSON (made once: `json.dumps` with separators makes an encoder per
call, and every StartJob answer and report has steps)."""


def _state(name: str, field: str) -> TargetState:
    state = _BY_NAME.get(name)  # not TargetState(name): ~0.3 us a call, twice per answer
    if state is None:
        raise InvalidArgument(f"unknown state {name}", field=field)
    if state not in _STATES:
        raise InvalidArgument(f"a node cannot report {name}", field=field)
    return state


def _reason(text: str, field: str) -> str:
    if "\x00" in text:
        raise InvalidArgument("must not contain NUL", field=field)
    return text[:_MAX_REASON]


def _times(started_ms: int, ended_ms: int, field: str) -> None:
    if started_ms < 0 or ended_ms < 0:
        raise InvalidArgument("times must be >= 0", field=field)


def _check_ids(job_id: str) -> None:
    problem = job_id_problem(job_id)
    if problem:
        raise InvalidArgument(problem, field="job_id")


def state_name(state: jobs_pb2.JobTargetState.ValueType) -> str:
    """A JobTargetState number as a report's state name ("SUCCESS"); "#N" for a number
    this manager does not know (validation refuses it, naming it)."""
    name = _NAMES.get(state)
    return f"#{state}" if name is None else name


def step_reports(steps: Iterable[jobs_pb2.JobStepResult]) -> list[StepReport]:
    """The steps of a ReportJobStatus or of an end a StartJob answer carried."""
    return [
        StepReport(
            index=s.index,
            name=s.name,
            state=state_name(s.state),
            exit_code=s.exit_code,
            started_ms=s.started_at,
            ended_ms=s.ended_at,
            reason=s.reason,
        )
        for s in steps
    ]


def _step_row(
    i: int,
    index: int,
    name: str,
    state: str,
    exit_code: int,
    started_ms: int,
    ended_ms: int,
    reason: str,
) -> dict[str, object]:
    """One step checked (InvalidArgument naming `steps[i]`'s field) as its stored row."""
    # The field names are made only for an error: this runs for every step of every answer.
    if "\x00" in name:
        _reason(name, f"steps[{i}].name")  # raises
    checked = "PENDING" if state == "PENDING" else _state(state, f"steps[{i}].state").value
    if "\x00" in reason:
        _reason(reason, f"steps[{i}].reason")  # raises
    if started_ms < 0 or ended_ms < 0:
        _times(started_ms, ended_ms, f"steps[{i}].started_at")  # raises
    return {
        "index": index,
        "name": name[:63],
        "state": checked,
        "exit_code": exit_code,
        "started_ms": started_ms,
        "ended_ms": ended_ms,
        "reason": reason[:_MAX_REASON],
    }


def _checked(
    node_id: str,
    job_id: str,
    *,
    state: str,
    exit_code: int,
    started_ms: int,
    ended_ms: int,
    reason: str,
    steps: Sequence[_S],
    row: Callable[[int, _S], dict[str, object]],
    output_bytes: int,
    output: bytes | None,
    bound: int,
) -> Change:
    _check_ids(job_id)
    new = _state(state, "state")
    _times(started_ms, ended_ms, "started_at")
    if output_bytes < 0:
        raise InvalidArgument(f"must be >= 0, got {output_bytes}", field="output_bytes")
    if len(steps) > _MAX_STEPS:
        raise InvalidArgument(f"at most {_MAX_STEPS}, got {len(steps)}", field="steps")
    if output is not None:
        if new not in TERMINAL:
            raise InvalidArgument(f"an end must be a final state, got {state}", field="state")
        if len(output) > MAX_OUTPUT_CHUNK:
            raise InvalidArgument(
                f"at most {MAX_OUTPUT_CHUNK} bytes, got {len(output)}", field="output"
            )
    rows = [row(i, s) for i, s in enumerate(steps)]
    return Change(
        job_id,
        node_id,
        "report" if output is None else "ended",
        state=new,
        reason=_reason(reason, "reason"),
        exit_code=exit_code,
        started_ms=started_ms,
        ended_ms=ended_ms,
        steps=_COMPACT.encode(rows) if rows else None,
        output_bytes=output_bytes,
        output=output,
        bound=bound,
    )


def _report_row(i: int, s: StepReport) -> dict[str, object]:
    return _step_row(i, s.index, s.name, s.state, s.exit_code, s.started_ms, s.ended_ms, s.reason)


def _message_row(i: int, s: jobs_pb2.JobStepResult) -> dict[str, object]:
    return _step_row(
        i, s.index, s.name, state_name(s.state), s.exit_code, s.started_at, s.ended_at, s.reason
    )


def report_change(
    node_id: str,
    job_id: str,
    *,
    state: str,
    exit_code: int = 0,
    started_ms: int = 0,
    ended_ms: int = 0,
    reason: str = "",
    steps: Sequence[StepReport] = (),
    output_bytes: int = 0,
    output: bytes | None = None,
    bound: int = 0,
) -> Change:
    """A node's word on its target as a checked `Change` (InvalidArgument naming the
    field): a report, or with `output` an end carried by a StartJob answer."""
    return _checked(
        node_id,
        job_id,
        state=state,
        exit_code=exit_code,
        started_ms=started_ms,
        ended_ms=ended_ms,
        reason=reason,
        steps=steps,
        row=_report_row,
        output_bytes=output_bytes,
        output=output,
        bound=bound,
    )


def reported_change(
    node_id: str,
    job_id: str,
    msg: manager_pb2.ReportJobStatusRequest | daemon_pb2.JobEnd,
    *,
    output_bytes: int,
    output: bytes | None = None,
    bound: int = 0,
) -> Change:
    """`report_change` for a node's message: a ReportJobStatus, or the end a StartJob
    answer carried (with its whole `output`); its steps checked straight from the
    message (no `StepReport` in between: this runs for every answer and report)."""
    return _checked(
        node_id,
        job_id,
        state=state_name(msg.state),
        exit_code=msg.exit_code,
        started_ms=msg.started_at,
        ended_ms=msg.ended_at,
        reason=msg.reason,
        steps=msg.steps,
        row=_message_row,
        output_bytes=output_bytes,
        output=output,
        bound=bound,
    )


class JobReports:
    """Daemons' job reports and output (see the module docstring)."""

    def __init__(self, updates: JobUpdates, *, max_output_bytes: int) -> None:
        self._updates = updates
        self._bound = max_output_bytes

    async def report(self, request: manager_pb2.ReportJobStatusRequest) -> bool:
        """Store where the node's target of the job is; True if it should stop it."""
        job_id, node_id = request.job_id, request.node_id
        outcome = await self._updates.submit(
            reported_change(node_id, job_id, request, output_bytes=request.output_bytes)
        )
        if outcome.job is None:
            raise NotFound(f"job {job_id!r} does not exist (deleted, or never started)")
        if outcome.target is None:
            raise PermissionDenied(f"node {node_id} is not a target of job {job_id}")
        return outcome.target.cancel_requested

    async def upload(self, node_id: str, job_id: str, offset: int, data: bytes) -> UploadResult:
        """Store a chunk of the node's output of `job_id` at `offset` (idempotent)."""
        _check_ids(job_id)
        if offset < 0:
            raise InvalidArgument(f"must be >= 0, got {offset}", field="offset")
        if len(data) > MAX_OUTPUT_CHUNK:
            raise InvalidArgument(
                f"at most {MAX_OUTPUT_CHUNK} bytes per chunk, got {len(data)}", field="data"
            )
        got = await self._updates.submit_output(
            Upload(job_id, node_id, offset, data, bound=self._bound)
        )
        return UploadResult(got.acked, got.truncated)
