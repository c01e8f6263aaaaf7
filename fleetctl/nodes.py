"""fleetctl nodes: list, show, label, delete, revoke."""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Annotated, Any

import grpc
import typer

from fleet import selectors
from fleet.clockskew import SHOWN_FROM_MS, clock_words
from fleet.labels import LabelError, validate_label_key, validate_label_value
from fleet.v1 import common_pb2, fleet_pb2
from fleetctl.client import Connection
from fleetctl.output import Column, OutputFormat, print_object, print_rows
from fleetctl.runtime import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Cli,
    Stub,
    UsageProblem,
    stdin_is_interactive,
)
from fleetctl.timespec import format_age, format_duration, format_time
from fleetctl.views import node_view

__all__ = ["app", "parse_label_changes", "parse_selector"]

app = typer.Typer(
    help="Hosts running fleet-daemon, as the manager sees them.", no_args_is_help=True
)

SelectorOpt = Annotated[
    str | None,
    typer.Option(
        "-l", "--selector", help="Label selector, e.g. 'env=prod,tier in (web,api),!canary'."
    ),
]


def parse_selector(text: str | None) -> selectors.Selector:
    """The -l value as a Selector; UsageProblem naming the position if it does not parse."""
    if text is None:
        return selectors.Selector.everything()
    try:
        return selectors.parse(text)
    except selectors.SelectorError as exc:
        raise UsageProblem(f"invalid selector {text!r}: {exc.message}") from None


def _status_style(value: Any) -> str:
    return {"ONLINE": "green", "OFFLINE": "red", "REVOKED": "red"}.get(str(value), "yellow")


# A certificate this close to expiry is shown in yellow: renewal should have
# happened at two thirds of its lifetime, so something is wrong on that host.
_CERT_WARN_MS = 24 * 3600 * 1000


def cert_expiry_cell(expire_ms: int, *, now_ms: int) -> str:
    """When a node's certificate expires: "6d23h", "expired 2h ago", "-" if unknown."""
    if not expire_ms:
        return "-"
    if expire_ms <= now_ms:
        return f"expired {format_age(expire_ms, now_ms=now_ms)}"
    return format_age(expire_ms, now_ms=now_ms).removeprefix("in ")


def _expiry_style(expire_ms: int, now_ms: int) -> str:
    if not expire_ms:
        return ""
    if expire_ms <= now_ms:
        return "red"
    return "yellow" if expire_ms - now_ms < _CERT_WARN_MS else ""


def agents_cell(view: dict[str, Any]) -> str:
    """Running/total agents; a * when the node is not ONLINE: the counts are what its daemon
    last reported, not what runs now."""
    counts = view["agents"]
    if not counts:
        return "0"
    cell = f"{counts.get('RUNNING', 0)}/{sum(counts.values())}"
    return cell if view["status"] == "ONLINE" else f"{cell}*"


def agents_text(view: dict[str, Any]) -> str:
    """`nodes show`'s agents line: the count by state, and whose word it is when not ONLINE."""
    counts = view["agents"]
    if not counts:
        return "none"
    text = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    if view["status"] == "ONLINE":
        return text
    return f"{text} (as its daemon last reported; the node is {view['status']})"


def desired_cell(view: dict[str, Any]) -> str:
    """Whether a node runs what the definitions say: "in sync", "DRIFT", "-" (none manage it)."""
    if view["drift"]:
        return "DRIFT"
    return "in sync" if view["desired_version"] else "-"


def desired_text(view: dict[str, Any]) -> str:
    """`nodes show`'s desired-state line: the versions and, on drift, why."""
    if not view["desired_version"] and not view["drift"]:
        return "- (no definition has selected this node)"
    versions = f"version {view['desired_version']}, daemon reports {view['reported_version']}"
    if not view["drift"]:
        return f"in sync ({versions})"
    refused = view["update_errors"]
    if not refused:
        return f"DRIFT: {view['drift_reason']} ({versions})"
    lines = [f"DRIFT: the daemon refused {len(refused)} agent(s) ({versions})"]
    lines += [f"refused {e['agent_id']} (revision {e['revision']}): {e['reason']}" for e in refused]
    return "\n".join(lines)


