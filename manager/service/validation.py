"""Request validation: every check names the field, nothing is written first.

Pure functions of plain values (and `now_ms`); they raise
`fleet.errors.InvalidArgument` (or `fleet.labels.LabelError`, a subclass).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Sequence

from fleet.clockskew import METRICS_MAX_FUTURE_MS, offset_words
from fleet.errors import InvalidArgument
from fleet.labels import validate_label_value, validate_labels, validate_node_id
from manager.service.model import MetricPoint, Registration
from manager.storage import AgentStateRecord, MetricBatch, MetricSample

__all__ = [
    "AGENT_EXIT_KINDS",
    "AGENT_HEALTH",
    "AGENT_STATUSES",
    "BUILTIN_METRIC_TYPES",
    "MAX_AGENTS_PER_SYNC",
    "MAX_LABELS",
    "metric_batch",
    "validate_agent_states",
    "validate_registration",
    "validate_timestamp",
]

MAX_LABELS = 64
"""Labels per node or agent."""
MAX_AGENTS_PER_SYNC = 1000
"""Agents in one SyncAgentStates snapshot."""
MAX_SHORT = 64
"""os, arch, versions, agent type."""
MAX_HOSTNAME = 253
"""A DNS name's limit."""
MAX_MESSAGE = 1024
"""An agent's status message."""
MAX_ADDRESS = 300
"""host:port of a DaemonService."""

BUILTIN_METRIC_TYPES = frozenset({"cpu", "memory", "disk", "network"})
"""Metric types every daemon reports; any other name is a custom type."""
_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,62}")
AGENT_STATUSES = frozenset(
    {"STOPPED", "STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED", "FATAL", "UNKNOWN"}
)
"""Agent states a daemon may report (supervisord's vocabulary)."""
AGENT_HEALTH = frozenset({"", "UNSPECIFIED", "HEALTHY", "UNHEALTHY", "PENDING"})
"""Agent health values ("" and UNSPECIFIED: the agent has no health check)."""
AGENT_EXIT_KINDS = frozenset(
    {
        "",
        "exited",
        "killed",
        "unhealthy",
        "operator",
        "updated",
        "daemon",
        "start_failed",
        "unknown",
    }
)
"""Last-exit kinds a daemon may report ("" = the agent never exited)."""
_INT32_MAX = 2**31 - 1
_HOSTNAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_]{0,61}[A-Za-z0-9])?")


def _bounded(value: str, field: str, limit: int, *, required: bool = False) -> None:
    if required and not value.strip():
        raise InvalidArgument("must not be empty", field=field)
    if len(value) > limit:
        raise InvalidArgument(f"must be at most {limit} characters, got {len(value)}", field=field)
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidArgument("must not contain control characters", field=field)


def _hostname(value: str, field: str) -> None:
    _bounded(value, field, MAX_HOSTNAME)
    if value and not all(_HOSTNAME.fullmatch(part) for part in value.rstrip(".").split(".")):
        raise InvalidArgument(f"{value!r} is not a valid host name", field=field)


def _host_port(value: str, field: str) -> None:
    _bounded(value, field, MAX_ADDRESS)
    if not value:
        return
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) <= 65535:
        raise InvalidArgument(
            f"expected host:port with a port in 1..65535, got {value!r}", field=field
        )
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        _hostname(host, field)
        if not host:
            raise InvalidArgument(f"expected host:port, got {value!r}", field=field) from None


