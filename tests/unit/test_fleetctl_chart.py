"""fleetctl.chart: axes that do not stretch a flat series, counter rates, units (pure)."""

from __future__ import annotations

import pytest

from fleetctl.chart import axis, format_value, is_counter, rates
from fleetctl.metrics import Aggregate, rate_problem
from fleetctl.output import sparkline


@pytest.mark.parametrize(
    ("values", "name", "expected"),
    [
        ([50.0, 50.1, 50.0], "usage_percent", (0.0, 100.0)),  # percentages: 0..100
        ([120.0, 180.0], "cpu_percent", (0.0, 180.0)),  # one agent may use several cores
        ([7.91e9, 7.93e9], "used_bytes", (0.0, 7.93e9)),  # from zero: no stretching
        ([0.0, 0.0], "bytes_sent", (0.0, 1.0)),
        ([-5.0, 3.0], "offset", (-5.0, 3.0)),  # negative values: their own range
        ([-2.0, -2.0], "offset", (-2.0, -1.0)),  # ... at least 1 wide
        ([], "x", (0.0, 1.0)),
    ],
)
def test_axis(values: list[float], name: str, expected: tuple[float, float]) -> None:
    """Non-negative series are drawn from 0, percentages to at least 100."""
    assert axis(values, name) == expected


def test_a_series_that_barely_moves_is_drawn_flat() -> None:
    """50.0 -> 50.1% on its axis is a flat line at half height, not bottom-to-top swings."""
    values = [50.0, 50.1, 50.0, 50.1]
    line = sparkline(values, axis=axis(values, "usage_percent"))
    assert len(set(line)) == 1
    assert line[0] not in "▁█"
    assert sparkline(values) == "▁█▁█"  # what the values' own range would have drawn


def test_rates_are_per_second_and_skip_counter_resets() -> None:
    """Differences over time in seconds, stamped at the later point; a drop gives no point."""
    points = [(0, 1000.0), (10_000, 3000.0), (20_000, 3000.0), (30_000, 500.0), (40_000, 1500.0)]
    assert rates(points) == [(10_000, 200.0), (20_000, 0.0), (40_000, 100.0)]
    assert rates([(0, 5.0)]) == []
    assert rates([(0, 5.0), (60_000, 5.0 + 60 * 1024)]) == [(60_000, 1024.0)]


def test_counters_are_the_daemons_cumulative_byte_and_packet_counts() -> None:
    """disk and network counters are counters; gauges are not; custom types are trusted."""
    assert is_counter("network", "bytes_recv")
    assert is_counter("disk", "write_bytes")
    assert not is_counter("disk", "used_bytes")
    assert not is_counter("cpu", "usage_percent")
    assert is_counter("jobs", "done")


def test_format_value_carries_the_unit() -> None:
    """Percent gets %, a rate /s, bytes binary units."""
    assert format_value(42.5, "usage_percent") == "42.5%"
    assert format_value(3 * 1024**2, "bytes_recv", per_second=True) == "3MiB/s"
    assert format_value(12.0, "packets_sent", per_second=True) == "12/s"


@pytest.mark.parametrize(
    ("metric_type", "name", "agg", "problem"),
    [
        ("network", None, None, None),
        ("disk", "read_bytes", Aggregate.max, None),
        ("jobs", None, None, None),
        ("cpu", None, None, "--rate: cpu has no cumulative counters (those are disk:"),
        ("disk", "used_bytes", None, "--rate: disk used_bytes is not a counter"),
        ("network", None, Aggregate.avg, "--rate reads each bucket's max"),
    ],
)
def test_rate_problem(
    metric_type: str, name: str | None, agg: Aggregate | None, problem: str | None
) -> None:
    """--rate is refused (exit 2) where it cannot mean anything."""
    got = rate_problem(metric_type, name, agg)
    assert (got is None) if problem is None else (got is not None and got.startswith(problem))
