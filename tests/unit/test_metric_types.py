"""What a node has reported, and why a metric query can never have data (pure decisions)."""

from __future__ import annotations

import pytest

from manager.service.metrics import MetricType, metric_types, missing_metric
from manager.storage import MetricSeries

SERIES = [
    MetricSeries("", "cpu", "usage_percent", 300),
    MetricSeries("web", "cpu", "usage_percent", 200),
    MetricSeries("", "disk", "read_bytes", 100),
    MetricSeries("", "disk", "used_bytes", 400),
    MetricSeries("web", "process", "threads", 200),
    MetricSeries("probe", "probe.latency", "p99_ms", 500),
]


def test_metric_types_summarise_names_agents_and_newest() -> None:
    """One entry per type: its names, the host flag, its agents and its newest sample."""
    assert metric_types(SERIES) == [
        MetricType("cpu", ("usage_percent",), ("web",), host=True, newest_ms=300),
        MetricType("disk", ("read_bytes", "used_bytes"), (), host=True, newest_ms=400),
        MetricType("probe.latency", ("p99_ms",), ("probe",), host=False, newest_ms=500),
        MetricType("process", ("threads",), ("web",), host=False, newest_ms=200),
    ]
    assert metric_types([]) == []


@pytest.mark.parametrize(
    ("agent_id", "metric_type", "name", "problem"),
    [
        ("", "cpu", "", None),
        ("", "cpu", "usage_percent", None),
        ("web", "process", "threads", None),
        ("", "cpux", "", "n1 has no metric type 'cpux'; it has: cpu, disk"),
        ("", "process", "", "n1 has no metric type 'process'; it has: cpu, disk"),
        ("", "disk", "read", "n1 has no disk value 'read'; it has: read_bytes, used_bytes"),
        ("web", "disk", "", "agent 'web' on n1 has no metric type 'disk'; it has: cpu, process"),
        (
            "wbe",
            "cpu",
            "",
            "agent 'wbe' on n1 has reported no metrics; agents with metrics: probe, web",
        ),
    ],
)
def test_missing_metric_says_what_exists_instead(
    agent_id: str, metric_type: str, name: str, problem: str | None
) -> None:
    """A type, agent or value name never reported is named with what the node has."""
    got = missing_metric(SERIES, node_id="n1", agent_id=agent_id, type=metric_type, name=name)
    assert got == problem


def test_a_node_without_any_metrics_says_so() -> None:
    """No series at all: nothing reported yet, or all of it past retention."""
    got = missing_metric([], node_id="n1", agent_id="", type="cpu", name="")
    assert got == "n1 has no metrics stored (none reported yet, or all past retention)"