def validate_registration(reg: Registration) -> None:
    """Raise InvalidArgument naming the first bad field of a RegisterNode."""
    validate_node_id(reg.node_id)
    _hostname(reg.hostname, "hostname")
    if not reg.ip:
        raise InvalidArgument("must not be empty", field="ip")
    try:
        ipaddress.ip_address(reg.ip)
    except ValueError:
        raise InvalidArgument(
            f"{reg.ip[:64]!r} is not an IPv4 or IPv6 address", field="ip"
        ) from None
    _bounded(reg.os, "os", MAX_SHORT, required=True)
    _bounded(reg.arch, "arch", MAX_SHORT, required=True)
    _bounded(reg.daemon_version, "daemon_version", MAX_SHORT)
    _bounded(reg.agent_version, "agent_version", MAX_SHORT)
    _host_port(reg.daemon_address, "daemon_address")
    validate_labels(reg.labels, max_labels=MAX_LABELS, field="labels")


def validate_timestamp(
    ts_ms: int, *, now_ms: int, max_past_ms: int, max_future_ms: int, field: str
) -> None:
    """Refuse a timestamp outside [now - max_past, now + max_future]; the message says how
    far off it is in words (what a daemon logs: its host's clock is the likely cause)."""
    if ts_ms < now_ms - max_past_ms:
        raise InvalidArgument(
            f"{ts_ms} is {offset_words(ts_ms - now_ms)}'s clock, more than"
            f" {max_past_ms // 1000} s (server time {now_ms}); if this host's clock is"
            " behind, run NTP",
            field=field,
        )
    if ts_ms > now_ms + max_future_ms:
        raise InvalidArgument(
            f"{ts_ms} is {offset_words(ts_ms - now_ms)}'s clock, more than"
            f" {max_future_ms // 1000} s (server time {now_ms}); this host's clock is ahead:"
            " run NTP",
            field=field,
        )


def metric_batch(
    node_id: str,
    sequence: int,
    points: Sequence[MetricPoint],
    *,
    now_ms: int,
    max_past_ms: int,
    max_samples: int,
    max_future_ms: int = METRICS_MAX_FUTURE_MS,
) -> MetricBatch:
    """Validate a ReportMetrics request and flatten it into a MetricBatch."""
    if sequence <= 0 or sequence >= 2**63:
        raise InvalidArgument("must be in 1..2^63-1 (per-node batch counter)", field="sequence")
    if not points:
        raise InvalidArgument("must contain at least one sample", field="metrics")
    total = sum(len(p.values) for p in points)
    if total > max_samples:
        raise InvalidArgument(
            f"batch has {total} values, at most {max_samples} are allowed; send smaller batches",
            field="metrics",
        )
    samples: list[MetricSample] = []
    for i, point in enumerate(points):
        where = f"metrics[{i}]"
        if not _NAME.fullmatch(point.type):
            raise InvalidArgument(
                f"{point.type[:80]!r} is not cpu, memory, disk, network or a custom name "
                "([a-z][a-z0-9_.-]{0,62})",
                field=f"{where}.type",
            )
        if point.agent_id:
            validate_label_value(point.agent_id, field=f"{where}.agent_id")
        validate_timestamp(
            point.timestamp_ms,
            now_ms=now_ms,
            max_past_ms=max_past_ms,
            max_future_ms=max_future_ms,
            field=f"{where}.timestamp",
        )
        if not point.values:
            raise InvalidArgument("must contain at least one value", field=f"{where}.values")
        for name, value in point.values.items():
            if not _NAME.fullmatch(name):
                raise InvalidArgument(
                    f"value name {name[:80]!r} must match [a-z][a-z0-9_.-]{{0,62}}",
                    field=f"{where}.values",
                )
            if not math.isfinite(value):
                raise InvalidArgument(
                    f"{value} is not a finite number", field=f"{where}.values[{name}]"
                )
            samples.append(
                MetricSample(point.agent_id, point.type, name, point.timestamp_ms, value)
            )
    return MetricBatch(node_id=node_id, sequence=sequence, samples=tuple(samples))


def validate_spec_version(version: int) -> None:
    """A daemon's reported pushed-set version (uint64 on the wire, int64 in SQL)."""
    if not 0 <= version < 2**63:
        raise InvalidArgument(f"must be in 0..2^63-1, got {version}", field="spec_version")


