"""FleetService's job RPCs. Translation only.

Mixed into `FleetServicer` (`manager/servicers/fleet_service.py`), which
provides the caller's identity check (`_operator`): only operators reach
them. The decisions are in `manager.service.job_control`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from grpc import aio

from fleet.errors import InvalidArgument
from fleet.v1 import fleet_pb2, jobs_pb2
from manager.service.job_control import Jobs, JobView
from manager.service.jobs import JobState
from manager.servicers.fleet_desired import OperatorCalls
from manager.storage.jobs import JobTargetRecord

__all__ = ["JobRpcs", "job_message", "target_message"]

_Context = aio.ServicerContext[Any, Any]


_TARGET_STATES: dict[str, Any] = {
    name.removeprefix("JOB_TARGET_STATE_"): value for name, value in jobs_pb2.JobTargetState.items()
}


def _target_state(name: str) -> Any:
    # A dict, not JobTargetState.Value: this runs for every target of every job read.
    return _TARGET_STATES.get(name, jobs_pb2.JOB_TARGET_STATE_UNSPECIFIED)


def pending_reason(t: JobTargetRecord) -> str:
    """Why a PENDING target is not on its node yet, once an attempt could not reach it
    ("" before that): the wait would say nothing otherwise until the delivery timeout."""
    if t.state != "PENDING" or not t.attempts:
        return ""
    return (
        f"not delivered yet after {t.attempts} attempt(s): {t.last_error};"
        " retried until the delivery timeout"
    )


def target_message(t: JobTargetRecord) -> jobs_pb2.JobTarget:
    """A stored target as its message."""
    if (
        t.steps == "[]"
        and not t.attempts
        and not t.reason
        and not (t.started_ms or t.ended_ms or t.exit_code)
        and not (t.output_bytes or t.output_stored_bytes or t.truncated)
    ):
        # Nothing but where it is (a job's targets as RunJob stores them, the first
        # message of a watch): ~1.3 us a target less than the whole message's fields.
        return jobs_pb2.JobTarget(node_id=t.node_id, state=_target_state(t.state), stage=t.stage)
    steps = json.loads(t.steps) if t.steps and t.steps != "[]" else []
    return jobs_pb2.JobTarget(
        node_id=t.node_id,
        state=_target_state(t.state),
        exit_code=t.exit_code,
        started_at=t.started_ms,
        ended_at=t.ended_ms,
        reason=t.reason or pending_reason(t),
        steps=[
            jobs_pb2.JobStepResult(
                index=s["index"],
                name=s["name"],
                state=_target_state(s["state"]),
                exit_code=s["exit_code"],
                started_at=s["started_ms"],
                ended_at=s["ended_ms"],
                reason=s["reason"],
            )
            for s in steps
        ],
        output_bytes=t.output_bytes,
        output_stored_bytes=t.output_stored_bytes,
        output_truncated=t.truncated,
        stage=t.stage,
    )


def _counts(counts: Mapping[str, int]) -> list[jobs_pb2.JobTargetCount]:
    return sorted(
        (jobs_pb2.JobTargetCount(state=_target_state(s), count=n) for s, n in counts.items()),
        key=lambda c: c.state,
    )


def job_message(view: JobView, *, targets: bool = True) -> jobs_pb2.Job:
    """A job as its message (with every target unless `targets` is false)."""
    r = view.record
    try:
        state = jobs_pb2.JobState.Value(f"JOB_STATE_{r.state}")
    except ValueError:
        state = jobs_pb2.JOB_STATE_UNSPECIFIED
    return jobs_pb2.Job(
        id=r.id,
        spec=view.spec,
        state=state,
        actor=r.actor,
        created_at=r.created_ms,
        ended_at=r.ended_ms,
        rerun_of=r.rerun_of,
        targets=[target_message(t) for t in view.targets] if targets else [],
        counts=_counts(view.counts),
        reason=r.reason,
    )


def _states(values: Iterable[jobs_pb2.JobState.ValueType]) -> list[JobState]:
    out = []
    for i, value in enumerate(values):
        try:
            name = jobs_pb2.JobState.Name(value).removeprefix("JOB_STATE_")
        except ValueError:
            raise InvalidArgument(f"unknown job state {value}", field=f"states[{i}]") from None
        if name == "UNSPECIFIED":
            raise InvalidArgument("JOB_STATE_UNSPECIFIED is not a state", field=f"states[{i}]")
        out.append(JobState(name))
    return out


class JobRpcs(OperatorCalls):
    """The job RPCs of FleetService (callers are operators: `_operator`)."""

    _jobs: Jobs
    """The service (set by FleetServicer)."""

    async def RunJob(
        self, request: fleet_pb2.FleetServiceRunJobRequest, context: _Context
    ) -> fleet_pb2.FleetServiceRunJobResponse:
        actor = self._operator(context)
        view = await self._jobs.run(request.spec, actor=actor, plan=request.plan)
        return fleet_pb2.FleetServiceRunJobResponse(job=job_message(view))

    async def ListJobs(
        self, request: fleet_pb2.FleetServiceListJobsRequest, context: _Context
    ) -> fleet_pb2.FleetServiceListJobsResponse:
        self._operator(context)
        views = await self._jobs.list(
            states=_states(request.states), since_ms=request.since, limit=request.limit
        )
        return fleet_pb2.FleetServiceListJobsResponse(
            jobs=[job_message(v, targets=False) for v in views]
        )

    async def GetJob(
        self, request: fleet_pb2.FleetServiceGetJobRequest, context: _Context
    ) -> fleet_pb2.FleetServiceGetJobResponse:
        self._operator(context)
        return fleet_pb2.FleetServiceGetJobResponse(
            job=job_message(await self._jobs.get(request.job_id))
        )

    async def WatchJob(
        self, request: fleet_pb2.FleetServiceWatchJobRequest, context: _Context
    ) -> AsyncIterator[fleet_pb2.FleetServiceWatchJobResponse]:
        self._operator(context)
        stream = self._jobs.watch(request.job_id)
        first = True
        async with contextlib.aclosing(stream):
            async for view, changed in stream:
                yield fleet_pb2.FleetServiceWatchJobResponse(
                    job=job_message(view, targets=first),
                    targets=[target_message(t) for t in changed],
                )
                first = False

    async def ReadJobOutput(
        self, request: fleet_pb2.FleetServiceReadJobOutputRequest, context: _Context
    ) -> AsyncIterator[fleet_pb2.FleetServiceReadJobOutputResponse]:
        self._operator(context)
        if request.from_node:
            stream = self._jobs.read_from_node(
                request.job_id, request.node_id, offset=request.offset, follow=request.follow
            )
        else:
            stream = self._jobs.read_output(
                request.job_id, request.node_id, offset=request.offset, follow=request.follow
            )
        async with contextlib.aclosing(stream):
            async for piece in stream:
                yield fleet_pb2.FleetServiceReadJobOutputResponse(
                    node_id=piece.node_id,
                    data=piece.data,
                    offset=piece.offset,
                    next_offset=piece.next_offset,
                    truncated=piece.truncated,
                    eof=piece.eof,
                )

    async def CancelJob(
        self, request: fleet_pb2.FleetServiceCancelJobRequest, context: _Context
    ) -> fleet_pb2.FleetServiceCancelJobResponse:
        actor = self._operator(context)
        view = await self._jobs.cancel(request.job_id, list(request.node_ids), actor=actor)
        return fleet_pb2.FleetServiceCancelJobResponse(job=job_message(view))

    async def RerunJob(
        self, request: fleet_pb2.FleetServiceRerunJobRequest, context: _Context
    ) -> fleet_pb2.FleetServiceRerunJobResponse:
        actor = self._operator(context)
        view = await self._jobs.rerun(
            request.job_id, failed_only=request.failed_only, actor=actor, plan=request.plan
        )
        return fleet_pb2.FleetServiceRerunJobResponse(job=job_message(view))
