"""FleetService: the operator API. Translation and identity only.

Every RPC first requires an ``operator/*`` certificate of this fleet's trust
domain, then hands plain values to the service layer (`manager.service.fleet`,
`.operations`, `.event_feed`) and turns the answers into protobuf. The
operator's identity ("operator/alice") is the actor recorded in the audit.
Errors are `fleet.errors` exceptions mapped by the ErrorMappingInterceptor.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, cast

from grpc import aio

from fleet import selectors
from fleet.errors import InvalidArgument
from fleet.v1 import common_pb2, fleet_pb2, fleet_pb2_grpc
from manager.pool import ConnectionState, DaemonPool
from manager.pool.routing import Route
from manager.pool.stream import ControlStreams
from manager.service.artifacts import Artifacts
from manager.service.definitions import Definitions
from manager.service.enroll_admin import EnrollmentAdmin
from manager.service.event_feed import EventFeed
from manager.service.fleet import (
    FleetQueries,
    NodeAgent,
    NodeView,
    StreamState,
    last_heard_ms,
)
from manager.service.job_control import Jobs
from manager.service.metrics import MetricsService
from manager.service.operations import (
    Action,
    OperationRecorder,
    Operations,
    Summary,
    TargetResult,
)
from manager.service.rollout_control import RolloutControl
from manager.servicers.artifacts import ArtifactRpcs
from manager.servicers.deadline import pool_budget
from manager.servicers.fleet_desired import DesiredRpcs
from manager.servicers.fleet_enroll import TokenRpcs
from manager.servicers.fleet_jobs import JobRpcs
from manager.storage import (
    AgentStateRecord,
    AgentStateRepository,
    Database,
    EventRecord,
    NodeRepository,
)
from manager.storage.desired import DesiredStateRepository
from manager.storage.operation_log import OperationLog
from manager.storage.removal import RemovalRepository
from manager.storage.sqlhelp import chunks
from manager.storage.targets import TargetRepository

__all__ = [
    "MAX_RESULTS_PER_MESSAGE",
    "RESULT_BATCH_INTERVAL",
    "SERVICE_NAME",
    "FleetServicer",
    "agent_info",
    "build_fleet_servicer",
]

SERVICE_NAME: str = fleet_pb2.DESCRIPTOR.services_by_name["FleetService"].full_name
"""Full name of the service, for health and reflection."""

_Context = aio.ServicerContext[Any, Any]

_Response = fleet_pb2.FleetServiceOperateAgentsResponse

MAX_RESULTS_PER_MESSAGE = 100
"""Most TargetResults in one OperateAgents message with batch_results (fleet.proto
promises this): keeps a message far below gRPC's 4 MiB limit."""
RESULT_BATCH_INTERVAL = 0.05
"""Longest a finished target's result waits to share a message (batch_results only).
Results trickle in one by one from fast daemons; fleetctl redraws 10 times a second."""


_CONNECTION = {
    ConnectionState.IDLE: fleet_pb2.CONNECTION_STATE_IDLE,
    ConnectionState.CONNECTING: fleet_pb2.CONNECTION_STATE_CONNECTING,
    ConnectionState.READY: fleet_pb2.CONNECTION_STATE_READY,
    ConnectionState.RECONNECTING: fleet_pb2.CONNECTION_STATE_RECONNECTING,
}
_ACTIONS: dict[int, Action] = {
    common_pb2.AGENT_OPERATION_START: "start",
    common_pb2.AGENT_OPERATION_STOP: "stop",
    common_pb2.AGENT_OPERATION_RESTART: "restart",
}
_OUTCOMES = {
    "planned": fleet_pb2.TARGET_OUTCOME_PLANNED,
    "ok": fleet_pb2.TARGET_OUTCOME_OK,
    "failed": fleet_pb2.TARGET_OUTCOME_FAILED,
    "skipped": fleet_pb2.TARGET_OUTCOME_SKIPPED,
}
_AGGREGATES = {
    fleet_pb2.AGGREGATE_UNSPECIFIED: "avg",
    fleet_pb2.AGGREGATE_AVG: "avg",
    fleet_pb2.AGGREGATE_MIN: "min",
    fleet_pb2.AGGREGATE_MAX: "max",
}


def _enum_value(enum: Any, prefix: str, name: str, default: int = 0) -> Any:
    """`<prefix><NAME>` of a protobuf enum, or `default` for a name it does not know.

    Storage keeps enum names without their prefix ("RUNNING", "online").
    """
    try:
        return enum.Value(f"{prefix}{name.upper()}")
    except ValueError:
        return default