def validate_agent_states(states: Sequence[AgentStateRecord]) -> None:
    """Raise InvalidArgument naming the first bad field of a SyncAgentStates."""
    if len(states) > MAX_AGENTS_PER_SYNC:
        raise InvalidArgument(
            f"at most {MAX_AGENTS_PER_SYNC} agents per snapshot, got {len(states)}",
            field="states",
        )
    seen: set[str] = set()
    for i, st in enumerate(states):
        where = f"states[{i}]"
        if not st.agent_id:
            raise InvalidArgument("must not be empty", field=f"{where}.agent_id")
        validate_label_value(st.agent_id, field=f"{where}.agent_id")
        if st.agent_id in seen:
            raise InvalidArgument(f"agent {st.agent_id!r} appears twice", field=f"{where}.agent_id")
        seen.add(st.agent_id)
        if st.status not in AGENT_STATUSES:
            raise InvalidArgument(
                f"{st.status!r} is not a known agent status", field=f"{where}.status"
            )
        if st.health not in AGENT_HEALTH:
            raise InvalidArgument(f"{st.health!r} is not a known health", field=f"{where}.health")
        for name, value in (("pid", st.pid), ("restart_count", st.restart_count)):
            if not 0 <= value <= _INT32_MAX:
                raise InvalidArgument(f"must be >= 0, got {value}", field=f"{where}.{name}")
        for name, ts in (
            ("last_heartbeat", st.last_heartbeat_ms),
            ("start_time", st.start_time_ms),
        ):
            if ts < 0:
                raise InvalidArgument(f"must be >= 0 (epoch ms), got {ts}", field=f"{where}.{name}")
        if st.config_version < 0 or st.config_version >= 2**63:
            raise InvalidArgument("must be in 0..2^63-1", field=f"{where}.config_version")
        _bounded(st.type, f"{where}.type", MAX_SHORT)
        _bounded(st.version, f"{where}.version", MAX_SHORT)
        if len(st.message) > MAX_MESSAGE:
            raise InvalidArgument(
                f"must be at most {MAX_MESSAGE} characters", field=f"{where}.message"
            )
        # Free text (an exit reason may span lines), but PostgreSQL text cannot hold NUL.
        if "\x00" in st.message:
            raise InvalidArgument("must not contain NUL characters", field=f"{where}.message")
        if st.last_exit_kind not in AGENT_EXIT_KINDS:
            raise InvalidArgument(
                f"{st.last_exit_kind!r} is not a known exit kind", field=f"{where}.last_exit.kind"
            )
        if len(st.last_exit_reason) > MAX_MESSAGE or "\x00" in st.last_exit_reason:
            raise InvalidArgument(
                f"must be at most {MAX_MESSAGE} characters, without NUL",
                field=f"{where}.last_exit.reason",
            )
        if len(st.health_message) > MAX_MESSAGE or "\x00" in st.health_message:
            raise InvalidArgument(
                f"must be at most {MAX_MESSAGE} characters, without NUL",
                field=f"{where}.health_message",
            )
        if len(st.log_problem) > MAX_MESSAGE or "\x00" in st.log_problem:
            raise InvalidArgument(
                f"must be at most {MAX_MESSAGE} characters, without NUL",
                field=f"{where}.log_problem",
            )
        if st.health_since_ms < 0:
            raise InvalidArgument(
                f"must be >= 0 (epoch ms), got {st.health_since_ms}", field=f"{where}.health_since"
            )
        if not 0 <= st.revision < 2**63:
            raise InvalidArgument("must be in 0..2^63-1", field=f"{where}.revision")
        if st.last_exit_ms < 0:
            raise InvalidArgument(
                f"must be >= 0 (epoch ms), got {st.last_exit_ms}", field=f"{where}.last_exit.time"
            )
        validate_labels(st.labels, max_labels=MAX_LABELS, field=f"{where}.labels")
