"""fleetctl agents: list, show, logs, and the operations (see `fanout`)."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any, BinaryIO

import typer

from fleet import selectors
from fleet.errors import NotFound, Resource
from fleet.v1 import fleet_pb2
from fleetctl import fanout
from fleetctl.client import Connection
from fleetctl.nodes import SelectorOpt, parse_selector
from fleetctl.output import Column, print_object, print_rows
from fleetctl.runtime import EXIT_FAILED, EXIT_OK, Cli, Stub, UsageProblem
from fleetctl.timespec import format_duration
from fleetctl.views import agent_view

__all__ = ["app", "split_agent_ref"]

app = typer.Typer(help="Agent processes supervised by the daemons.", no_args_is_help=True)

app.command("operate")(fanout.operate)
app.command("start")(fanout.start)
app.command("stop")(fanout.stop)
app.command("restart")(fanout.restart)

_STATUS_STYLE = {
    "RUNNING": "green",
    "STARTING": "cyan",
    "BACKOFF": "yellow",
    "STOPPING": "cyan",
    "STOPPED": "dim",
    "EXITED": "yellow",
    "FATAL": "red",
    "UNKNOWN": "red",
}


def status_style(value: Any) -> str:
    """Rich style of an agent status (supervisord colours operators know)."""
    return _STATUS_STYLE.get(str(value), "")


def _uptime(now_ms: int) -> Any:
    def cell(row_start_ms: Any) -> str:
        start = int(row_start_ms or 0)
        return format_duration((now_ms - start) / 1000) if start else "-"

    return cell


def _columns(now_ms: int) -> list[Column]:
    return [
        Column("NODE", "node_id"),
        Column("AGENT", "agent_id"),
        Column("TYPE", "type"),
        Column("STATUS", "status", style=status_style),
        Column("PID", "pid"),
        Column("UPTIME", "uptime_start_ms", cell=_uptime(now_ms)),
        Column("RESTARTS", "restart_count"),
        Column("HEALTH", "health", wide=True),
        Column("VERSION", "version", wide=True),
        Column("EXIT", "exit_code", wide=True),
        Column("MESSAGE", "message", wide=True),
        Column("LABELS", "labels", wide=True),
    ]


def split_agent_ref(ref: str) -> tuple[str, str]:
    """``NODE/AGENT`` -> (node, agent); UsageProblem if it is not that shape."""
    node, sep, agent = ref.partition("/")
    if not sep or not node or not agent or "/" in agent:
        raise UsageProblem(f"{ref!r}: expected NODE/AGENT, e.g. node-1/web")
    return node, agent


@app.command("list")
def list_agents(
    ctx: typer.Context,
    node: Annotated[str | None, typer.Option("--node", "-n", help="Only this node.")] = None,
    selector: SelectorOpt = None,
    live: Annotated[
        bool, typer.Option("--live", help="Ask the daemons now instead of their last sync.")
    ] = False,
) -> None:
    """List agents of one node, of the nodes matching -l, or of every node."""
    cli = Cli.of(ctx)
    if node is not None and selector is not None:
        cli.checked(_conflict)
    sel = cli.checked(lambda: parse_selector(selector))

    async def body(stub: Stub, conn: Connection) -> int:
        reply = await stub.ListAgents(
            fleet_pb2.FleetServiceListAgentsRequest(
                node_id=node or "", selector=selectors.to_proto(sel), live=live
            ),
            timeout=conn.timeout,
        )
        rows = []
        for item in sorted(reply.agents, key=lambda a: (a.node_id, a.agent.id)):
            row = agent_view(item.node_id, item.agent)
            row["uptime_start_ms"] = item.agent.start_time if row["status"] == "RUNNING" else 0
            rows.append(row)
        errors = [
            {"node_id": e.node_id, "agent_id": e.agent_id, "message": e.message}
            for e in reply.errors
        ]
        if cli.fmt.structured:
            print_object(cli.out, cli.fmt, {"agents": rows, "errors": errors}, [])
        else:
            print_rows(cli.out, cli.fmt, rows, _columns(int(time.time() * 1000)))
            for e in reply.errors:
                cli.warn(_could_not_list(e))
        return EXIT_FAILED if errors else EXIT_OK

    cli.call(body)


def _could_not_list(error: fleet_pb2.TargetError) -> str:
    """One line for a daemon the manager could not ask (its message starts with the node)."""
    reason = error.message.removeprefix(f"{error.node_id}: ")
    return f"node {error.node_id}: could not list agents: {reason}"


def _conflict() -> None:
    raise UsageProblem("give --node or -l/--selector, not both")


_FIELDS = [
    ("Node", "node_id"),
    ("Agent", "agent_id"),
    ("Type", "type"),
    ("Status", "status"),
    ("PID", "pid"),
    ("Version", "version"),
    ("Started", "start_time"),
    ("Restarts", "restart_count"),
    ("Exit code", "exit_code"),
    ("Message", "message"),
    ("Health", "health"),
    ("Last heartbeat", "last_heartbeat"),
    ("Backoff until", "backoff_until"),
    ("Config version", "config_version"),
    ("Labels", "labels"),
]


@app.command("show")
def show_agent(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="NODE/AGENT", help="e.g. node-1/web")],
    live: Annotated[bool, typer.Option("--live", help="Ask the daemon now.")] = False,
) -> None:
    """Show one agent: state, pid, restarts, last exit, health."""
    cli = Cli.of(ctx)
    node, agent = cli.checked(lambda: split_agent_ref(ref))

    async def body(stub: Stub, conn: Connection) -> int:
        reply = await stub.ListAgents(
            fleet_pb2.FleetServiceListAgentsRequest(node_id=node, live=live), timeout=conn.timeout
        )
        for e in reply.errors:
            cli.warn(_could_not_list(e))
        found = [a for a in reply.agents if a.agent.id == agent]
        if not found:
            raise NotFound(
                f"node {node!r} has no agent {agent!r}",
                resource=Resource("agent", agent, node=node),
            )
        print_object(cli.out, cli.fmt, agent_view(node, found[0].agent), _FIELDS)
        return EXIT_OK

    cli.call(body)


def _stdout_bytes() -> BinaryIO:
    buffer: BinaryIO = sys.stdout.buffer
    return buffer


@app.command("logs")
def logs(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="NODE/AGENT", help="e.g. node-1/web")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming new output.")
    ] = False,
    tail: Annotated[
        int | None, typer.Option("--tail", min=0, help="Only the last N lines.")
    ] = None,
) -> None:
    """Print an agent's log (streamed from its daemon through the manager)."""
    cli = Cli.of(ctx)
    node, agent = cli.checked(lambda: split_agent_ref(ref))

    async def body(stub: Stub, conn: Connection) -> int:
        out = _stdout_bytes()
        offset = 0
        if tail is not None:
            # Read enough of the end for N lines, print the last N, follow from there.
            want = max(64 * 1024, tail * 512)
            data = b""
            stream = stub.ReadAgentLog(
                fleet_pb2.FleetServiceReadAgentLogRequest(
                    node_id=node, agent_id=agent, offset=-want, follow=False
                ),
                timeout=conn.timeout,
            )
            async for chunk in stream:
                data += chunk.data
                offset = chunk.next_offset
            out.write(last_lines(data, tail))
            out.flush()
            if not follow:
                return EXIT_OK
        stream = stub.ReadAgentLog(
            fleet_pb2.FleetServiceReadAgentLogRequest(
                node_id=node, agent_id=agent, offset=offset, follow=follow
            ),
            timeout=None if follow else conn.timeout,
        )
        async for chunk in stream:
            if chunk.rotated:
                cli.warn(f"{node}/{agent}: log rotated; continuing with the new file")
            out.write(chunk.data)
            out.flush()
        return EXIT_OK

    cli.call(body, on_interrupt=None if follow else "interrupted")


def last_lines(data: bytes, count: int) -> bytes:
    """The last `count` lines of `data` (a trailing partial line counts as one)."""
    if count == 0:
        return b""
    lines = data.splitlines(keepends=True)
    return b"".join(lines[-count:])
