"""fleetctl agents: list, show, logs, and the operations (see `fanout`)."""

from __future__ import annotations

import shlex
import sys
import time
from typing import Annotated, Any, BinaryIO

import typer

from fleet import selectors
from fleet.errors import NotFound, Resource
from fleet.v1 import common_pb2, fleet_pb2
from fleetctl import fanout
from fleetctl.client import Connection
from fleetctl.nodes import SelectorOpt, parse_selector
from fleetctl.output import Column, print_object, print_rows
from fleetctl.runtime import EXIT_FAILED, EXIT_OK, Cli, Stub, UsageProblem
from fleetctl.timespec import format_age, format_duration
from fleetctl.views import node_agent_view

__all__ = ["app", "split_agent_ref"]

STATES_HELP = """\
Agent processes supervised by the daemons.

\b
States (supervisord's vocabulary):
  STOPPED    not running, and not meant to be until started
  STARTING   spawned; RUNNING once it stayed up start_secs
  RUNNING    up for longer than start_secs
  BACKOFF    exited before start_secs; waiting before the next try
  STOPPING   stop signal sent; waiting for its process group (then SIGKILL)
  EXITED     ended after RUNNING; its restart policy does not restart it
  FATAL      gave up after max_retries early exits, or could not start
  UNKNOWN    the daemon lost track of it (a bug): restart it

\b
Health (of agents with a health check):
  NONE       no health check: a live process counts as healthy
  PENDING    has a check it has not passed yet (e.g. not registered)
  HEALTHY    passing its check
  UNHEALTHY  failing it; restarted unless its restart policy is never

Why an agent last stopped or restarted is its last exit: see `agents show`
and `agents list -o wide`; docs/agents.md explains each state and what to do.
"""

app = typer.Typer(help=STATES_HELP, no_args_is_help=True)

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


def _last_exit_cell(now_ms: int) -> Any:
    def cell(how: Any) -> str:
        if not how:
            return "-"
        return f"{how['reason']} ({format_age(int(how['time_ms']), now_ms=now_ms)})"

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
        Column("REV", "revision", cell=lambda r: str(r) if r else "-", wide=True),
        Column("LAST EXIT", "last_exit", cell=_last_exit_cell(now_ms), wide=True),
        Column("MESSAGE", "message", wide=True),
        Column("LABELS", "labels", wide=True),
    ]


def split_agent_ref(ref: str) -> tuple[str, str]:
    """``NODE/AGENT`` -> (node, agent); UsageProblem if it is not that shape."""
    node, sep, agent = ref.partition("/")
    if not sep or not node or not agent or "/" in agent:
        raise UsageProblem(f"{ref!r}: expected NODE/AGENT, e.g. node-1/web")
    return node, agent


STATUS_NAMES = [
    name.removeprefix("AGENT_STATUS_")
    for name, value in common_pb2.AgentStatus.items()
    if value != common_pb2.AGENT_STATUS_UNSPECIFIED
]
"""--status values."""


def parse_statuses(text: str | None) -> list[common_pb2.AgentStatus.ValueType]:
    """--status RUNNING,FATAL (any case) -> enum values; UsageProblem naming a bad one."""
    if not text:
        return []
    out = []
    for raw in text.split(","):
        name = raw.strip().upper()
        if name not in STATUS_NAMES:
            raise UsageProblem(
                f"--status: unknown agent state {raw.strip()!r}; one of {', '.join(STATUS_NAMES)}"
            )
        out.append(common_pb2.AgentStatus.Value(f"AGENT_STATUS_{name}"))
    return out


def wanted(
    agent: common_pb2.AgentInfo,
    statuses: list[common_pb2.AgentStatus.ValueType],
    *,
    unhealthy: bool,
) -> bool:
    """True if `agent` passes --status and --unhealthy."""
    if statuses and agent.status not in statuses:
        return False
    return not unhealthy or agent.health == common_pb2.AGENT_HEALTH_UNHEALTHY


