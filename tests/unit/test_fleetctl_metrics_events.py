"""fleetctl metrics query and events against a real mTLS FleetService (in-process)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fleetctl_fake import Fleetctl, demo_fleet, serve

from fleet.v1 import fleet_pb2

JAN_1_2026_MS = 1_767_225_600_000


@pytest.fixture
def fleetctl(pki, tmp_path: Path) -> Iterator[Fleetctl]:
    """fleetctl wired to a fake manager with metrics and events."""
    fleet = demo_fleet()
    series = fleet_pb2.MetricSeries(name="usage_percent")
    for i, value in enumerate([1.0, 2.0, 4.0, 8.0, 16.0]):
        series.points.add(timestamp=JAN_1_2026_MS + i * 60_000, value=value)
    fleet.series["node-1", "", "cpu"] = [series, fleet_pb2.MetricSeries(name="idle")]
    for i, (kind, node) in enumerate(
        [
            (fleet_pb2.EVENT_KIND_NODE_REGISTERED, "node-1"),
            (fleet_pb2.EVENT_KIND_NODE_ONLINE, "node-1"),
            (fleet_pb2.EVENT_KIND_OPERATION, "node-2"),
        ],
        start=1,
    ):
        fleet.events.append(
            fleet_pb2.Event(
                id=i,
                timestamp=1_700_000_000_000 + i,
                kind=kind,
                node_id=node,
                actor="operator/alice" if kind == fleet_pb2.EVENT_KIND_OPERATION else "manager",
                message=f"event {i}",
            )
        )
    with serve(pki.issue("manager", "manager"), fleet) as manager:
        yield Fleetctl(manager, pki.issue("operator", "alice"), tmp_path)


def test_metrics_query_draws_a_sparkline_with_min_max_last(fleetctl: Fleetctl) -> None:
    """The table mode draws one sparkline per series on its axis, with min, max and last."""
    result = fleetctl(
        "metrics", "query", "--node", "node-1", "--type", "cpu", "--step", "1m",
        "--since", "2026-01-01T00:00:00Z", "--until", "2026-01-01T00:05:00Z",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if line.startswith("usage_percent"))
    assert "▁▁▁▁▂" in row  # a percentage is drawn on 0..100
    assert row.split()[-4:] == ["0%..100%", "1%", "16%", "16%"]
    empty = next(line for line in result.stdout.splitlines() if line.startswith("idle"))
    assert empty.split()[-3:] == ["-", "-", "-"]


def test_metrics_query_json_has_the_numbers_and_request(fleetctl: Fleetctl) -> None:
    """-o json carries every point; the request carries range, step, aggregate and name."""
    result = fleetctl(
        "-o", "json", "metrics", "query", "--node", "node-1", "--type", "cpu",
        "--name", "usage_percent", "--since", "2026-01-01T00:00:00Z",
        "--until", "2026-01-01T01:00:00Z", "--step", "5m", "--agg", "max",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [p["value"] for p in data["series"][0]["points"]] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert data["step_seconds"] == 300
    (name, request) = fleetctl.manager.fleet.requests[-1]
    assert name == "QueryMetrics"
    assert (request.start_time, request.end_time) == (1767225600000, 1767229200000)
    assert request.aggregate == fleet_pb2.AGGREGATE_MAX
    assert request.name == "usage_percent"


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--since", "yesterday"], "--since: 'yesterday' is neither a duration"),
        (["--since", "2026-01-01T00:00:00"], "has no UTC offset"),
        (["--since", "1h", "--until", "2h"], "--until"),
        (["--step", "0.5s"], "--step: '0.5s' is shorter than the 1s minimum"),
        (["--agg", "median"], "median"),
    ],
)
def test_metrics_query_bad_times_are_usage_errors(
    fleetctl: Fleetctl, args: list[str], problem: str
) -> None:
    """Bad --since/--until/--step/--agg exit 2 with one line naming the option; nothing sent."""
    result = fleetctl("metrics", "query", "--node", "node-1", "--type", "cpu", *args)
    assert result.exit_code == 2
    assert problem in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert fleetctl.manager.fleet.requests == []


def test_events_table_and_since(fleetctl: Fleetctl) -> None:
    """`events --since 1` lists the later events in id order."""
    result = fleetctl("events", "--since", "1")
    assert result.exit_code == 0, result.output
    ids = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert ids == ["2", "3"]


def test_events_kind_and_node_filters_are_sent(fleetctl: Fleetctl) -> None:
    """--kind (any case, - or _) and --node reach the request; -o yaml parses."""
    result = fleetctl("-o", "yaml", "events", "--kind", "OPERATION", "--node", "node-2")
    assert result.exit_code == 0, result.output
    events = yaml.safe_load(result.stdout)["events"]
    assert [(e["id"], e["kind"], e["actor"]) for e in events] == [
        (3, "OPERATION", "operator/alice")
    ]


def test_events_follow_prints_json_lines(fleetctl: Fleetctl) -> None:
    """-f -o json prints one JSON object per line as events arrive."""
    result = fleetctl("-o", "json", "events", "-f", "--kind", "node-online,node_registered")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["kind"] for e in lines] == ["NODE_REGISTERED", "NODE_ONLINE"]
    assert fleetctl.manager.fleet.requests[-1][1].follow is True


def test_events_unknown_kind_lists_the_choices(fleetctl: Fleetctl) -> None:
    """An unknown --kind exits 2 naming the valid kinds."""
    result = fleetctl("events", "--kind", "node-exploded")
    assert result.exit_code == 2
    assert "unknown event kind 'node-exploded'; one of node-registered" in result.stderr


def test_metrics_agent_shows_the_daemons_recent_samples(fleetctl: Fleetctl) -> None:
    """`metrics agent NODE/AGENT` charts each sample field oldest-first; JSON has the numbers."""
    table = fleetctl("metrics", "agent", "node-1/web", "--last", "2m")
    assert table.exit_code == 0, table.output
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:] if line}
    assert rows["cpu_percent"][-3:] == ["0%", "4%", "0%"]  # min, max, last (newest is 0)
    assert rows["memory_rss_mib"][-3:] == ["1", "5", "1"]
    assert fleetctl.manager.fleet.requests[-1][1].duration_seconds == 120
    data = json.loads(fleetctl("-o", "json", "metrics", "agent", "node-1/web").stdout)
    assert [p["cpu"] for p in data["samples"]] == [4.0, 3.0, 2.0, 1.0, 0.0]
    bad = fleetctl("metrics", "agent", "node-1/web", "--last", "soon")
    assert bad.exit_code == 2
    assert "--last: 'soon' is not a duration" in bad.stderr
