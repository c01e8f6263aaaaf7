"""`AgentService`: the server side of what supervised agents ask (SDK calls).

The caller is identified by the process behind its connection (SO_PEERCRED,
read by `daemon.peercred.PeerCredProxy`), never by what it claims: the pid
must be in the process tree of a supervised agent, and that agent is the
only one it may speak for.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from grpc import aio

from daemon.peercred import PeerInfo
from daemon.supervisor.supervisor import Supervisor
from fleet.errors import InvalidArgument, PermissionDenied
from fleet.v1 import agent_pb2, agent_pb2_grpc, common_pb2

__all__ = ["MAX_CUSTOM_METRICS", "AgentServicer", "MetricSink"]

_Context = aio.ServicerContext[Any, Any]
MetricSink = Callable[[Sequence[common_pb2.MetricData]], None]
"""Where accepted custom metrics go (the manager link's buffer)."""

MAX_CUSTOM_METRICS = 1000
"""Samples per ReportMetrics call; more is INVALID_ARGUMENT (send smaller batches)."""
_METRIC_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,62}")


def config_message(payload: bytes, version: int) -> agent_pb2.AgentConfig:
    """An `AgentConfig` with the checksum the SDK verifies."""
    return agent_pb2.AgentConfig(
        payload=payload, version=version, sha256=hashlib.sha256(payload).hexdigest()
    )


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """Serves the supervisor's SDK hooks to the agents it runs.

    `identify` maps `context.peer()` to the connecting process; `metric_sink`
    receives custom metrics tagged with the agent's id; `heartbeat_interval`
    is what Register tells agents (shortened to a third of a heartbeat health
    check's timeout so one lost heartbeat does not make an agent unhealthy).
    """

    def __init__(
        self,
        supervisor: Supervisor,
        *,
        identify: Callable[[str], PeerInfo | None],
        metric_sink: MetricSink,
        heartbeat_interval: float = 5.0,
    ) -> None:
        self._sup = supervisor
        self._identify = identify
        self._sink = metric_sink
        self._heartbeat_interval = heartbeat_interval

    def _caller(self, context: _Context, agent_id: str) -> tuple[str, PeerInfo]:
        """The agent the calling process belongs to; it must be `agent_id`."""
        peer = self._identify(context.peer())
        if peer is None:
            raise PermissionDenied(
                "the calling process could not be identified; connect through the daemon's "
                "agent socket (FLEET_DAEMON_SOCKET)"
            )
        owner = self._sup.agent_for_pid(peer.pid) if peer.still_same_process() else None
        if owner is None:
            raise PermissionDenied(
                f"process {peer.pid} is not an agent supervised by this daemon "
                "(nor a descendant of one)"
            )
        if not agent_id:
            raise InvalidArgument(f"is required (this process is agent {owner})", field="agent_id")
        if agent_id != owner:
            raise PermissionDenied(
                f"process {peer.pid} belongs to agent {owner} "
                f"and may not speak for agent {agent_id}"
            )
        return owner, peer

    def _interval_ms(self, agent_id: str) -> int:
        interval = self._heartbeat_interval
        spec = self._sup.spec(agent_id)
        if spec.health.kind == "heartbeat":
            interval = min(interval, spec.health.timeout / 3)
        return max(1, round(interval * 1000))

    def _stop_timeout_ms(self, agent_id: str) -> int:
        return round(self._sup.spec(agent_id).stop_timeout * 1000)

    async def Register(
        self, request: agent_pb2.AgentServiceRegisterRequest, context: _Context
    ) -> agent_pb2.AgentServiceRegisterResponse:
        agent_id, peer = self._caller(context, request.agent_id)
        self._sup.agent_registered(agent_id, version=request.version, pid=peer.pid)
        payload, version = self._sup.config_of(agent_id)
        return agent_pb2.AgentServiceRegisterResponse(
            config=config_message(payload, version),
            heartbeat_interval_ms=self._interval_ms(agent_id),
            stop_timeout_ms=self._stop_timeout_ms(agent_id),
        )

    async def Heartbeat(
        self, request: agent_pb2.AgentServiceHeartbeatRequest, context: _Context
    ) -> agent_pb2.AgentServiceHeartbeatResponse:
        agent_id, _ = self._caller(context, request.agent_id)
        self._sup.agent_heartbeat(agent_id)
        _, version = self._sup.config_of(agent_id)
        return agent_pb2.AgentServiceHeartbeatResponse(config_version=version)

    async def ReportMetrics(
        self, request: agent_pb2.AgentServiceReportMetricsRequest, context: _Context
    ) -> agent_pb2.AgentServiceReportMetricsResponse:
        agent_id, _ = self._caller(context, request.agent_id)
        if len(request.metrics) > MAX_CUSTOM_METRICS:
            raise InvalidArgument(
                f"{len(request.metrics)} samples; at most {MAX_CUSTOM_METRICS} per call",
                field="metrics",
            )
        out: list[common_pb2.MetricData] = []
        for i, m in enumerate(request.metrics):
            where = f"metrics[{i}]"
            if not _METRIC_NAME.fullmatch(m.type):
                raise InvalidArgument(
                    f"{m.type!r} is not a metric name ([a-z][a-z0-9_.-]{{0,62}})",
                    field=f"{where}.type",
                )
            if m.timestamp <= 0:
                raise InvalidArgument("must be epoch milliseconds > 0", field=f"{where}.timestamp")
            if not m.values:
                raise InvalidArgument("needs at least one value", field=f"{where}.values")
            for name, value in m.values.items():
                if not _METRIC_NAME.fullmatch(name):
                    raise InvalidArgument(f"{name!r} is not a value name", field=f"{where}.values")
                if not math.isfinite(value):
                    raise InvalidArgument(f"{name} is not finite", field=f"{where}.values")
            out.append(
                common_pb2.MetricData(
                    type=m.type, timestamp=m.timestamp, values=dict(m.values), agent_id=agent_id
                )
            )
        self._sink(out)
        return agent_pb2.AgentServiceReportMetricsResponse(accepted=len(out))

    async def GetConfig(
        self, request: agent_pb2.AgentServiceGetConfigRequest, context: _Context
    ) -> agent_pb2.AgentServiceGetConfigResponse:
        agent_id, _ = self._caller(context, request.agent_id)
        payload, version = self._sup.config_of(agent_id)
        return agent_pb2.AgentServiceGetConfigResponse(config=config_message(payload, version))

    async def WatchConfig(
        self, request: agent_pb2.AgentServiceWatchConfigRequest, context: _Context
    ) -> AsyncIterator[agent_pb2.AgentServiceWatchConfigResponse]:
        agent_id, _ = self._caller(context, request.agent_id)
        async for payload, version in self._sup.watch_config(agent_id, request.after_version):
            yield agent_pb2.AgentServiceWatchConfigResponse(config=config_message(payload, version))
