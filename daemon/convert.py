"""Protobuf <-> daemon domain values, in one place.

The supervisor knows nothing of protobuf; the servicers and the manager link
call these functions at the edge. Agent specs convert in `fleet.agentspec`,
shared with the manager.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from daemon.sampler import HostSample, ResourceSample
from daemon.supervisor.policy import LastExit
from daemon.supervisor.spec import AgentSpec
from daemon.supervisor.supervisor import AgentSnapshot, Refusal
from fleet.agentspec import spec_to_proto
from fleet.v1 import common_pb2, manager_pb2

__all__ = [
    "agent_info",
    "agent_state",
    "host_metrics",
    "last_exit",
    "resource_metrics",
    "resource_point",
    "shown_spec",
]

_HEALTH_TO_PROTO: dict[str, common_pb2.AgentHealth.ValueType] = {
    "none": common_pb2.AGENT_HEALTH_UNSPECIFIED,
    "healthy": common_pb2.AGENT_HEALTH_HEALTHY,
    "unhealthy": common_pb2.AGENT_HEALTH_UNHEALTHY,
    "pending": common_pb2.AGENT_HEALTH_PENDING,
}


def _status(snapshot: AgentSnapshot) -> common_pb2.AgentStatus.ValueType:
    return common_pb2.AgentStatus.Value("AGENT_STATUS_" + snapshot.status.name)


_EXIT_KIND = {
    "exited": common_pb2.AGENT_EXIT_KIND_EXITED,
    "killed": common_pb2.AGENT_EXIT_KIND_KILLED,
    "unhealthy": common_pb2.AGENT_EXIT_KIND_UNHEALTHY,
    "operator": common_pb2.AGENT_EXIT_KIND_OPERATOR,
    "updated": common_pb2.AGENT_EXIT_KIND_UPDATED,
    "daemon": common_pb2.AGENT_EXIT_KIND_DAEMON,
    "start_failed": common_pb2.AGENT_EXIT_KIND_START_FAILED,
    "unknown": common_pb2.AGENT_EXIT_KIND_UNKNOWN,
}


def last_exit(how: LastExit | None) -> common_pb2.LastExit | None:
    """The `LastExit` message (None when the agent never exited)."""
    if how is None:
        return None
    return common_pb2.LastExit(
        kind=_EXIT_KIND[how.kind], exit_code=how.code, reason=how.reason, time=int(how.at * 1000)
    )


def shown_spec(spec: AgentSpec) -> common_pb2.AgentSpec:
    """The spec as a daemon shows it to the manager: env names only (values may be secrets)."""
    msg = spec_to_proto(spec)
    # Over a copy of the names: assigning while iterating a protobuf map can skip entries
    # (seen: a value left in place, i.e. a secret sent to the manager).
    for name in list(msg.env):
        msg.env[name] = ""
    return msg


def agent_info(
    snapshot: AgentSnapshot, *, spec: AgentSpec | None = None, log_path: str = ""
) -> common_pb2.AgentInfo:
    """The `AgentInfo` message for one supervised agent (with its spec, when given)."""
    return common_pb2.AgentInfo(
        last_exit=last_exit(snapshot.last_exit),
        spec=shown_spec(spec) if spec is not None else None,
        log_path=log_path,
        id=snapshot.id,
        type=snapshot.type,
        status=_status(snapshot),
        pid=snapshot.pid,
        version=snapshot.version,
        start_time=snapshot.start_time_ms,
        restart_count=snapshot.restart_count,
        last_heartbeat=snapshot.last_heartbeat_ms,
        exit_code=snapshot.exit_code,
        message=snapshot.message,
        labels=dict(snapshot.labels),
        health=_HEALTH_TO_PROTO.get(snapshot.health, common_pb2.AGENT_HEALTH_UNSPECIFIED),
        backoff_until=snapshot.backoff_until_ms,
        config_version=snapshot.config_version,
        revision=snapshot.revision,
        health_message=snapshot.health_message,
        health_since=snapshot.health_since_ms,
        log_problem=snapshot.log_problem,
        health_age_ms=snapshot.health_age_ms,
        start_age_ms=snapshot.start_age_ms,
    )


def agent_state(snapshot: AgentSnapshot) -> manager_pb2.AgentState:
    """The `AgentState` message the manager link sends in SyncAgentStates."""
    return manager_pb2.AgentState(
        last_exit=last_exit(snapshot.last_exit),
        agent_id=snapshot.id,
        status=_status(snapshot),
        pid=snapshot.pid,
        last_heartbeat=snapshot.last_heartbeat_ms,
        type=snapshot.type,
        version=snapshot.version,
        start_time=snapshot.start_time_ms,
        restart_count=snapshot.restart_count,
        exit_code=snapshot.exit_code,
        message=snapshot.message,
        labels=dict(snapshot.labels),
        health=_HEALTH_TO_PROTO.get(snapshot.health, common_pb2.AGENT_HEALTH_UNSPECIFIED),
        config_version=snapshot.config_version,
        revision=snapshot.revision,
        health_message=snapshot.health_message,
        health_since=snapshot.health_since_ms,
        log_problem=snapshot.log_problem,
        health_age_ms=snapshot.health_age_ms,
        start_age_ms=snapshot.start_age_ms,
    )


def update_errors(refused: Iterable[Refusal]) -> list[common_pb2.UpdateError]:
    """The supervisor's refusals as `UpdateError` messages (PushUpdate, SyncAgentStates)."""
    return [
        common_pb2.UpdateError(agent_id=r.agent_id, revision=r.revision, reason=r.reason)
        for r in refused
    ]