def stream_cell(view: dict[str, Any], now_ms: int) -> str:
    """The control stream in a table cell: connected, lost 20s ago, on m2, none, -."""
    state = view["stream"]
    if state == "LOST":
        return f"lost {format_age(view['stream_since_ms'], now_ms=now_ms)}"
    if state == "ELSEWHERE":
        return f"on {view['stream_replica']}"
    return {"CONNECTED": "connected", "NONE": "none"}.get(state, "-")


def heartbeat_cell(view: dict[str, Any], now_ms: int) -> str:
    """When the manager last heard the node; "(stream lost)" says why an ONLINE node has
    not been heard for a while: its broken stream's grace keeps it online."""
    age = format_age(int(view["last_heartbeat_ms"] or 0), now_ms=now_ms)
    if view["stream"] == "LOST" and view["status"] == "ONLINE":
        return f"{age} (stream lost)"
    return age


def stream_text(node: fleet_pb2.Node, now_ms: int) -> str:
    """`nodes show`'s control-stream line."""
    state = node.stream_state
    if state == fleet_pb2.CONTROL_STREAM_STATE_CONNECTED:
        since = format_age(node.stream_since, now_ms=now_ms)
        return f"connected since {format_time(node.stream_since)} ({since})"
    if state == fleet_pb2.CONTROL_STREAM_STATE_LOST:
        lost = f"lost {format_age(node.stream_since, now_ms=now_ms)}"
        if node.status != common_pb2.NODE_STATUS_ONLINE:
            return lost
        left = (node.stream_offline_at - now_ms) / 1000
        # Why the node still reads ONLINE with a fresh heartbeat: the grace keeps it so.
        if left > 0:
            return f"{lost}; OFFLINE in {format_duration(left)} unless it reconnects"
        return f"{lost}; its grace is over: OFFLINE at the next sweep unless it reconnects"
    if state == fleet_pb2.CONTROL_STREAM_STATE_ELSEWHERE:
        return f"connected to replica {node.stream_replica}"
    if state == fleet_pb2.CONTROL_STREAM_STATE_NONE:
        if node.status == common_pb2.NODE_STATUS_ONLINE:
            return "none (the daemon heartbeats over unary calls)"
        return "none"
    return "unknown"


def _columns(now_ms: int) -> list[Column]:
    return [
        Column("NODE", "node_id"),
        Column("STATUS", "status", style=_status_style),
        Column("AGENTS", "agents_cell"),
        Column("DESIRED", "desired", style=lambda v: "yellow" if v == "DRIFT" else ""),
        Column("LAST HEARTBEAT", "heartbeat_cell"),
        Column("LABELS", "labels"),
        Column(
            "CERT EXPIRES",
            "cert_expire_time_ms",
            cell=lambda ms: cert_expiry_cell(int(ms or 0), now_ms=now_ms),
            style=lambda ms: _expiry_style(int(ms or 0), now_ms),
        ),
        Column("HOSTNAME", "hostname", wide=True),
        Column("IP", "ip", wide=True),
        Column("VERSION", "daemon_version", wide=True),
        Column("STREAM", "stream_cell", wide=True),
        Column("CONNECTION", "connection", wide=True),
        Column("ADDRESS", "daemon_address", wide=True),
        Column("DRIFT", "drift_reason", wide=True),
    ]


@app.command("list")
def list_nodes(ctx: typer.Context, selector: SelectorOpt = None) -> None:
    """List nodes, optionally only those whose labels match -l."""
    cli = Cli.of(ctx)
    sel = cli.checked(lambda: parse_selector(selector))

    async def body(stub: Stub, conn: Connection) -> int:
        request = fleet_pb2.FleetServiceListNodesRequest(selector=selectors.to_proto(sel))
        reply = await stub.ListNodes(request, timeout=conn.timeout)
        now_ms = int(time.time() * 1000)
        rows = [
            node_row(n, now_ms, cells=not cli.fmt.structured)
            for n in sorted(reply.nodes, key=lambda n: n.node_id)
        ]
        print_rows(cli.out, cli.fmt, rows, _columns(now_ms), key="nodes")
        if not cli.fmt.structured and any(r["agents_cell"].endswith("*") for r in rows):
            cli.warn("agents marked * are what the daemon last reported: the node is not ONLINE")
        return EXIT_OK

    cli.call(body)


