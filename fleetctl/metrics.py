"""fleetctl metrics: stored series as sparklines (query), what a node reports (types), and an
agent's recent samples from its daemon (agent). The chart arithmetic is `fleetctl.chart`."""

from __future__ import annotations

import datetime as dt
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from fleet.v1 import fleet_pb2
from fleetctl.agents import split_agent_ref
from fleetctl.chart import (
    BUILT_IN_TYPES,
    COUNTERS,
    axis,
    bucket_values,
    format_value,
    is_counter,
    rates,
)
from fleetctl.client import Connection
from fleetctl.output import Column, dump, print_rows, sparkline
from fleetctl.runtime import EXIT_OK, EXIT_USAGE, Cli, Stub, UsageProblem
from fleetctl.timespec import format_duration, format_time, parse_duration, parse_instant
from fleetctl.views import metric_type_view, points_view

if TYPE_CHECKING:
    from fleet.v1 import common_pb2

__all__ = ["Aggregate", "app", "rate_problem", "sample_series", "time_range"]

app = typer.Typer(help="Metrics the manager stored.", no_args_is_help=True)


class Aggregate(enum.StrEnum):
    """How samples in one step bucket are combined."""

    avg = "avg"
    min = "min"
    max = "max"

    @property
    def proto(self) -> fleet_pb2.Aggregate.ValueType:
        """The Aggregate value."""
        return {
            Aggregate.avg: fleet_pb2.AGGREGATE_AVG,
            Aggregate.min: fleet_pb2.AGGREGATE_MIN,
            Aggregate.max: fleet_pb2.AGGREGATE_MAX,
        }[self]


def time_range(since: str, until: str | None, *, now: dt.datetime) -> tuple[int, int]:
    """(start, end) in epoch ms from --since/--until; UsageProblem if bad or reversed."""
    try:
        start = parse_instant(since, now=now)
    except ValueError as exc:
        raise UsageProblem(f"--since: {exc}") from None
    try:
        end = parse_instant(until, now=now) if until else now
    except ValueError as exc:
        raise UsageProblem(f"--until: {exc}") from None
    if end <= start:
        raise UsageProblem(
            f"--until ({end.isoformat()}) must be after --since ({start.isoformat()})"
        )
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def step_seconds(step: str | None, *, option: str = "--step") -> int:
    """A duration option in whole seconds (None: 0, the manager picks); UsageProblem if bad."""
    if step is None:
        return 0
    try:
        seconds = parse_duration(step)
    except ValueError as exc:
        raise UsageProblem(f"{option}: {exc}") from None
    if seconds < 1:
        raise UsageProblem(f"{option}: {step!r} is shorter than the 1s minimum")
    return math.ceil(seconds)


AUTO_BUCKETS = 60
"""Buckets --rate asks for when no --step is given (what the manager picks by itself)."""


def rate_problem(metric_type: str, name: str | None, agg: Aggregate | None) -> str | None:
    """Why --rate cannot be drawn for this query, or None (pure)."""
    if agg not in (None, Aggregate.max):
        return f"--rate reads each bucket's max (a counter's last value); leave out --agg {agg}"
    counters = sorted(COUNTERS.get(metric_type, ()))
    if metric_type in BUILT_IN_TYPES and not counters:
        every = "; ".join(f"{t}: {', '.join(sorted(n))}" for t, n in sorted(COUNTERS.items()))
        return f"--rate: {metric_type} has no cumulative counters (those are {every})"
    if name and not is_counter(metric_type, name):
        return f"--rate: {metric_type} {name} is not a counter; its counters: {', '.join(counters)}"
    return None


@dataclass(frozen=True)
class _Query:
    """What `metrics query` asks, after checking the options."""

    start_ms: int
    end_ms: int
    step_s: int
    """0: the manager picks (not with --rate)."""
    agg: Aggregate
    rate: bool

    def request_start_ms(self) -> int:
        """--rate needs the bucket before the first one drawn (a rate is a difference)."""
        return self.start_ms - self.step_s * 1000 if self.rate else self.start_ms


def _plan(
    since: str, until: str | None, step: str | None, agg: Aggregate | None, rate: bool
) -> _Query:
    start_ms, end_ms = time_range(since, until, now=dt.datetime.now(dt.UTC))
    step_s = step_seconds(step)
    if rate and not step_s:  # explicit, so the bucket before the range can be asked for too
        step_s = max(1, math.ceil((end_ms - start_ms) / 1000 / AUTO_BUCKETS))
    chosen = agg or (Aggregate.max if rate else Aggregate.avg)
    return _Query(start_ms, end_ms, step_s, chosen, rate)


