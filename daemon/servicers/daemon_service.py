"""`DaemonService`: what the manager may ask of this daemon.

Every RPC first requires a `manager/*` certificate. The servicer only
translates: decisions (idempotency, version checks, validation) are the
supervisor's, errors are `fleet.errors` mapped by the interceptor.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Literal

from grpc import aio

from daemon.convert import agent_info, resource_point, update_errors
from daemon.jobs.engine import JobEngine
from daemon.manager_link import ManagerLink
from daemon.supervisor.supervisor import Supervisor
from fleet.agentspec import specs_from_proto
from fleet.errors import InvalidArgument
from fleet.tls import require_role
from fleet.v1 import common_pb2, daemon_pb2, daemon_pb2_grpc, jobs_pb2

__all__ = ["DEFAULT_LOG_CHUNK", "MAX_LOG_CHUNK", "DaemonServicer"]

DEFAULT_LOG_CHUNK = 64 * 1024
"""Bytes per ReadAgentLog response when the request says 0."""
MAX_LOG_CHUNK = 1024 * 1024
"""Largest chunk a caller may ask for (kept well under the 4 MiB message limit)."""

_Context = aio.ServicerContext[Any, Any]

_OPS: dict[int, Literal["start", "stop", "restart"]] = {
    common_pb2.AGENT_OPERATION_START: "start",
    common_pb2.AGENT_OPERATION_STOP: "stop",
    common_pb2.AGENT_OPERATION_RESTART: "restart",
}


def _agent_id(value: str) -> str:
    if not value:
        raise InvalidArgument("is required", field="agent_id")
    return value


class DaemonServicer(daemon_pb2_grpc.DaemonServiceServicer):
    """Serves one supervisor to the manager (callers: `manager/*` of `trust_domain`).

    `follow_interval` is how often a following ReadAgentLog re-checks a log
    that has no new bytes (a timed wait, not a busy loop; the same cadence
    as the sampler's tick by default).
    """

    def __init__(
        self,
        supervisor: Supervisor,
        jobs: JobEngine,
        *,
        trust_domain: str,
        follow_interval: float = 0.5,
        link: ManagerLink,
    ) -> None:
        self._sup = supervisor
        self._jobs = jobs
        self._trust_domain = trust_domain
        self._follow_interval = follow_interval
        self._link = link

    def _require_manager(self, context: _Context) -> None:
        require_role(context, "manager", trust_domain=self._trust_domain)

    async def ListAgents(
        self, request: daemon_pb2.ListAgentsRequest, context: _Context
    ) -> daemon_pb2.ListAgentsResponse:
        self._require_manager(context)
        sup = self._sup
        return daemon_pb2.ListAgentsResponse(
            agents=[
                agent_info(s, spec=sup.spec(s.id), log_path=str(sup.log_path(s.id)))
                for s in sup.list()
            ]
        )

    async def OperateAgent(
        self, request: daemon_pb2.OperateAgentRequest, context: _Context
    ) -> daemon_pb2.OperateAgentResponse:
        self._require_manager(context)
        agent_id = _agent_id(request.agent_id)
        op = _OPS.get(request.operation)
        if op is None:
            raise InvalidArgument("must be START, STOP or RESTART", field="operation")
        snapshot = await self._sup.operate(agent_id, op)
        return daemon_pb2.OperateAgentResponse(success=True, agent=agent_info(snapshot))

    async def GetAgentMetrics(
        self, request: daemon_pb2.GetAgentMetricsRequest, context: _Context
    ) -> daemon_pb2.GetAgentMetricsResponse:
        self._require_manager(context)
        agent_id = _agent_id(request.agent_id)
        if request.duration_seconds < 0:
            raise InvalidArgument(
                f"must be >= 0 (got {request.duration_seconds}); 0 reads the whole buffer",
                field="duration_seconds",
            )
        self._sup.get(agent_id)  # NotFound for an unknown agent
        samples = self._sup.samples(agent_id, float(request.duration_seconds))  # 0: all
        return daemon_pb2.GetAgentMetricsResponse(
            agent_id=agent_id, data_points=[resource_point(s) for s in samples]
        )

    async def PushUpdate(
        self, request: daemon_pb2.PushUpdateRequest, context: _Context
    ) -> daemon_pb2.PushUpdateResponse:
        self._require_manager(context)
        specs = specs_from_proto(request.agents)
        link = self._link
        mark = link.push_mark()
        result = await self._sup.apply(request.version, specs)
        states = None
        if request.want_agent_states:
            # The snapshot the manager link would send next: the manager judges the push
            # from it instead of waiting for that report, which the link then skips.
            states = link.sync_request()
            link.answered_with(states, mark)
        return daemon_pb2.PushUpdateResponse(
            agent_states=states,
            success=True,
            message=f"applied version {result.version}"
            + (
                f"; refused {', '.join(r.agent_id for r in result.refused)}"
                if result.refused
                else ""
            )
            + (
                f"; fetching the artifact of {', '.join(result.fetching)} (it starts or changes"
                " when the download completes)"
                if result.fetching
                else ""
            ),
            version=result.version,
            added=list(result.added),
            changed=list(result.changed),
            removed=list(result.removed),
            reconfigured=list(result.reconfigured),
            refused=update_errors(result.refused),
        )

    async def ReadAgentLog(
        self, request: daemon_pb2.ReadAgentLogRequest, context: _Context
    ) -> AsyncIterator[daemon_pb2.ReadAgentLogResponse]:
        self._require_manager(context)
        agent_id = _agent_id(request.agent_id)
        if request.max_bytes < 0 or request.max_bytes > MAX_LOG_CHUNK:
            raise InvalidArgument(
                f"must be between 0 and {MAX_LOG_CHUNK} (got {request.max_bytes})",
                field="max_bytes",
            )
        max_bytes = request.max_bytes or DEFAULT_LOG_CHUNK
        offset = request.offset
        while True:
            chunk = self._sup.read_log(agent_id, offset, max_bytes)
            if chunk.data or chunk.rotated or not request.follow:
                yield daemon_pb2.ReadAgentLogResponse(
                    data=chunk.data,
                    offset=chunk.offset,
                    next_offset=chunk.next_offset,
                    rotated=chunk.rotated,
                )
            offset = chunk.next_offset
            if len(chunk.data) >= max_bytes:
                continue  # more is already there: no wait
            if not request.follow:
                return
            # At the end of the file: wait for growth. A timed re-check at the
            # sampler's cadence costs one stat() per follower per tick.
            await asyncio.sleep(self._follow_interval)

    async def StartJob(
        self, request: daemon_pb2.StartJobRequest, context: _Context
    ) -> daemon_pb2.StartJobResponse:
        self._require_manager(context)
        return await self._jobs.start_job(request)

    async def CancelJob(
        self, request: daemon_pb2.CancelJobRequest, context: _Context
    ) -> daemon_pb2.CancelJobResponse:
        self._require_manager(context)
        if not request.job_id:
            raise InvalidArgument("is required", field="job_id")
        state = await self._jobs.cancel(request.job_id)
        return daemon_pb2.CancelJobResponse(state=target_state(state))

    async def ReadJobOutput(
        self, request: daemon_pb2.ReadJobOutputRequest, context: _Context
    ) -> AsyncIterator[daemon_pb2.ReadJobOutputResponse]:
        self._require_manager(context)
        if not request.job_id:
            raise InvalidArgument("is required", field="job_id")
        if request.offset < 0:
            raise InvalidArgument(f"must be >= 0 (got {request.offset})", field="offset")
        if request.max_bytes < 0 or request.max_bytes > MAX_LOG_CHUNK:
            raise InvalidArgument(
                f"must be between 0 and {MAX_LOG_CHUNK} (got {request.max_bytes})",
                field="max_bytes",
            )
        self._jobs.record(request.job_id)  # NotFound before the stream starts
        max_bytes = request.max_bytes or DEFAULT_LOG_CHUNK
        offset = request.offset
        while True:
            chunk = await self._jobs.read_output(request.job_id, offset, max_bytes)
            if chunk.data or chunk.eof or not request.follow:
                yield daemon_pb2.ReadJobOutputResponse(
                    data=chunk.data,
                    offset=chunk.offset,
                    next_offset=chunk.next_offset,
                    eof=chunk.eof,
                )
            offset = chunk.next_offset
            if chunk.eof:
                return
            if len(chunk.data) >= max_bytes:
                continue  # more is already there: no wait
            if not request.follow:
                return
            # The step appends to the file itself: re-check at the follow cadence,
            # or at once when the job changes state (it may have ended).
            await self._jobs.wait_change(request.job_id, self._follow_interval)


def target_state(state: str) -> jobs_pb2.JobTargetState.ValueType:
    """A job or step state name as the proto enum."""
    return jobs_pb2.JobTargetState.Value(f"JOB_TARGET_STATE_{state}")