def stale_note(rows: list[dict[str, Any]], now_ms: int) -> list[str]:
    """One line per offline node whose agents are shown as last reported."""
    reported: dict[str, int] = {}
    for row in rows:
        if row.get("stale"):
            node = str(row["node_id"])
            reported[node] = max(reported.get(node, 0), int(row.get("reported_at_ms") or 0))
    return [
        f"node {node} is OFFLINE: its agents (marked *) are what its daemon last reported,"
        f" {format_age(ms, now_ms=now_ms)}"
        for node, ms in sorted(reported.items())
    ]


@app.command("list")
def list_agents(
    ctx: typer.Context,
    node: Annotated[str | None, typer.Option("--node", "-n", help="Only this node.")] = None,
    selector: SelectorOpt = None,
    live: Annotated[
        bool, typer.Option("--live", help="Ask the daemons now instead of their last sync.")
    ] = False,
    status: Annotated[
        str | None,
        typer.Option(
            "--status", help="Only agents in these states, e.g. FATAL,BACKOFF (see --help above)."
        ),
    ] = None,
    unhealthy: Annotated[
        bool, typer.Option("--unhealthy", help="Only agents whose health is UNHEALTHY.")
    ] = False,
) -> None:
    """List agents of one node, of the nodes matching -l, or of every node.

    Agents of an OFFLINE node are shown as their daemon last reported them,
    marked stale (a * after the state; `stale` and `reported_at` in json/yaml).
    """
    cli = Cli.of(ctx)
    if node is not None and selector is not None:
        cli.checked(_conflict)
    sel = cli.checked(lambda: parse_selector(selector))
    statuses = cli.checked(lambda: parse_statuses(status))

    async def body(stub: Stub, conn: Connection) -> int:
        reply = await stub.ListAgents(
            fleet_pb2.FleetServiceListAgentsRequest(
                node_id=node or "",
                selector=selectors.to_proto(sel),
                live=live,
                statuses=statuses,
                unhealthy=unhealthy,
            ),
            timeout=conn.timeout,
        )
        now_ms = int(time.time() * 1000)
        rows = []
        # The manager filters; a manager older than the filters ignores them (an
        # unknown field), so filter again rather than ever show more than asked.
        agents = [a for a in reply.agents if wanted(a.agent, statuses, unhealthy=unhealthy)]
        for item in sorted(agents, key=lambda a: (a.node_id, a.agent.id)):
            row = node_agent_view(item)
            row["uptime_start_ms"] = item.agent.start_time if row["status"] == "RUNNING" else 0
            rows.append(row)
        errors = [
            {"node_id": e.node_id, "agent_id": e.agent_id, "message": e.message}
            for e in reply.errors
        ]
        if cli.fmt.structured:
            print_object(cli.out, cli.fmt, {"agents": rows, "errors": errors}, [])
        else:
            shown = [
                {**r, "status": f"{r['status']}*" if r["stale"] else r["status"]} for r in rows
            ]
            print_rows(cli.out, cli.fmt, shown, _columns(now_ms))
            for line in stale_note(rows, now_ms):
                cli.warn(line)
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
    ("Last exit", "last_exit_line"),
    ("Message", "message"),
    ("Output", "output_line"),
    ("Health", "health_line"),
    ("Last heartbeat", "last_heartbeat"),
    ("Backoff until", "backoff_until"),
    ("Config version", "config_version"),
    ("Revision", "revision_line"),
    ("Labels", "labels"),
    ("Reported", "reported_line"),
]
_SPEC_FIELDS = [
    ("Command", "argv_line"),
    ("Env (names)", "env_keys"),
    ("Working dir", "cwd"),
    ("User", "user"),
    ("Restart policy", "restart_line"),
    ("Stop", "stop_line"),
    ("Health check", "health_check"),
    ("Log file", "log_path"),
]