@app.command("query")
def query(
    ctx: typer.Context,
    node: Annotated[str, typer.Option("--node", "-n", help="Node id.")],
    metric_type: Annotated[
        str, typer.Option("--type", "-t", help="cpu, memory, disk, network or a custom type.")
    ],
    agent: Annotated[
        str | None, typer.Option("--agent", "-a", help="An agent's metrics, not the host's.")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="One value name, e.g. usage_percent.")
    ] = None,
    since: Annotated[
        str, typer.Option("--since", help="Start: a duration ago (1h) or RFC 3339.")
    ] = "1h",
    until: Annotated[
        str | None, typer.Option("--until", help="End: a duration ago or RFC 3339 (default now).")
    ] = None,
    step: Annotated[
        str | None, typer.Option("--step", help="Bucket width, e.g. 1m (default: ~60 buckets).")
    ] = None,
    agg: Annotated[
        Aggregate | None,
        typer.Option("--agg", help="Combine samples in a bucket by avg (default), min or max."),
    ] = None,
    rate: Annotated[
        bool,
        typer.Option(
            "--rate", help="Per-second rates of counters (disk, network bytes); gauges left out."
        ),
    ] = False,
) -> None:
    """Query stored metrics and draw each series as a sparkline (-o json for the numbers)."""
    cli = Cli.of(ctx)
    problem = rate_problem(metric_type, name, agg) if rate else None
    if problem:
        cli.fail(problem, EXIT_USAGE)
    q = cli.checked(lambda: _plan(since, until, step, agg, rate))

    async def body(stub: Stub, conn: Connection) -> int:
        reply = await stub.QueryMetrics(
            fleet_pb2.FleetServiceQueryMetricsRequest(
                node_id=node,
                agent_id=agent or "",
                type=metric_type,
                name=name or "",
                start_time=q.request_start_ms(),
                end_time=q.end_ms,
                step_seconds=q.step_s,
                aggregate=q.agg.proto,
            ),
            timeout=conn.timeout,
        )
        series = {s.name: [(p.timestamp, p.value) for p in s.points] for s in reply.series}
        if rate:
            gauges = sorted(n for n in series if not is_counter(metric_type, n))
            if gauges:
                cli.note(f"fleetctl: --rate leaves out {', '.join(gauges)} (not counters)")
            series = {
                n: [(t, v) for t, v in rates(points) if t >= q.start_ms]
                for n, points in series.items()
                if n not in gauges
            }
        header: dict[str, Any] = {
            "node_id": node,
            "agent_id": agent or None,
            "type": metric_type,
            "aggregate": str(q.agg),
            "per_second": rate,
            "start": format_time(q.start_ms),
            "end": format_time(q.end_ms),
            "step_seconds": reply.step_seconds,
        }
        if cli.fmt.structured:
            views = [points_view(n, p) for n, p in sorted(series.items())]
            cli.out.out(dump(cli.fmt, {**header, "series": views}), end="", highlight=False)
            return EXIT_OK
        _draw(cli, header, series, q)
        return EXIT_OK

    cli.call(body)


def _draw(
    cli: Cli, header: dict[str, Any], series: dict[str, list[tuple[int, float]]], q: _Query
) -> None:
    subject = header["node_id"] + (f"/{header['agent_id']}" if header["agent_id"] else "")
    step = format_duration(header["step_seconds"]) if header["step_seconds"] else "auto"
    how = "per-second rate" if q.rate else header["aggregate"]
    cli.out.print(
        f"{header['type']} of {subject}, {header['start']} .. {header['end']}, {how} per {step}",
        markup=False,
        style="bold",
    )
    if not series:
        cli.out.print("No data in this range.", style="dim")
        return
    width = max(10, cli.screen_width - 60)
    table = _chart_table()
    for name, points in sorted(series.items()):
        values = [v for _, v in points if math.isfinite(v)]
        buckets = bucket_values(
            points, start_ms=q.start_ms, end_ms=q.end_ms, step_ms=header["step_seconds"] * 1000
        )
        if values and all(b is None for b in buckets):  # points outside the range asked for
            buckets = list(values)
        label = name + ("/s" if q.rate else "")
        _chart_row(table, label, name, buckets, values, rate=q.rate, width=width)
    cli.out.print(table)


def _chart_table() -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for title in ("SERIES", "CHART", "AXIS", "MIN", "MAX", "LAST"):
        table.add_column(title, no_wrap=title in ("CHART", "AXIS"))
    return table


def _chart_row(
    table: Table,
    label: str,
    name: str,
    buckets: Sequence[float | None],
    values: Sequence[float],
    *,
    rate: bool = False,
    width: int = 0,
) -> None:
    """One series: its sparkline on an axis from 0 (see fleetctl.chart), the axis, min/max/last."""
    if not values:
        table.add_row(label, "", "-", "-", "-", "-")
        return
    low, high = axis(values, name)

    def shown(value: float) -> str:
        return format_value(value, name, per_second=rate)

    line = sparkline(buckets, width=width or None, axis=(low, high))
    table.add_row(
        label,
        Text(line, style="cyan"),
        f"{shown(low)}..{shown(high)}",
        shown(min(values)),
        shown(max(values)),
        shown(values[-1]),
    )


