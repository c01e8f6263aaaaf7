"""Protobuf <-> daemon domain values, in one place.

The supervisor knows nothing of protobuf; the servicers and the manager link
call these functions at the edge.

Pushed specs (`AgentSpec` messages) follow proto3 rules: an unset scalar is
its zero value. Where zero is not a usable setting (stop signal, stop
timeout, log size, backoff parameters, health timeout, restart policy,
expected exit codes) the zero means "the default of the TOML spec", so a
manager can send only what it cares about. `autostart`, `start_secs`,
`max_retries` and `log_backups` are taken literally (0 / false are valid).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any, Literal

from daemon.sampler import HostSample, ResourceSample
from daemon.supervisor.spec import AgentSpec, BackoffSpec, HealthSpec
from daemon.supervisor.supervisor import AgentSnapshot
from fleet.errors import InvalidArgument
from fleet.v1 import common_pb2, manager_pb2

__all__ = [
    "agent_info",
    "agent_state",
    "host_metrics",
    "resource_metrics",
    "resource_point",
    "spec_from_proto",
    "spec_to_proto",
    "specs_from_proto",
]

_HEALTH_TO_PROTO: dict[str, common_pb2.AgentHealth.ValueType] = {
    "none": common_pb2.AGENT_HEALTH_UNSPECIFIED,
    "healthy": common_pb2.AGENT_HEALTH_HEALTHY,
    "unhealthy": common_pb2.AGENT_HEALTH_UNHEALTHY,
    "pending": common_pb2.AGENT_HEALTH_PENDING,
}

_RESTART_FROM_PROTO: dict[int, Literal["always", "on-failure", "never"]] = {
    common_pb2.RESTART_POLICY_UNSPECIFIED: "on-failure",
    common_pb2.RESTART_POLICY_ALWAYS: "always",
    common_pb2.RESTART_POLICY_ON_FAILURE: "on-failure",
    common_pb2.RESTART_POLICY_NEVER: "never",
}
_RESTART_TO_PROTO: dict[str, common_pb2.RestartPolicy.ValueType] = {
    "always": common_pb2.RESTART_POLICY_ALWAYS,
    "on-failure": common_pb2.RESTART_POLICY_ON_FAILURE,
    "never": common_pb2.RESTART_POLICY_NEVER,
}


def _status(snapshot: AgentSnapshot) -> common_pb2.AgentStatus.ValueType:
    return common_pb2.AgentStatus.Value("AGENT_STATUS_" + snapshot.status.name)


def agent_info(snapshot: AgentSnapshot) -> common_pb2.AgentInfo:
    """The `AgentInfo` message for one supervised agent."""
    return common_pb2.AgentInfo(
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
    )


def agent_state(snapshot: AgentSnapshot) -> manager_pb2.AgentState:
    """The `AgentState` message the manager link sends in SyncAgentStates."""
    return manager_pb2.AgentState(
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
    )


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
        md("cpu", {"usage_percent": sample.cpu_percent}),
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


def _or_default(value: float, default: float) -> float:
    return value if value else default


def _spec_default(name: str) -> Any:
    for f in dataclasses.fields(AgentSpec):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    raise KeyError(name)  # a renamed AgentSpec field: a bug here, caught by the tests


def spec_from_proto(msg: common_pb2.AgentSpec, *, where: str = "agent") -> AgentSpec:
    """Build an `AgentSpec` from its message (not yet validated: `apply` does).

    Raises InvalidArgument naming `where` and the field for values that have
    no dataclass form (an unknown enum value, config that is not UTF-8).
    """
    restart = _RESTART_FROM_PROTO.get(msg.restart)
    if restart is None:
        raise InvalidArgument(f"unknown restart policy {msg.restart}", field=f"{where}.restart")
    if msg.health.kind not in (
        common_pb2.HEALTH_CHECK_KIND_UNSPECIFIED,
        common_pb2.HEALTH_CHECK_KIND_HEARTBEAT,
    ):
        raise InvalidArgument(
            f"unknown health kind {msg.health.kind}", field=f"{where}.health.kind"
        )
    try:
        config = msg.config.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument("is not UTF-8 text", field=f"{where}.config") from None
    d_backoff = BackoffSpec()
    d_health = HealthSpec()
    return AgentSpec(
        id=msg.id,
        argv=tuple(msg.argv),
        type=msg.type or _spec_default("type"),
        version=msg.version,
        env=dict(msg.env),
        cwd=msg.cwd,
        user=msg.user,
        autostart=msg.autostart,
        restart=restart,
        expected_exit_codes=tuple(msg.expected_exit_codes) or _spec_default("expected_exit_codes"),
        start_secs=msg.start_secs,
        backoff=BackoffSpec(
            initial=_or_default(msg.backoff.initial_seconds, d_backoff.initial),
            multiplier=_or_default(msg.backoff.multiplier, d_backoff.multiplier),
            max=_or_default(msg.backoff.max_seconds, d_backoff.max),
            jitter=msg.backoff.jitter,
        ),
        max_retries=msg.max_retries,
        stop_signal=msg.stop_signal or _spec_default("stop_signal"),
        stop_timeout=_or_default(msg.stop_timeout_seconds, _spec_default("stop_timeout")),
        log_max_bytes=msg.log_max_bytes or _spec_default("log_max_bytes"),
        log_backups=msg.log_backups,
        labels=dict(msg.labels),
        health=HealthSpec(
            kind="heartbeat"
            if msg.health.kind == common_pb2.HEALTH_CHECK_KIND_HEARTBEAT
            else "none",
            timeout=_or_default(msg.health.timeout_seconds, d_health.timeout),
        ),
        config=config,
    )


def specs_from_proto(msgs: Iterable[common_pb2.AgentSpec]) -> list[AgentSpec]:
    """Every pushed spec, each error naming `agents[i]` (or the agent's id)."""
    out: list[AgentSpec] = []
    for i, msg in enumerate(msgs):
        out.append(spec_from_proto(msg, where=f"agents[{i}]" + (f" ({msg.id})" if msg.id else "")))
    return out


def spec_to_proto(spec: AgentSpec) -> common_pb2.AgentSpec:
    """The message form of a spec (the inverse of `spec_from_proto`)."""
    return common_pb2.AgentSpec(
        id=spec.id,
        type=spec.type,
        version=spec.version,
        argv=list(spec.argv),
        env=dict(spec.env),
        cwd=spec.cwd,
        user=spec.user,
        autostart=spec.autostart,
        restart=_RESTART_TO_PROTO[spec.restart],
        expected_exit_codes=list(spec.expected_exit_codes),
        start_secs=spec.start_secs,
        backoff=common_pb2.Backoff(
            initial_seconds=spec.backoff.initial,
            multiplier=spec.backoff.multiplier,
            max_seconds=spec.backoff.max,
            jitter=spec.backoff.jitter,
        ),
        max_retries=spec.max_retries,
        stop_signal=spec.stop_signal,
        stop_timeout_seconds=spec.stop_timeout,
        log_max_bytes=spec.log_max_bytes,
        log_backups=spec.log_backups,
        labels=dict(spec.labels),
        health=common_pb2.HealthCheck(
            kind=common_pb2.HEALTH_CHECK_KIND_HEARTBEAT
            if spec.health.kind == "heartbeat"
            else common_pb2.HEALTH_CHECK_KIND_UNSPECIFIED,
            timeout_seconds=spec.health.timeout,
        ),
        config=spec.config.encode("utf-8"),
    )
