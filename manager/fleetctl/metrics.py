"""fleetctl metrics query: a node's (or agent's) metric series as sparklines."""

from __future__ import annotations

import datetime as dt
import enum
import math
import shutil
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from fleet.v1 import fleet_pb2
from manager.fleetctl.client import Connection
from manager.fleetctl.output import dump, sparkline
from manager.fleetctl.runtime import EXIT_OK, Cli, Stub, UsageProblem
from manager.fleetctl.timespec import format_duration, format_time, parse_duration, parse_instant
from manager.fleetctl.views import series_view

__all__ = ["Aggregate", "app", "bucket_values", "time_range"]

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


def step_seconds(step: str | None) -> int:
    """--step in whole seconds (0: let the manager pick); UsageProblem if bad."""
    if step is None:
        return 0
    try:
        seconds = parse_duration(step)
    except ValueError as exc:
        raise UsageProblem(f"--step: {exc}") from None
    if seconds < 1:
        raise UsageProblem(f"--step: {step!r} is shorter than the 1s minimum")
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


def _num(value: float) -> str:
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
    width = max(10, (cli.out.width or shutil.get_terminal_size().columns) - 50)
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
            _num(min(values)) if values else "-",
            _num(max(values)) if values else "-",
            _num(values[-1]) if values else "-",
        )
    cli.out.print(table)