def node_row(node: fleet_pb2.Node, now_ms: int, *, cells: bool) -> dict[str, Any]:
    """A node's row; with `cells`, also the table's own cells (not in JSON or YAML)."""
    view = node_view(node)
    if node.revoke_time:
        view["status"] = "REVOKED"  # its certificates are refused: it cannot come back online
    if cells:
        view["agents_cell"] = agents_cell(view)
        view["desired"] = desired_cell(view)
        view["stream_cell"] = stream_cell(view, now_ms)
        view["heartbeat_cell"] = heartbeat_cell(view, now_ms)
    return view


_FIELDS = [
    ("Node", "node_id"),
    ("Status", "status"),
    ("Hostname", "hostname"),
    ("IP", "ip"),
    ("OS/Arch", "platform"),
    ("Labels", "labels"),
    ("Daemon version", "daemon_version"),
    ("Agent version", "agent_version"),
    ("Daemon address", "daemon_address"),
    ("Control stream", "stream_text"),
    ("Connection", "connection"),
    ("Last heartbeat", "last_heartbeat_age"),
    ("Registered", "registered_at"),
    ("Agents", "agents_text"),
    ("Desired state", "desired_text"),
    ("Jobs", "jobs"),
    ("Certificate", "certificate"),
    ("Clock", "clock"),
]


def label_sources(node: fleet_pb2.Node) -> list[str]:
    """Each effective label with where it comes from (daemon config or operator)."""
    out = []
    for key, value in sorted(node.labels.items()):
        if key not in node.operator_labels:
            out.append(f"{key}={value} (daemon config)")
        elif key in node.daemon_labels and node.daemon_labels[key] != value:
            out.append(f"{key}={value} (operator; overrides {node.daemon_labels[key]!r} from the"
                       " daemon config)")  # fmt: skip
        else:
            out.append(f"{key}={value} (operator)")
    return out


def _show(cli: Cli, node: fleet_pb2.Node) -> None:
    view = node_view(node)
    if cli.fmt.structured:
        print_object(cli.out, cli.fmt, view, [])
        return
    now_ms = int(time.time() * 1000)
    fields = _FIELDS
    clock = clock_text(node)
    if not clock:  # in step with the manager, or not known: nothing to say
        fields = [f for f in fields if f[1] != "clock"]
    if cli.fmt is OutputFormat.wide:
        fields = [("Labels", "label_sources") if f == ("Labels", "labels") else f for f in fields]
    human = {
        **view,
        "label_sources": "\n".join(label_sources(node)) or "-",
        "platform": f"{view['os'] or '?'}/{view['arch'] or '?'}",
        # The host's daemon refuses remote jobs (its [jobs] enabled = false).
        "jobs": "disabled (jobs.enabled = false in the host's daemon config)"
        if node.jobs_disabled
        else "enabled",
        "certificate": _certificate_text(node, now_ms),
        "clock": clock,
        "agents_text": agents_text(view),
        "desired_text": desired_text(view),
        "stream_text": stream_text(node, now_ms),
        "last_heartbeat_age": (
            f"{view['last_heartbeat']} ({format_age(node.last_heartbeat, now_ms=now_ms)})"
            if node.last_heartbeat
            else "never"
        ),
    }
    print_object(cli.out, cli.fmt, human, fields)


def clock_text(node: fleet_pb2.Node) -> str:
    """How far the node's clock is off the manager's and what that refuses; "" when it is
    within SHOWN_FROM_MS or unknown (an older daemon does not say)."""
    if not node.HasField("clock_offset_ms") or abs(node.clock_offset_ms) < SHOWN_FROM_MS:
        return ""
    return clock_words(node.clock_offset_ms)