def resource_point(sample: ResourceSample) -> common_pb2.ResourceDataPoint:
    """One ring-buffer sample as a `ResourceDataPoint`."""
    return common_pb2.ResourceDataPoint(
        timestamp=sample.timestamp_ms,
        cpu=sample.cpu_percent,
        memory_rss=sample.rss,
        memory_vms=sample.vms,
        disk_read_bytes=sample.read_bytes,
        disk_write_bytes=sample.write_bytes,
        open_files=sample.open_files,
        threads=sample.threads,
        processes=sample.processes,
    )


def resource_metrics(agent_id: str, sample: ResourceSample) -> list[common_pb2.MetricData]:
    """One agent sample as the manager's metric vocabulary.

    cpu {usage_percent}, memory {rss_bytes, vms_bytes}, disk {read_bytes,
    write_bytes} and a custom "process" {open_files, threads, processes}, all
    tagged with the agent's id.
    """
    ts = sample.timestamp_ms

    def md(kind: str, values: dict[str, float]) -> common_pb2.MetricData:
        finite = {k: float(v) for k, v in values.items() if math.isfinite(float(v))}
        return common_pb2.MetricData(type=kind, timestamp=ts, values=finite, agent_id=agent_id)

    return [
        md("cpu", {"usage_percent": sample.cpu_percent}),
        md("memory", {"rss_bytes": sample.rss, "vms_bytes": sample.vms}),
        md("disk", {"read_bytes": sample.read_bytes, "write_bytes": sample.write_bytes}),
        md(
            "process",
            {
                "open_files": sample.open_files,
                "threads": sample.threads,
                "processes": sample.processes,
            },
        ),
    ]


def host_metrics(sample: HostSample) -> list[common_pb2.MetricData]:
    """A host sample as cpu, memory, disk and network metrics (empty agent_id)."""
    ts = sample.timestamp_ms
    mem, disk, net = sample.memory, sample.disk, sample.network

    def md(kind: str, values: dict[str, float]) -> common_pb2.MetricData:
        finite = {k: float(v) for k, v in values.items() if math.isfinite(float(v))}
        return common_pb2.MetricData(type=kind, timestamp=ts, values=finite)

    return [
        md("cpu", {"usage_percent": sample.cpu_percent, "cores": sample.cores}),
        md(
            "memory",
            {
                "total_bytes": mem.total,
                "used_bytes": mem.used,
                "available_bytes": mem.available,
                "usage_percent": mem.percent,
            },
        ),
        md(
            "disk",
            {
                "total_bytes": disk.total,
                "used_bytes": disk.used,
                "usage_percent": disk.percent,
                "read_bytes": disk.read_bytes,
                "write_bytes": disk.write_bytes,
            },
        ),
        md(
            "network",
            {
                "bytes_sent": net.bytes_sent,
                "bytes_recv": net.bytes_recv,
                "packets_sent": net.packets_sent,
                "packets_recv": net.packets_recv,
                "errors_in": net.errors_in,
                "errors_out": net.errors_out,
            },
        ),
    ]
