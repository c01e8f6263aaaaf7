"""fleetctl events: the manager's event feed, resumable by id, optionally followed.

Without -f it shows the last `DEFAULT_TAIL` events, or everything after
--since ID, or the last --tail N; -f starts from now unless --since or
--tail says otherwise. The manager picks the tail with an indexed query, so
a long history is never streamed to be thrown away here.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from fleet.v1 import fleet_pb2
from fleetctl.client import Connection
from fleetctl.output import Column, OutputFormat, dump, print_rows
from fleetctl.runtime import EXIT_OK, Cli, Stub, UsageProblem
from fleetctl.views import event_view

__all__ = ["DEFAULT_TAIL", "KIND_NAMES", "events", "parse_kinds", "start_tail"]

DEFAULT_TAIL = 20
"""Events `fleetctl events` shows without --tail or --since."""

KIND_NAMES: dict[str, fleet_pb2.EventKind.ValueType] = {
    name.removeprefix("EVENT_KIND_").lower().replace("_", "-"): value
    for name, value in fleet_pb2.EventKind.items()
    if value != fleet_pb2.EVENT_KIND_UNSPECIFIED
}
"""--kind spellings: node-registered, node-online, ..., operation."""


def parse_kinds(kinds: list[str]) -> list[fleet_pb2.EventKind.ValueType]:
    """--kind values (case and -/_ insensitive, comma lists allowed); UsageProblem if unknown."""
    out: list[fleet_pb2.EventKind.ValueType] = []
    for item in kinds:
        for raw in item.split(","):
            name = raw.strip().lower().replace("_", "-")
            if name not in KIND_NAMES:
                raise UsageProblem(
                    f"--kind: unknown event kind {raw!r}; one of {', '.join(KIND_NAMES)}"
                )
            out.append(KIND_NAMES[name])
    return out


_COLUMNS = [
    Column("ID", "id"),
    Column("TIME", "time"),
    Column("KIND", "kind"),
    Column("NODE", "node_id"),
    Column("AGENT", "agent_id"),
    Column("ACTOR", "actor"),
    Column("MESSAGE", "message"),
    Column("ATTRIBUTES", "attributes", wide=True),
]


def start_tail(*, follow: bool, since: int | None, tail: int | None) -> int | None:
    """How many past events to begin with (None: all after --since) (pure).

    --tail wins; --since alone means everything after it; neither means the
    last DEFAULT_TAIL, or none when following (from now).
    """
    if tail is not None or since is not None:
        return tail
    return 0 if follow else DEFAULT_TAIL


def _line(view: dict[str, Any], wide: bool) -> str:
    """One event as one line, for a followed feed (a table cannot grow)."""
    subject = view["node_id"] + (f"/{view['agent_id']}" if view["agent_id"] else "")
    parts = [f"#{view['id']}", view["time"] or "-", view["kind"], subject or "-"]
    parts += [view["actor"] or "-", view["message"]]
    if wide and view["attributes"]:
        parts.append(" ".join(f"{k}={v}" for k, v in view["attributes"].items()))
    return "  ".join(parts)


def events(
    ctx: typer.Context,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep the stream open for new events.")
    ] = False,
    since: Annotated[
        int | None,
        typer.Option("--since", min=0, help="Every event after this event id (resume)."),
    ] = None,
    tail: Annotated[
        int | None,
        typer.Option(
            "--tail",
            min=0,
            help=f"Begin with the last N events (default {DEFAULT_TAIL}; with -f: 0, from now).",
        ),
    ] = None,
    kind: Annotated[
        list[str] | None,
        typer.Option("--kind", "-k", help="Only these kinds (repeat or comma-separate)."),
    ] = None,
    node: Annotated[str | None, typer.Option("--node", "-n", help="Only about this node.")] = None,
) -> None:
    """Show events (nodes, labels, agent states, operations, rollouts, jobs).

    The last 20 by default; -f follows from now.
    """
    cli = Cli.of(ctx)
    kinds = cli.checked(lambda: parse_kinds(kind or []))
    first = start_tail(follow=follow, since=since, tail=tail)
    request = fleet_pb2.FleetServiceWatchEventsRequest(
        from_event_id=since or 0, kinds=kinds, node_id=node or "", follow=follow
    )
    if first is not None:
        request.tail = first

    def note_left_out(item: fleet_pb2.FleetServiceWatchEventsResponse) -> None:
        if item.older_events_left_out:
            cli.note(f"fleetctl: showing the last {first} events; --tail N or --since ID for more")

    async def body(stub: Stub, conn: Connection) -> int:
        stream = stub.WatchEvents(request, timeout=None if follow else conn.timeout)
        fmt = cli.fmt
        if not follow:
            items = [item async for item in stream]
            rows = [event_view(item.event) for item in items]
            print_rows(cli.out, fmt, rows, _COLUMNS, empty="No events.", key="events")
            if items:
                note_left_out(items[0])
            return EXIT_OK
        # Followed: one line (or one JSON object, or one YAML document) per event.
        async for item in stream:
            note_left_out(item)
            view = event_view(item.event)
            if fmt is OutputFormat.json:
                cli.out.out(json.dumps(view, ensure_ascii=False), highlight=False)
            elif fmt is OutputFormat.yaml:
                cli.out.out("---\n" + dump(fmt, view), end="", highlight=False)
            else:
                cli.out.print(_line(view, fmt is OutputFormat.wide), markup=False, soft_wrap=True)
            cli.out.file.flush()
        return EXIT_OK

    cli.call(body, on_interrupt=None if follow else "interrupted")