def _agent_status(name: str) -> Any:
    return _enum_value(
        common_pb2.AgentStatus, "AGENT_STATUS_", name, common_pb2.AGENT_STATUS_UNKNOWN
    )


def agent_info(record: AgentStateRecord) -> common_pb2.AgentInfo:
    """The AgentInfo message for a stored agent state."""
    return common_pb2.AgentInfo(
        id=record.agent_id,
        type=record.type,
        status=_agent_status(record.status),
        pid=record.pid,
        version=record.version,
        start_time=record.start_time_ms,
        restart_count=record.restart_count,
        last_heartbeat=record.last_heartbeat_ms,
        exit_code=record.exit_code,
        message=record.message,
        labels=record.labels,
        health=_enum_value(common_pb2.AgentHealth, "AGENT_HEALTH_", record.health),
        config_version=record.config_version,
        last_exit=common_pb2.LastExit(
            kind=_enum_value(common_pb2.AgentExitKind, "AGENT_EXIT_KIND_", record.last_exit_kind),
            exit_code=record.last_exit_code,
            reason=record.last_exit_reason,
            time=record.last_exit_ms,
        )
        if record.last_exit_ms or record.last_exit_kind
        else None,
        revision=record.revision,
        health_message=record.health_message,
        health_since=record.health_since_ms,
        log_problem=record.log_problem,
    )


def _node(view: NodeView, max_skew_ms: int = 0) -> fleet_pb2.Node:
    n = view.node
    return fleet_pb2.Node(
        clock_offset_ms=n.clock_offset_ms,
        max_clock_skew_ms=max_skew_ms,
        node_id=n.node_id,
        hostname=n.hostname,
        ip=n.ip,
        os=n.os,
        arch=n.arch,
        labels=n.labels,
        daemon_version=n.daemon_version,
        agent_version=n.agent_version,
        daemon_address=n.daemon_address,
        status=_enum_value(common_pb2.NodeStatus, "NODE_STATUS_", n.status),
        last_heartbeat=last_heard_ms(n.last_seen_ms, view.stream),
        registered_at=n.registered_at_ms,
        connection_state=_CONNECTION[view.connection],
        agent_counts=_counts(view.agent_counts),
        daemon_labels=n.daemon_labels,
        operator_labels=n.operator_labels,
        desired_version=view.desired.version if view.desired else 0,
        reported_version=view.desired.reported_version if view.desired else 0,
        drift=bool(view.drift),
        drift_reason=view.drift,
        update_errors=[
            common_pb2.UpdateError(agent_id=e.agent_id, revision=e.revision, reason=e.reason)
            for e in (view.desired.update_errors if view.desired else ())
        ],
        jobs_disabled=n.jobs_disabled,
        cert_expire_time=n.cert_not_after_ms,
        revoke_time=view.revoke_ms,
        stream_state=_STREAM[view.stream.state],
        stream_since=round(view.stream.since * 1000),
        stream_offline_at=round(view.stream.offline_at * 1000),
        stream_replica=view.stream.replica,
    )


_STREAM = {
    StreamState.UNKNOWN: fleet_pb2.CONTROL_STREAM_STATE_UNSPECIFIED,
    StreamState.NONE: fleet_pb2.CONTROL_STREAM_STATE_NONE,
    StreamState.CONNECTED: fleet_pb2.CONTROL_STREAM_STATE_CONNECTED,
    StreamState.LOST: fleet_pb2.CONTROL_STREAM_STATE_LOST,
    StreamState.ELSEWHERE: fleet_pb2.CONTROL_STREAM_STATE_ELSEWHERE,
}


def _counts(counts: Mapping[str, int]) -> list[fleet_pb2.AgentCount]:
    out = [
        fleet_pb2.AgentCount(status=_agent_status(status), count=n) for status, n in counts.items()
    ]
    return sorted(out, key=lambda c: c.status)


def _event(record: EventRecord) -> fleet_pb2.Event:
    return fleet_pb2.Event(
        id=record.id,
        timestamp=record.timestamp_ms,
        kind=_enum_value(fleet_pb2.EventKind, "EVENT_KIND_", record.kind),
        node_id=record.node_id,
        agent_id=record.agent_id,
        message=record.message,
        actor=record.actor,
        attributes=record.attributes,
    )


def _node_agent(a: NodeAgent) -> fleet_pb2.NodeAgent:
    info = agent_info(a.agent)
    if a.spec is not None:
        info.spec.CopyFrom(a.spec)
    info.log_path = a.log_path
    return fleet_pb2.NodeAgent(
        node_id=a.node_id, agent=info, stale=a.stale, reported_at=a.agent.reported_ms
    )


