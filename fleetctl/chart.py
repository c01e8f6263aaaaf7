"""The arithmetic of fleetctl's metric charts: buckets, axes, units and counter rates (pure).

Axis: a sparkline has eight heights and no drawn axis, so its scale must not
lie. A series that never goes below zero is drawn from 0 (a percentage from
0 to at least 100), so a value's height is its size and a series that barely
moves draws as a flat line, not as swings from bottom to top; the AXIS
column prints the range. Only a series with negative values is drawn from
its own minimum, with a span of at least 1 so a constant one stays flat.

Rates: the daemons report disk and network byte (and packet, error) counts
as counters since boot (`daemon/convert.py`). fleetctl draws them as
per-second rates from the buckets the manager returns, aggregated by max:
for a counter a bucket's max is its last value, so the difference of two
neighbouring buckets over their distance is the mean rate between them. That
works the same over raw samples and over the 1-minute rollups (which keep
max), needs nothing new from the manager, and is what the chart's resolution
shows anyway. A bucket lower than the one before is a counter reset (a
reboot, a child process gone from an agent's tree): it starts the count
again and gives no point.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

__all__ = [
    "BUILT_IN_TYPES",
    "COUNTERS",
    "axis",
    "bucket_values",
    "format_number",
    "format_value",
    "is_counter",
    "rates",
]

COUNTERS: dict[str, frozenset[str]] = {
    "disk": frozenset({"read_bytes", "write_bytes"}),
    "network": frozenset(
        {"bytes_sent", "bytes_recv", "packets_sent", "packets_recv", "errors_in", "errors_out"}
    ),
}
"""The cumulative counters among the daemons' own metric types, per type."""
BUILT_IN_TYPES = frozenset({"cpu", "memory", "disk", "network", "process"})
"""Metric types the daemons report themselves (the rest are agents' custom types)."""


def is_counter(metric_type: str, name: str) -> bool:
    """Whether `name` of `metric_type` is a cumulative counter (custom types: assumed so)."""
    if metric_type not in BUILT_IN_TYPES:
        return True  # an agent's own type: the operator who asks for a rate knows it counts
    return name in COUNTERS.get(metric_type, frozenset())


def rates(points: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """Per-second rates between consecutive (time ms, counter value) points, oldest first.

    Each rate is stamped with the later point's time; a decrease (a counter
    reset) gives no rate, the count goes on from the lower value.
    """
    out: list[tuple[int, float]] = []
    for (t0, v0), (t1, v1) in itertools.pairwise(points):
        if t1 > t0 and v1 >= v0 and math.isfinite(v0) and math.isfinite(v1):
            out.append((t1, (v1 - v0) * 1000 / (t1 - t0)))
    return out


def axis(values: Sequence[float], name: str = "") -> tuple[float, float]:
    """(low, high) to draw `values` on: from 0 unless a value is negative (see module doc)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return (0.0, 1.0)
    low, high = min(finite), max(finite)
    if low >= 0:
        top = max(high, 100.0) if name.endswith("percent") else high
        return (0.0, top if top > 0 else 1.0)
    return (low, high if high - low >= 1 else low + 1)


def bucket_values(
    points: Sequence[tuple[int, float]], *, start_ms: int, end_ms: int, step_ms: int
) -> list[float | None]:
    """One value per step bucket from start to end, None where no point fell."""
    if step_ms <= 0:
        return [v for _, v in points]
    # Buckets may start at multiples of the step rather than at start_ms.
    base = start_ms - start_ms % step_ms
    count = max(1, math.ceil((end_ms - base) / step_ms))
    values: list[float | None] = [None] * count
    for ts, value in points:
        i = (ts - base) // step_ms
        if 0 <= i < count:
            values[i] = value
    return values


def format_number(value: float, name: str = "") -> str:
    """A chart's min/max/last: KiB..PiB when `name` has a ``bytes`` part, else k/M/G/T."""
    if not math.isfinite(value):
        return str(value)
    size = abs(value)
    if "bytes" in name.split("_") and size >= 1024:
        units = ("KiB", "MiB", "GiB", "TiB", "PiB")
        i = 0
        value /= 1024
        while abs(value) >= 1024 and i < len(units) - 1:
            value /= 1024
            i += 1
        return f"{value:.3g}{units[i]}"
    # From 10k on (4-digit values read fine as they are).
    for threshold, divisor, suffix in ((1e12, 1e12, "T"), (1e9, 1e9, "G"), (1e6, 1e6, "M"),
                                       (1e4, 1e3, "k")):  # fmt: skip
        if size >= threshold:
            return f"{value / divisor:.3g}{suffix}"
    return f"{value:.4g}"


def format_value(value: float, name: str = "", *, per_second: bool = False) -> str:
    """`format_number` with the unit a reader needs: % for a percentage, /s for a rate."""
    text = format_number(value, name)
    if name.endswith("percent") and math.isfinite(value):
        text += "%"
    return f"{text}/s" if per_second else text
