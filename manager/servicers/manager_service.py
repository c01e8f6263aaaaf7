"""ManagerService: the RPCs daemons call. Translation and identity only.

Every RPC first checks that the caller's certificate is ``node/<node_id>``
(`fleet.tls.require_node`'s rule, memoised per certificate by
`NodeIdentities`), then hands plain values to the service layer.
Errors are `fleet.errors` exceptions mapped to status codes by the
ErrorMappingInterceptor.
"""

from __future__ import annotations

from typing import Any

from grpc import aio

from fleet.pending_rpcs import PendingManagerRpcs
from fleet.v1 import common_pb2, manager_pb2, manager_pb2_grpc
from manager.service.agents import AgentStates
from manager.service.metrics import MetricsService
from manager.service.model import MetricPoint, Registration
from manager.service.registry import NodeRegistry
from manager.servicers.identity import NodeIdentities
from manager.storage import AgentStateRecord

__all__ = ["ManagerServicer", "agent_state_record", "last_exit_fields"]

_Context = aio.ServicerContext[Any, Any]


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    try:
        name: str = enum.Name(value)
    except ValueError:
        return f"#{value}"  # an enum number this manager does not know; refused by validation
    return name.removeprefix(prefix)


def agent_state_record(node_id: str, st: manager_pb2.AgentState) -> AgentStateRecord:
    """The storage record for one AgentState message."""
    return AgentStateRecord(
        node_id=node_id,
        agent_id=st.agent_id,
        status=_enum_name(common_pb2.AgentStatus, st.status, "AGENT_STATUS_"),
        pid=st.pid,
        last_heartbeat_ms=st.last_heartbeat,
        type=st.type,
        version=st.version,
        start_time_ms=st.start_time,
        restart_count=st.restart_count,
        exit_code=st.exit_code,
        message=st.message,
        labels=dict(st.labels),
        health=_enum_name(common_pb2.AgentHealth, st.health, "AGENT_HEALTH_"),
        config_version=st.config_version,
        **last_exit_fields(st.last_exit if st.HasField("last_exit") else None),
    )


def last_exit_fields(msg: common_pb2.LastExit | None) -> dict[str, Any]:
    """The AgentStateRecord fields of a LastExit message (empty ones for None)."""
    if msg is None:
        return {}
    kind = _enum_name(common_pb2.AgentExitKind, msg.kind, "AGENT_EXIT_KIND_")
    return {
        "last_exit_kind": "" if kind == "UNSPECIFIED" else kind.lower(),
        "last_exit_code": msg.exit_code,
        "last_exit_reason": msg.reason,
        "last_exit_ms": msg.time,
    }


class ManagerServicer(PendingManagerRpcs, manager_pb2_grpc.ManagerServiceServicer):
    """Serves ManagerService for `node/*` callers."""

    def __init__(
        self,
        registry: NodeRegistry,
        metrics: MetricsService,
        agents: AgentStates,
        *,
        trust_domain: str,
    ) -> None:
        self._registry = registry
        self._metrics = metrics
        self._agents = agents
        self._identities = NodeIdentities(trust_domain)

    async def RegisterNode(
        self, request: manager_pb2.RegisterNodeRequest, context: _Context
    ) -> manager_pb2.RegisterNodeResponse:
        self._identities.require_node(context, request.node_id)
        result = await self._registry.register(
            Registration(
                node_id=request.node_id,
                hostname=request.hostname,
                ip=request.ip,
                os=request.os,
                arch=request.arch,
                labels=dict(request.labels),
                daemon_version=request.daemon_version,
                agent_version=request.agent_version,
                daemon_address=request.daemon_address,
            )
        )
        return manager_pb2.RegisterNodeResponse(
            success=True,
            message="registered" if result.created else "re-registered",
            heartbeat_interval_ms=result.heartbeat_interval_ms,
            server_time=result.server_time_ms,
        )

    async def Heartbeat(
        self, request: manager_pb2.HeartbeatRequest, context: _Context
    ) -> manager_pb2.HeartbeatResponse:
        self._identities.require_node(context, request.node_id)
        interval = await self._registry.heartbeat(request.node_id, request.timestamp)
        return manager_pb2.HeartbeatResponse(success=True, heartbeat_interval_ms=interval)

    async def ReportMetrics(
        self, request: manager_pb2.ReportMetricsRequest, context: _Context
    ) -> manager_pb2.ReportMetricsResponse:
        self._identities.require_node(context, request.node_id)
        points = [
            MetricPoint(
                type=m.type, timestamp_ms=m.timestamp, values=dict(m.values), agent_id=m.agent_id
            )
            for m in request.metrics
        ]
        result = await self._metrics.ingest(request.node_id, request.sequence, points)
        return manager_pb2.ReportMetricsResponse(
            success=True,
            message="stored" if result.stored else "duplicate: batch stored earlier",
            duplicate=not result.stored,
            accepted=result.accepted,
        )

    async def SyncAgentStates(
        self, request: manager_pb2.SyncAgentStatesRequest, context: _Context
    ) -> manager_pb2.SyncAgentStatesResponse:
        self._identities.require_node(context, request.node_id)
        states = [agent_state_record(request.node_id, st) for st in request.states]
        changed = await self._agents.sync(request.node_id, states)
        return manager_pb2.SyncAgentStatesResponse(success=True, changed=changed)