def _statuses(values: Any) -> list[str]:
    out = []
    for i, value in enumerate(values):
        if value == common_pb2.AGENT_STATUS_UNSPECIFIED:
            raise InvalidArgument("AGENT_STATUS_UNSPECIFIED is not a state", field=f"statuses[{i}]")
        try:
            out.append(common_pb2.AgentStatus.Name(value).removeprefix("AGENT_STATUS_"))
        except ValueError:
            raise InvalidArgument(f"unknown agent status {value}", field=f"statuses[{i}]") from None
    return out


def _action(value: int) -> Action:
    action = _ACTIONS.get(value)
    if action is None:
        raise InvalidArgument(
            f"unsupported operation {value}; use START, STOP or RESTART", field="operation"
        )
    return action


def _kinds(values: Any) -> list[str]:
    kinds = []
    for i, value in enumerate(values):
        if value == fleet_pb2.EVENT_KIND_UNSPECIFIED:
            raise InvalidArgument("EVENT_KIND_UNSPECIFIED is not a kind", field=f"kinds[{i}]")
        try:
            kinds.append(fleet_pb2.EventKind.Name(value).removeprefix("EVENT_KIND_"))
        except ValueError:
            raise InvalidArgument(f"unknown event kind {value}", field=f"kinds[{i}]") from None
    return kinds