@app.command("types")
def types(
    ctx: typer.Context,
    node: Annotated[str, typer.Option("--node", "-n", help="Node id.")],
) -> None:
    """The metric types a node has reported: value names, agents, newest sample."""
    cli = Cli.of(ctx)

    async def body(stub: Stub, conn: Connection) -> int:
        reply = await stub.ListMetricTypes(
            fleet_pb2.FleetServiceListMetricTypesRequest(node_id=node), timeout=conn.timeout
        )
        rows = [metric_type_view(t) for t in reply.types]
        if cli.fmt.structured:
            cli.out.out(dump(cli.fmt, {"node_id": node, "types": rows}), end="", highlight=False)
            return EXIT_OK
        print_rows(cli.out, cli.fmt, rows, _TYPE_COLUMNS, empty=f"{node} has no metrics stored.")
        return EXIT_OK

    cli.call(body)


_TYPE_COLUMNS = [
    Column("TYPE", "type"),
    Column("NAMES", "names"),
    Column("REPORTED BY", "reported_by"),
    Column("NEWEST", "newest"),
]


# GetAgentMetrics: (series name, ResourceDataPoint field, unit divisor, unit)
_SAMPLE_FIELDS: tuple[tuple[str, str, float, str], ...] = (
    ("cpu_percent", "cpu", 1.0, "%"),
    ("memory_rss_mib", "memory_rss", 1024 * 1024, "MiB"),
    ("memory_vms_mib", "memory_vms", 1024 * 1024, "MiB"),
    ("disk_read_mib", "disk_read_bytes", 1024 * 1024, "MiB"),
    ("disk_write_mib", "disk_write_bytes", 1024 * 1024, "MiB"),
    ("open_files", "open_files", 1.0, ""),
    ("threads", "threads", 1.0, ""),
    ("processes", "processes", 1.0, ""),
)


def sample_series(
    points: Sequence[common_pb2.ResourceDataPoint],
) -> list[tuple[str, list[tuple[int, float]]]]:
    """The daemon's per-process samples as named series (pure), oldest first."""
    ordered = sorted(points, key=lambda p: p.timestamp)
    return [
        (name, [(p.timestamp, float(getattr(p, attr)) / divisor) for p in ordered])
        for name, attr, divisor, _ in _SAMPLE_FIELDS
    ]


@app.command("agent")
def agent_samples(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="NODE/AGENT", help="e.g. node-1/web")],
    last: Annotated[
        str, typer.Option("--last", help="How far back, e.g. 5m (the daemon keeps ~1h).")
    ] = "5m",
) -> None:
    """Recent per-process samples of one agent, asked of its daemon (cpu, memory, io, threads)."""
    cli = Cli.of(ctx)
    node, agent = cli.checked(lambda: split_agent_ref(ref))
    seconds = cli.checked(lambda: step_seconds(last, option="--last"))

    async def body(stub: Stub, conn: Connection) -> int:
        reply = await stub.GetAgentMetrics(
            fleet_pb2.FleetServiceGetAgentMetricsRequest(
                node_id=node, agent_id=agent, duration_seconds=seconds
            ),
            timeout=conn.timeout,
        )
        series = sample_series(reply.data_points)
        if cli.fmt.structured:
            data = {
                "node_id": node,
                "agent_id": agent,
                "samples": [
                    {
                        "timestamp": format_time(p.timestamp),
                        "timestamp_ms": p.timestamp,
                        "cpu": p.cpu,
                        "memory_rss": p.memory_rss,
                        "memory_vms": p.memory_vms,
                        "disk_read_bytes": p.disk_read_bytes,
                        "disk_write_bytes": p.disk_write_bytes,
                        "open_files": p.open_files,
                        "threads": p.threads,
                        "processes": p.processes,
                    }
                    for p in sorted(reply.data_points, key=lambda p: p.timestamp)
                ],
            }
            cli.out.out(dump(cli.fmt, data), end="", highlight=False)
            return EXIT_OK
        cli.out.print(
            f"{node}/{agent}: {len(reply.data_points)} samples over the last"
            f" {format_duration(seconds)}",
            markup=False,
            style="bold",
        )
        if not reply.data_points:
            cli.out.print("No samples (is the agent running?).", style="dim")
            return EXIT_OK
        width = max(10, cli.screen_width - 60)
        table = _chart_table()
        for name, points in series:
            values = [v for _, v in points]
            _chart_row(table, name, name, values, values, width=width)
        cli.out.print(table)
        return EXIT_OK

    cli.call(body)