def show_fields(
    view: dict[str, Any], *, now_ms: int, unreachable: str = ""
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The human form of `agents show`: the state, then the spec (or why it is missing).

    `unreachable`: why the daemon could not be asked, when `view` is the
    manager's copy of the state instead of the daemon's answer.
    """
    human = dict(view)
    how = view.get("last_exit")
    human["last_exit_line"] = (
        f"{how['reason']} (exit code {how['exit_code']}), {how['time']}"
        f" ({format_age(int(how['time_ms']), now_ms=now_ms)})"
        if how
        else "never exited"
    )
    since_ms = int(view.get("health_since_ms") or 0)
    human["health_line"] = (
        str(view.get("health", ""))
        + (
            f" since {view['health_since']} ({format_age(since_ms, now_ms=now_ms)})"
            if since_ms
            else ""
        )
        + (f": {view['health_message']}" if view.get("health_message") else "")
    )
    problem = view.get("log_problem")
    human["output_line"] = f"BEING LOST: {problem}" if problem else "logged"
    revision = int(view.get("revision") or 0)
    human["revision_line"] = (
        f"{revision} (of the definition {view.get('agent_id')})"
        if revision
        else "none (an agent of the host's own config)"
    )
    reported_ms = int(view.get("reported_at_ms") or 0)
    if not unreachable:
        human["reported_line"] = "live (asked the daemon now)"
    elif reported_ms:
        human["reported_line"] = (
            f"{view['reported_at']} ({format_age(reported_ms, now_ms=now_ms)})"
            + ("; the node is OFFLINE, this is what its daemon last said" if view["stale"] else "")
        )
    else:
        human["reported_line"] = "unknown (the manager has not kept when)"
    fields = list(_FIELDS)
    spec = view.get("spec")
    if spec is None:
        human["spec_missing"] = (
            f"unavailable: the daemon could not be asked ({unreachable})"
            if unreachable
            else "not reported by this daemon (an older fleet-daemon)"
        )
        fields.append(("Spec", "spec_missing"))
        return human, fields
    # Spec keys by name: merging the spec in would put its health check over the health.
    for key in ("env_keys", "cwd", "user"):
        human[key] = spec[key]
    human["log_path"] = view.get("log_path")
    human["argv_line"] = shlex.join(spec["argv"])
    human["restart_line"] = (
        f"{spec['restart']}; autostart {'yes' if spec['autostart'] else 'no'},"
        f" start_secs {spec['start_secs']:g}, max_retries {spec['max_retries']}"
    )
    human["stop_line"] = (
        f"{spec['stop_signal'] or 'SIGTERM'}, then SIGKILL after {spec['stop_timeout_seconds']:g}s"
    )
    human["health_check"] = spec["health"]
    return human, fields + _SPEC_FIELDS


@app.command("show")
def show_agent(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="NODE/AGENT", help="e.g. node-1/web")],
    live: Annotated[
        bool,
        typer.Option("--live", help="Fail if the daemon cannot be asked (no fallback)."),
    ] = False,
) -> None:
    """Show one agent: its state, last exit, health, and the spec its daemon runs.

    The daemon is asked now; when it cannot be reached, the state it last
    reported is shown (without the spec), unless --live.
    """
    cli = Cli.of(ctx)
    node, agent = cli.checked(lambda: split_agent_ref(ref))

    async def body(stub: Stub, conn: Connection) -> int:
        reply = await stub.ListAgents(
            fleet_pb2.FleetServiceListAgentsRequest(node_id=node, live=True), timeout=conn.timeout
        )
        unreachable = ""
        if reply.errors:
            if live:
                for e in reply.errors:
                    cli.warn(_could_not_list(e))
                return EXIT_FAILED
            unreachable = reply.errors[0].message.removeprefix(f"{node}: ")
            reply = await stub.ListAgents(
                fleet_pb2.FleetServiceListAgentsRequest(node_id=node), timeout=conn.timeout
            )
        found = [a for a in reply.agents if a.agent.id == agent]
        if not found:
            raise NotFound(
                f"node {node!r} has no agent {agent!r}",
                resource=Resource("agent", agent, node=node),
            )
        view = node_agent_view(found[0])
        if unreachable:
            view["spec"] = None
            view["spec_unavailable"] = f"the daemon could not be asked ({unreachable})"
        if cli.fmt.structured:
            print_object(cli.out, cli.fmt, view, [])
            return EXIT_OK
        human, fields = show_fields(view, now_ms=int(time.time() * 1000), unreachable=unreachable)
        print_object(cli.out, cli.fmt, human, fields)
        if unreachable:
            cli.warn(f"node {node}: showing the state its daemon last reported ({unreachable})")
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