class FleetServicer(
    DesiredRpcs, JobRpcs, TokenRpcs, ArtifactRpcs, fleet_pb2_grpc.FleetServiceServicer
):
    """Serves FleetService for ``operator/*`` callers (`DesiredRpcs`, `JobRpcs`,
    `TokenRpcs`, `ArtifactRpcs`)."""

    def __init__(
        self,
        queries: FleetQueries,
        operations: Operations,
        feed: EventFeed,
        definitions: Definitions,
        rollouts: RolloutControl,
        artifacts: Artifacts,
        jobs: Jobs,
        admin: EnrollmentAdmin,
        *,
        trust_domain: str,
        call_timeout: float,
        max_clock_skew_ms: int = 0,
    ) -> None:
        self._jobs = jobs
        self._skew_ms = max_clock_skew_ms
        self._admin = admin
        self._q = queries
        self._ops = operations
        self._feed = feed
        self._definitions = definitions
        self._rollouts = rollouts
        self._artifacts = artifacts
        self._td = trust_domain
        self._call_timeout = call_timeout

    def _timeout(self, context: _Context) -> float:
        """The pool's deadline, ending before the operator's own (`pool_budget`)."""
        # grpc returns None when the caller set no deadline (the stubs say float).
        return pool_budget(self._call_timeout, cast("float | None", context.time_remaining()))

    async def ListNodes(
        self, request: fleet_pb2.FleetServiceListNodesRequest, context: _Context
    ) -> fleet_pb2.FleetServiceListNodesResponse:
        self._operator(context)
        selector = selectors.from_proto(request.selector)
        views = await self._q.list_nodes(selector)
        return fleet_pb2.FleetServiceListNodesResponse(
            nodes=[_node(v, self._skew_ms) for v in views]
        )

    async def GetNode(
        self, request: fleet_pb2.FleetServiceGetNodeRequest, context: _Context
    ) -> fleet_pb2.FleetServiceGetNodeResponse:
        self._operator(context)
        return fleet_pb2.FleetServiceGetNodeResponse(
            node=_node(await self._q.get_node(request.node_id), self._skew_ms)
        )

    async def UpdateNodeLabels(
        self, request: fleet_pb2.FleetServiceUpdateNodeLabelsRequest, context: _Context
    ) -> fleet_pb2.FleetServiceUpdateNodeLabelsResponse:
        actor = self._operator(context)
        updated = await self._q.update_labels(
            request.node_id, dict(request.set), list(request.remove), actor=actor
        )
        return fleet_pb2.FleetServiceUpdateNodeLabelsResponse(
            node=_node(updated.view, self._skew_ms), absent_keys=updated.absent
        )

    async def DeleteNode(
        self, request: fleet_pb2.FleetServiceDeleteNodeRequest, context: _Context
    ) -> fleet_pb2.FleetServiceDeleteNodeResponse:
        actor = self._operator(context)
        view = await self._q.get_node(request.node_id)  # NotFound first; the answer's node
        await self._admin.delete_node(request.node_id, force=request.force, actor=actor)
        return fleet_pb2.FleetServiceDeleteNodeResponse(node=_node(view, self._skew_ms))

    async def RevokeNode(
        self, request: fleet_pb2.FleetServiceRevokeNodeRequest, context: _Context
    ) -> fleet_pb2.FleetServiceRevokeNodeResponse:
        actor = self._operator(context)
        cutoff, closed = await self._admin.revoke_node(
            request.node_id, reason=request.reason, actor=actor
        )
        return fleet_pb2.FleetServiceRevokeNodeResponse(
            revoke_time=cutoff, connections_closed=closed
        )

    async def ListAgents(
        self, request: fleet_pb2.FleetServiceListAgentsRequest, context: _Context
    ) -> fleet_pb2.FleetServiceListAgentsResponse:
        self._operator(context)
        selector = selectors.from_proto(request.selector)
        listing = await self._q.list_agents(
            request.node_id,
            selector,
            live=request.live,
            call_timeout=self._timeout(context),
            statuses=_statuses(request.statuses),
            unhealthy=request.unhealthy,
        )
        return fleet_pb2.FleetServiceListAgentsResponse(
            agents=[_node_agent(a) for a in listing.agents],
            errors=[fleet_pb2.TargetError(node_id=n, message=m) for n, m in listing.errors],
        )

    async def OperateAgent(
        self, request: fleet_pb2.FleetServiceOperateAgentRequest, context: _Context
    ) -> fleet_pb2.FleetServiceOperateAgentResponse:
        actor = self._operator(context)
        agent = await self._ops.operate_one(
            request.node_id,
            request.agent_id,
            _action(request.operation),
            actor=actor,
            call_timeout=self._timeout(context),
        )
        return fleet_pb2.FleetServiceOperateAgentResponse(
            agent=fleet_pb2.NodeAgent(node_id=request.node_id, agent=agent)
        )

    async def OperateAgents(
        self, request: fleet_pb2.FleetServiceOperateAgentsRequest, context: _Context
    ) -> AsyncIterator[fleet_pb2.FleetServiceOperateAgentsResponse]:
        actor = self._operator(context)
        selector = selectors.from_proto(request.selector)
        stream = self._ops.fan_out(
            selector,
            _action(request.operation),
            agent_id=request.agent_id,
            agent_type=request.agent_type,
            max_concurrency=request.max_concurrency,
            max_errors=request.max_errors,
            plan=request.plan,
            actor=actor,
            call_timeout=self._timeout(context),
            batch_interval=RESULT_BATCH_INTERVAL if request.batch_results else 0.0,
        )
        # aclosing: a client that goes away stops the fan-out launching targets.
        async with contextlib.aclosing(stream):
            async for item in stream:
                if isinstance(item, Summary):
                    yield _Response(summary=_summary(item))
                elif request.batch_results:
                    # Each message costs both ends a write and a wake-up; send what
                    # finished meanwhile together (the next batch gathers while
                    # this one is being sent).
                    for chunk in chunks(item, MAX_RESULTS_PER_MESSAGE):
                        yield _Response(results=[_result(r) for r in chunk])
                else:
                    for r in item:
                        yield _Response(result=_result(r))

    async def QueryMetrics(
        self, request: fleet_pb2.FleetServiceQueryMetricsRequest, context: _Context
    ) -> fleet_pb2.FleetServiceQueryMetricsResponse:
        self._operator(context)
        aggregate = _AGGREGATES.get(request.aggregate)
        if aggregate is None:
            raise InvalidArgument(f"unknown aggregate {request.aggregate}", field="aggregate")
        series, step = await self._q.query_metrics(
            node_id=request.node_id,
            agent_id=request.agent_id,
            type=request.type,
            name=request.name,
            start_ms=request.start_time,
            end_ms=request.end_time,
            step_s=request.step_seconds,
            aggregate=aggregate,
        )
        return fleet_pb2.FleetServiceQueryMetricsResponse(
            series=[
                fleet_pb2.MetricSeries(
                    name=name,
                    points=[fleet_pb2.MetricPoint(timestamp=t, value=v) for t, v in points],
                )
                for name, points in sorted(series.items())
            ],
            step_seconds=step,
        )

    async def ListMetricTypes(
        self, request: fleet_pb2.FleetServiceListMetricTypesRequest, context: _Context
    ) -> fleet_pb2.FleetServiceListMetricTypesResponse:
        self._operator(context)
        types = await self._q.metric_types(request.node_id)
        return fleet_pb2.FleetServiceListMetricTypesResponse(
            types=[
                fleet_pb2.MetricTypeInfo(
                    type=t.type,
                    names=t.names,
                    agent_ids=t.agent_ids,
                    host=t.host,
                    newest_timestamp=t.newest_ms,
                )
                for t in types
            ]
        )

    async def GetAgentMetrics(
        self, request: fleet_pb2.FleetServiceGetAgentMetricsRequest, context: _Context
    ) -> fleet_pb2.FleetServiceGetAgentMetricsResponse:
        self._operator(context)
        resp = await self._q.agent_metrics(
            request.node_id,
            request.agent_id,
            request.duration_seconds,
            call_timeout=self._timeout(context),
        )
        return fleet_pb2.FleetServiceGetAgentMetricsResponse(
            node_id=request.node_id, agent_id=request.agent_id, data_points=resp.data_points
        )

    async def ReadAgentLog(
        self, request: fleet_pb2.FleetServiceReadAgentLogRequest, context: _Context
    ) -> AsyncIterator[fleet_pb2.FleetServiceReadAgentLogResponse]:
        self._operator(context)
        stream = self._q.read_log(
            request.node_id,
            request.agent_id,
            offset=request.offset,
            max_bytes=request.max_bytes,
            follow=request.follow,
        )
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                yield fleet_pb2.FleetServiceReadAgentLogResponse(
                    data=chunk.data,
                    offset=chunk.offset,
                    next_offset=chunk.next_offset,
                    rotated=chunk.rotated,
                )

    async def WatchEvents(
        self, request: fleet_pb2.FleetServiceWatchEventsRequest, context: _Context
    ) -> AsyncIterator[fleet_pb2.FleetServiceWatchEventsResponse]:
        self._operator(context)
        kinds = _kinds(request.kinds)
        start = await self._feed.start(
            request.from_event_id,
            tail=request.tail if request.HasField("tail") else None,
            kinds=kinds,
            node_id=request.node_id,
        )
        stream = self._feed.watch(
            start.after_id, kinds=kinds, node_id=request.node_id, follow=request.follow
        )
        left_out = start.older_left_out
        async with contextlib.aclosing(stream):
            async for record in stream:
                yield fleet_pb2.FleetServiceWatchEventsResponse(
                    event=_event(record), older_events_left_out=left_out
                )
                left_out = False


