"""Prometheus metrics of the daemon, read from the live objects at scrape time.

A collector on a per-daemon `CollectorRegistry` (not the global one, so tests
can run several daemons in one process). Nothing is double-booked: each
value is read from its owner (supervisor, sampler, manager link) when
`/metrics` is scraped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.supervisor.states import AgentStatus
from daemon.supervisor.supervisor import AgentSnapshot

__all__ = ["DaemonCollector", "MetricSources", "daemon_registry"]

_LINK_STATES = ("connecting", "connected", "disconnected", "stopped")


@dataclass(frozen=True)
class MetricSources:
    """Callables the collector reads at scrape time."""

    agents: Callable[[], list[AgentSnapshot]]
    """Every agent's current snapshot."""
    restarts_total: Callable[[], int]
    """Restarts done by the supervisor since the daemon started."""
    sampling_seconds: Callable[[], float]
    """Wall time spent sampling agents' process trees since the daemon started."""
    buffer_batches: Callable[[], int]
    """Metric batches waiting for the manager."""
    buffer_capacity: int
    """The buffer's bound."""
    dropped_batches: Callable[[], int]
    """Batches dropped because the buffer was full."""
    dropped_samples: Callable[[], int]
    """Samples in those batches."""
    link_state: Callable[[], str]
    """"connecting", "connected", "disconnected" or "stopped"."""
    registrations: Callable[[], int]
    """RegisterNode calls (or control-stream hellos) that succeeded."""
    agent_connections: Callable[[], int]
    """Open connections on the agent socket."""
    link_mode: Callable[[], str] = lambda: ""
    """"stream", "unary" or "" (not connected)."""
    reconnects: Callable[[], int] = lambda: 0
    """Manager connections that failed and were dialled again."""
    commands: Callable[[], dict[tuple[str, str], int]] = dict
    """Commands run from the control stream by (method, status code name)."""
    certificate_expiry: Callable[[], float] = lambda: 0.0
    """When the node certificate in use expires (Unix seconds; 0: unknown)."""
    certificate_renewals: Callable[[], dict[str, int]] = dict
    """Certificate renewal attempts by outcome ("success", "failure")."""


class DaemonCollector(Collector):
    """Yields the daemon's metric families from `MetricSources`."""

    def __init__(self, sources: MetricSources) -> None:
        self._s = sources

    def collect(self) -> Iterator[Metric]:
        """Called by prometheus_client on each scrape."""
        s = self._s
        by_state = Counter(a.status.name for a in s.agents())
        agents = GaugeMetricFamily(
            "fleet_daemon_agents", "Supervised agents by state.", labels=["state"]
        )
        for status in AgentStatus:
            agents.add_metric([status.name], by_state.get(status.name, 0))
        yield agents
        yield CounterMetricFamily(
            "fleet_daemon_agent_restarts",
            "Agent restarts done by the supervisor (crashes and restart operations).",
            value=s.restarts_total(),
        )
        yield CounterMetricFamily(
            "fleet_daemon_sampling_seconds",
            "Wall time spent in psutil sampling passes over every agent's process tree.",
            value=s.sampling_seconds(),
        )
        yield GaugeMetricFamily(
            "fleet_daemon_metric_buffer_batches",
            "Metric batches waiting to be sent to the manager.",
            value=s.buffer_batches(),
        )
        yield GaugeMetricFamily(
            "fleet_daemon_metric_buffer_capacity",
            "Bound of the metric buffer (batches).",
            value=s.buffer_capacity,
        )
        yield CounterMetricFamily(
            "fleet_daemon_metric_batches_dropped",
            "Metric batches dropped (oldest first) while the manager was unreachable.",
            value=s.dropped_batches(),
        )
        yield CounterMetricFamily(
            "fleet_daemon_metric_samples_dropped",
            "Samples in the dropped metric batches.",
            value=s.dropped_samples(),
        )
        link = GaugeMetricFamily(
            "fleet_daemon_manager_link_state",
            "1 for the manager link's current state, 0 for the others.",
            labels=["state"],
        )
        current = s.link_state()
        for state in _LINK_STATES:
            link.add_metric([state], 1.0 if state == current else 0.0)
        yield link
        yield CounterMetricFamily(
            "fleet_daemon_manager_registrations",
            "Successful RegisterNode calls (1 + re-registrations after NOT_FOUND or outages).",
            value=s.registrations(),
        )
        yield GaugeMetricFamily(
            "fleet_daemon_control_stream_connected",
            "1 while the manager link is connected over the control stream (Connect).",
            value=1.0 if current == "connected" and s.link_mode() == "stream" else 0.0,
        )
        yield CounterMetricFamily(
            "fleet_daemon_manager_reconnects",
            "Manager connections (stream or unary) that failed and were dialled again.",
            value=s.reconnects(),
        )
        commands = CounterMetricFamily(
            "fleet_daemon_control_commands",
            "Commands from the manager run on the control stream, by method and status code.",
            labels=["method", "code"],
        )
        for (method, code), count in sorted(s.commands().items()):
            commands.add_metric([method, code], count)
        yield commands
        yield GaugeMetricFamily(
            "fleet_daemon_agent_connections",
            "Open connections on the agent socket.",
            value=s.agent_connections(),
        )
        yield GaugeMetricFamily(
            "fleet_daemon_certificate_expiry_timestamp_seconds",
            "When the node certificate in use expires (Unix time; 0: unknown).",
            value=s.certificate_expiry(),
        )
        renewals = CounterMetricFamily(
            "fleet_daemon_certificate_renewals",
            "Certificate renewal attempts by outcome (success, failure).",
            labels=["outcome"],
        )
        for outcome, count in sorted(s.certificate_renewals().items()):
            renewals.add_metric([outcome], count)
        yield renewals


def daemon_registry(sources: MetricSources) -> CollectorRegistry:
    """A fresh registry holding only the daemon's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(sources))
    return registry
