"""What the servicer hands the service layer: requests as plain values.

Field names match the protobuf fields so validation errors can name the
field the client sent ("metrics[3].values[cpu]").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["MetricPoint", "Registration"]


@dataclass(frozen=True)
class Registration:
    """A RegisterNode request."""

    node_id: str
    """The node (already checked against the caller's certificate)."""
    hostname: str = ""
    """The host's name as the node sees it."""
    ip: str = ""
    """The node's IP address (v4 or v6)."""
    os: str = ""
    """Operating system, e.g. "linux"."""
    arch: str = ""
    """CPU architecture, e.g. "x86_64"."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Kubernetes-syntax labels."""
    daemon_version: str = ""
    """Version of fleet-daemon."""
    agent_version: str = ""
    """Version of the agent runtime the daemon bundles."""
    daemon_address: str = ""
    """host:port of the node's DaemonService."""
    jobs_disabled: bool = False
    """The host refuses remote jobs (its daemon's `[jobs] enabled = false`)."""
    cert_not_after_ms: int = 0
    """When the certificate the daemon presented expires (0: unknown)."""
    clock_ms: int = 0
    """The node's wall clock as it sent the registration, epoch ms (0: not said)."""


@dataclass(frozen=True)
class MetricPoint:
    """One MetricData: several named values of one type at one time."""

    type: str
    """cpu, memory, disk, network or a custom name."""
    timestamp_ms: int
    """When it was sampled (epoch ms)."""
    values: Mapping[str, float]
    """Value name -> value."""
    agent_id: str = ""
    """The agent it is about; empty for the host."""