def _result(r: TargetResult) -> fleet_pb2.TargetResult:
    return fleet_pb2.TargetResult(
        node_id=r.target.node_id,
        agent_id=r.target.agent_id,
        outcome=_OUTCOMES[r.outcome],
        message=r.message,
        agent=r.agent,
        duration_ms=r.duration_ms,
    )


def _summary(s: Summary) -> fleet_pb2.OperationSummary:
    return fleet_pb2.OperationSummary(
        operation_id=s.operation_id,
        total=s.total,
        ok=s.ok,
        failed=s.failed,
        skipped=s.skipped,
        planned=s.planned,
        duration_ms=s.duration_ms,
    )


def build_fleet_servicer(
    db: Database,
    pool: DaemonPool,
    feed: EventFeed,
    metrics: MetricsService,
    definitions: Definitions,
    rollouts: RolloutControl,
    artifacts: Artifacts,
    jobs: Jobs,
    admin: EnrollmentAdmin,
    *,
    trust_domain: str,
    clock: Callable[[], float],
    on_labels_changed: Callable[[], None] = lambda: None,
    streams: ControlStreams | None = None,
    stream_grace: float = 0.0,
    stream_route: Callable[[str], Awaitable[Route | None]] | None = None,
    max_clock_skew_ms: int = 0,
) -> FleetServicer:
    """The FleetService servicer over the manager's database, daemon pool and event feed
    (`streams`, `stream_grace`, `stream_route`: what `nodes show`
    says of control streams)."""
    nodes, agents = NodeRepository(db), AgentStateRepository(db)
    recorder = OperationRecorder(OperationLog(db), clock=clock)
    operations = Operations(nodes, TargetRepository(db), pool, recorder, clock=clock)
    queries = FleetQueries(
        nodes,
        agents,
        pool,
        operations,
        recorder,
        metrics,
        DesiredStateRepository(db),
        clock=clock,
        on_labels_changed=on_labels_changed,
        revoked=RemovalRepository(db).still_revoked,
        streams=streams,
        stream_grace=stream_grace,
        stream_route=stream_route,
    )
    return FleetServicer(
        queries,
        operations,
        feed,
        definitions,
        rollouts,
        artifacts,
        jobs,
        admin,
        trust_domain=trust_domain,
        call_timeout=pool.config.call_timeout,
        max_clock_skew_ms=max_clock_skew_ms,
    )
