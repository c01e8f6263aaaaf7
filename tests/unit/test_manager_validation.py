"""Request validation at its boundaries: what is just allowed and what is just refused."""

from __future__ import annotations

import pytest

from fleet.errors import InvalidArgument
from manager.service.model import MetricPoint, Registration
from manager.service.validation import metric_batch, validate_agent_states, validate_registration
from manager.storage import AgentStateRecord

NOW = 1_800_000_000_000
HOUR = 3_600_000


def reg(**kw: object) -> Registration:
    """A valid registration with overrides."""
    base: dict[str, object] = {
        "node_id": "web-1",
        "ip": "10.0.0.1",
        "os": "linux",
        "arch": "x86_64",
    }
    return Registration(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"ip": "fd00::1"},
        {"daemon_address": "[fd00::1]:7444"},
        {"daemon_address": "10.0.0.1:7444"},
        {"daemon_address": "node-1.example.com:1"},
        {"hostname": "web-1.example.com."},
        {"hostname": "a" * 63},
        {"labels": {f"k{i}": "v" for i in range(64)}},
        {"labels": {"example.com/tier": "", "env": "prod"}},
        {"os": "o" * 64, "daemon_version": "v" * 64},
    ],
)
def test_valid_registrations_pass(overrides: dict[str, object]) -> None:
    """Boundary-valid registrations (IPv6, 64 labels, 64-char fields) are accepted."""
    validate_registration(reg(**overrides))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"daemon_address": "[fd00::1]"}, "daemon_address"),
        ({"daemon_address": ":7444"}, "daemon_address"),
        ({"daemon_address": "host:0"}, "daemon_address"),
        ({"hostname": "a" * 64}, "hostname"),
        ({"hostname": "-bad.example.com"}, "hostname"),
        ({"os": "   "}, "os"),
        ({"node_id": "Web-1"}, "node_id"),
    ],
)
def test_invalid_registrations_name_the_field(overrides: dict[str, object], field: str) -> None:
    """Just-invalid registrations are refused naming the field."""
    with pytest.raises(InvalidArgument) as info:
        validate_registration(reg(**overrides))
    assert info.value.field == field


def test_metric_batch_flattens_points_into_samples() -> None:
    """Each named value of each point becomes one sample with the point's type, time, agent."""
    batch = metric_batch(
        "web-1",
        7,
        [MetricPoint("cpu", NOW, {"a": 1.0, "b": 2.0}, "ag-1")],
        now_ms=NOW,
        max_past_ms=HOUR,
        max_samples=10,
    )
    assert batch.sequence == 7
    assert sorted((s.agent_id, s.type, s.name, s.timestamp_ms, s.value) for s in batch.samples) == [
        ("ag-1", "cpu", "a", NOW, 1.0),
        ("ag-1", "cpu", "b", NOW, 2.0),
    ]


def test_metric_batch_limits_are_inclusive() -> None:
    """Exactly max_samples values, and timestamps exactly at both window edges, are accepted."""
    points = [
        MetricPoint("custom.x", NOW - HOUR, {f"v{i}": 1.0 for i in range(50)}),
        MetricPoint("custom.x", NOW + 300_000, {f"w{i}": 1.0 for i in range(50)}),
    ]
    assert (
        len(metric_batch("n", 1, points, now_ms=NOW, max_past_ms=HOUR, max_samples=100).samples)
        == 100
    )
    with pytest.raises(InvalidArgument, match="at most 99"):
        metric_batch("n", 1, points, now_ms=NOW, max_past_ms=HOUR, max_samples=99)
    with pytest.raises(InvalidArgument) as info:
        metric_batch(
            "n",
            1,
            [MetricPoint("cpu", NOW - HOUR - 1, {"v": 1.0})],
            now_ms=NOW,
            max_past_ms=HOUR,
            max_samples=10,
        )
    assert info.value.field == "metrics[0].timestamp"


def test_agent_snapshot_of_1000_agents_is_allowed_and_empty_snapshot_too() -> None:
    """1,000 agents (the cap) and an empty snapshot (node has no agents) are valid."""
    validate_agent_states([AgentStateRecord("n", f"a{i}", "RUNNING") for i in range(1000)])
    validate_agent_states([])


def test_agent_message_may_span_lines_but_not_hold_nul() -> None:
    """An exit reason may span lines; a NUL (PostgreSQL text cannot hold one) is refused."""
    validate_agent_states([AgentStateRecord("n", "a", "EXITED", message="exit 1:\n\tboom")])
    with pytest.raises(InvalidArgument) as info:
        validate_agent_states([AgentStateRecord("n", "a", "EXITED", message="boom\x00")])
    assert info.value.field == "states[0].message"
