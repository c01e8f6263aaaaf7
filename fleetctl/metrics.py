"""fleetctl metrics query: a node's (or agent's) metric series as sparklines."""

from __future__ import annotations

import datetime as dt
import enum
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from fleet.v1 import fleet_pb2
from fleetctl.agents import split_agent_ref
from fleetctl.client import Connection
from fleetctl.output import dump, sparkline
from fleetctl.runtime import EXIT_OK, Cli, Stub, UsageProblem
from fleetctl.timespec import format_duration, format_time, parse_duration, parse_instant
from fleetctl.views import series_view

if TYPE_CHECKING:
    from fleet.v1 import common_pb2

__all__ = ["Aggregate", "app", "bucket_values", "format_number", "sample_series", "time_range"]

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


def bucket_values(
    points: Sequence[tuple[int, float]], *, start_ms: int, end_ms: int, step_ms: int
) -> list[float | None]:
    """One value per step bucket from start to end, None where no point fell (pure)."""
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
        Aggregate, typer.Option("--agg", help="Combine samples in a bucket by avg, min or max.")
    ] = Aggregate.avg,
) -> None:
    """Query stored metrics and draw each series as a sparkline (-o json for the numbers)."""
    cli = Cli.of(ctx)
    start_ms, end_ms = cli.checked(lambda: time_range(since, until, now=dt.datetime.now(dt.UTC)))
    step_s = cli.checked(lambda: step_seconds(step))

    async def body(stub: Stub, conn: Connection) -> int:
        reply = await stub.QueryMetrics(
            fleet_pb2.FleetServiceQueryMetricsRequest(
                node_id=node,
                agent_id=agent or "",
                type=metric_type,
                name=name or "",
                start_time=start_ms,
                end_time=end_ms,
                step_seconds=step_s,
                aggregate=agg.proto,
            ),
            timeout=conn.timeout,
        )
        header: dict[str, Any] = {
            "node_id": node,
            "agent_id": agent or None,
            "type": metric_type,
            "aggregate": str(agg),
            "start": format_time(start_ms),
            "end": format_time(end_ms),
            "step_seconds": reply.step_seconds,
        }
        if cli.fmt.structured:
            data = {**header, "series": [series_view(s) for s in reply.series]}
            cli.out.out(dump(cli.fmt, data), end="", highlight=False)
            return EXIT_OK
        _draw(cli, header, reply, start_ms, end_ms)
        return EXIT_OK

    cli.call(body)


def format_number(value: float, name: str = "") -> str:
    """A chart's min/max/last: KiB..PiB when `name` has a ``bytes`` part, else k/M/G/T (pure)."""
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


def _draw(
    cli: Cli,
    header: dict[str, Any],
    reply: fleet_pb2.FleetServiceQueryMetricsResponse,
    start_ms: int,
    end_ms: int,
) -> None:
    subject = header["node_id"] + (f"/{header['agent_id']}" if header["agent_id"] else "")
    step = format_duration(reply.step_seconds) if reply.step_seconds else "auto"
    cli.out.print(
        f"{header['type']} of {subject}, {header['start']} .. {header['end']},"
        f" {header['aggregate']} per {step}",
        markup=False,
        style="bold",
    )
    if not reply.series:
        cli.out.print("No data in this range.", style="dim")
        return
    width = max(10, cli.screen_width - 50)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for title in ("SERIES", "CHART", "MIN", "MAX", "LAST"):
        table.add_column(title, no_wrap=title == "CHART")
    for series in sorted(reply.series, key=lambda s: s.name):
        points = [(p.timestamp, p.value) for p in series.points]
        values = [v for _, v in points if math.isfinite(v)]
        buckets = bucket_values(
            points, start_ms=start_ms, end_ms=end_ms, step_ms=reply.step_seconds * 1000
        )
        if values and all(b is None for b in buckets):  # points outside the range asked for
            buckets = list(values)
        table.add_row(
            series.name,
            Text(sparkline(buckets, width=width), style="cyan"),
            format_number(min(values), series.name) if values else "-",
            format_number(max(values), series.name) if values else "-",
            format_number(values[-1], series.name) if values else "-",
        )
    cli.out.print(table)


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
        width = max(10, cli.screen_width - 50)
        table = Table(box=None, pad_edge=False, header_style="bold")
        for title in ("SERIES", "CHART", "MIN", "MAX", "LAST"):
            table.add_column(title, no_wrap=title == "CHART")
        for name, points in series:
            values = [v for _, v in points]
            table.add_row(
                name,
                Text(sparkline(values, width=width), style="cyan"),
                format_number(min(values)),
                format_number(max(values)),
                format_number(values[-1]),
            )
        cli.out.print(table)
        return EXIT_OK

    cli.call(body)