def _certificate_text(node: fleet_pb2.Node, now_ms: int) -> str:
    parts = []
    if node.cert_expire_time:
        when = cert_expiry_cell(node.cert_expire_time, now_ms=now_ms)
        verb = "" if when.startswith("expired") else "expires in "
        parts.append(f"{verb}{when} ({format_time(node.cert_expire_time)})")
    else:
        parts.append("expiry unknown")
    if node.revoke_time:
        parts.append(
            f"REVOKED at {format_time(node.revoke_time)}: refused until it enrolls again"
            f" with a token made with `fleetctl tokens create --node-name {node.node_id}`"
        )
    return "; ".join(parts)


@app.command("show")
def show_node(ctx: typer.Context, node: Annotated[str, typer.Argument(help="Node id.")]) -> None:
    """Show one node: status, labels, versions, last heartbeat, agents by state, desired state."""
    cli = Cli.of(ctx)

    async def body(stub: Stub, conn: Connection) -> int:
        reply = await stub.GetNode(
            fleet_pb2.FleetServiceGetNodeRequest(node_id=node), timeout=conn.timeout
        )
        _show(cli, reply.node)
        return EXIT_OK

    cli.call(body)


def parse_label_changes(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """kubectl label syntax: ``k=v`` sets, ``k-`` removes; UsageProblem if malformed."""
    to_set: dict[str, str] = {}
    to_remove: list[str] = []
    for arg in args:
        try:
            if "=" in arg:
                key, value = arg.split("=", 1)
                validate_label_key(key)
                validate_label_value(value)
                to_set[key] = value
            elif arg.endswith("-"):
                key = arg[:-1]
                validate_label_key(key)
                to_remove.append(key)
            else:
                raise UsageProblem(f"label change {arg!r}: use key=value to set or key- to remove")
        except LabelError as exc:
            raise UsageProblem(f"label change {arg!r}: {exc.message}") from None
    both = sorted(set(to_set) & set(to_remove))
    if both:
        raise UsageProblem(f"label {both[0]!r} is both set and removed; pick one")
    return to_set, to_remove


def label_notes(
    node: fleet_pb2.Node,
    to_set: dict[str, str],
    to_remove: list[str],
    *,
    absent: Collection[str] = (),
) -> list[str]:
    """What an operator should know after a label change: overrides, daemon values,
    and keys to remove that the node did not have (`absent`, from the manager)."""
    notes = []
    for key in sorted(to_set):
        if key in node.daemon_labels and node.daemon_labels[key] != to_set[key]:
            notes.append(
                f"{key}={to_set[key]} overrides {key}={node.daemon_labels[key]} from the"
                f" daemon's config; '{key}-' removes the override"
            )
    for key in sorted(to_remove):
        if key in absent:
            notes.append(f"{key}: {node.node_id} has no such label; nothing removed")
        elif key in node.daemon_labels:
            notes.append(
                f"{key}: the operator's value is removed; {key}={node.daemon_labels[key]}"
                " from the daemon's config applies (only the host can change that one)"
            )
    return notes


@app.command("label")
def label_node(
    ctx: typer.Context,
    node: Annotated[str, typer.Argument(help="Node id.")],
    changes: Annotated[
        list[str], typer.Argument(help="key=value to set, key- to remove (kubectl syntax).")
    ],
) -> None:
    """Set or remove operator labels of a node: fleetctl nodes label node-1 canary=true env-

    Operator labels overlay the labels in the daemon's config and survive the
    daemon re-registering; a label only the daemon's config sets cannot be
    removed here (change it on the host). `nodes show -o wide` shows where
    each label comes from.
    """
    cli = Cli.of(ctx)
    to_set, to_remove = cli.checked(lambda: parse_label_changes(changes))

    async def body(stub: Stub, conn: Connection) -> int:
        reply = await stub.UpdateNodeLabels(
            fleet_pb2.FleetServiceUpdateNodeLabelsRequest(
                node_id=node, set=to_set, remove=to_remove
            ),
            timeout=conn.timeout,
        )
        if cli.fmt.structured:
            print_object(cli.out, cli.fmt, node_view(reply.node), [])
        else:
            labels = ",".join(f"{k}={v}" for k, v in sorted(reply.node.labels.items())) or "-"
            cli.out.print(f"node/{reply.node.node_id} labeled: {labels}", markup=False)
        for line in label_notes(reply.node, to_set, to_remove, absent=reply.absent_keys):
            cli.note(f"fleetctl: {line}")
        return EXIT_OK

    cli.call(body)


def _confirm(cli: Cli, question: str, action: str) -> None:
    if not stdin_is_interactive():
        cli.fail(
            f"refusing to {action} without confirmation and there is no terminal to ask on;"
            " pass --yes",
            EXIT_USAGE,
        )
    cli.confirm(question, aborted=f"aborted; nothing was changed ({action})")


@app.command("delete")
def delete_node(
    ctx: typer.Context,
    node: Annotated[str, typer.Argument(help="Node id.")],
    force: Annotated[
        bool, typer.Option("--force", help="Delete even while the node is online.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a node's record, agent states, labels and desired state (refused while online).

    Events, audit and job history stay. The node's certificate keeps working
    until it expires: a daemon still running registers again. To keep a host
    out, `nodes revoke` it too (before or after).
    """
    cli = Cli.of(ctx)

    async def body(stub: Stub, conn: Connection) -> int:
        if not yes:
            shown = await stub.GetNode(
                fleet_pb2.FleetServiceGetNodeRequest(node_id=node), timeout=conn.timeout
            )
            view = node_view(shown.node)
            _confirm(
                cli,
                f"Delete node {node} ({view['status'].lower()}, {view['hostname'] or 'no host'},"
                f" {sum(view['agents'].values())} agents)?",
                f"delete node {node}",
            )
        try:
            reply = await stub.DeleteNode(
                fleet_pb2.FleetServiceDeleteNodeRequest(node_id=node, force=force),
                timeout=conn.timeout,
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and not force:
                # The manager names no flag.
                cli.fail(f"{exc.details()}; --force deletes it anyway", EXIT_FAILED)
            raise
        if cli.fmt.structured:
            print_object(cli.out, cli.fmt, node_view(reply.node), [])
        else:
            cli.out.print(f"node/{node} deleted", markup=False)
        if not reply.node.revoke_time:
            cli.note(
                f"fleetctl: its certificate still works until it expires; 'fleetctl nodes revoke"
                f" {node}' keeps the host out"
            )
        return EXIT_OK

    cli.call(body)


@app.command("revoke")
def revoke_node(
    ctx: typer.Context,
    node: Annotated[str, typer.Argument(help="Node id.")],
    reason: Annotated[str, typer.Option("--reason", help="Why, for the audit log.")] = "",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Refuse a node's certificates from now on and close its connections.

    It stays refused until the host enrolls again with a token made with
    `fleetctl tokens create --node-name NODE`.
    """
    cli = Cli.of(ctx)

    async def body(stub: Stub, conn: Connection) -> int:
        # The manager revokes any valid name, also one without a record (a deleted node's
        # certificate still works): say so, or a typo would go unnoticed.
        try:
            await stub.GetNode(
                fleet_pb2.FleetServiceGetNodeRequest(node_id=node), timeout=conn.timeout
            )
            registered = True
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            registered = False
        if not yes:
            _confirm(
                cli,
                f"Revoke node {node}? Its daemon is cut off until it enrolls again."
                if registered
                else f"Revoke node {node}? No node of that name is registered; a host with a"
                " certificate for it is refused all the same.",
                f"revoke node {node}",
            )
        reply = await stub.RevokeNode(
            fleet_pb2.FleetServiceRevokeNodeRequest(node_id=node, reason=reason),
            timeout=conn.timeout,
        )
        if cli.fmt.structured:
            print_object(
                cli.out,
                cli.fmt,
                {
                    "node_id": node,
                    "revoke_time": format_time(reply.revoke_time),
                    "connections_closed": reply.connections_closed,
                    "registered": registered,
                },
                [],
            )
        else:
            closed = reply.connections_closed
            cli.out.print(
                f"node/{node} revoked: certificates issued before {format_time(reply.revoke_time)}"
                f" are refused ({closed} connection{'s' if closed != 1 else ''} closed)",
                markup=False,
            )
        if not registered:
            cli.note(
                f"fleetctl: no node {node} is registered (see `fleetctl nodes list`); its name"
                " is revoked all the same"
            )
        return EXIT_OK

    cli.call(body)
