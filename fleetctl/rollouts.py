"""fleetctl rollout: status (-w to follow), list, pause, resume, promote, abort, undo.

`rollout status` exits with the rollout's outcome, so scripts and CI can
gate on it: 0 while it is live or once it succeeded, EXIT_ROLLOUT_FAILED,
EXIT_ROLLOUT_REVERTED or EXIT_ROLLOUT_CANCELLED once it ended otherwise
(1 and 2 keep their meaning: the call failed, the command line is wrong).
With -w it follows WatchRollout and exits when the rollout ends.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import grpc
import typer

from fleet.v1 import desired_pb2, fleet_pb2
from fleetctl.apply import print_changes
from fleetctl.client import Connection
from fleetctl.output import Column, OutputFormat, dump, print_rows
from fleetctl.runtime import EXIT_OK, Cli, Failure, Stub, UsageProblem
from fleetctl.timespec import format_age, format_duration
from fleetctl.views import rollout_view

__all__ = [
    "EXIT_ROLLOUT_CANCELLED",
    "EXIT_ROLLOUT_FAILED",
    "EXIT_ROLLOUT_REVERTED",
    "app",
    "exit_code",
    "progress_line",
    "status_lines",
]

EXIT_ROLLOUT_FAILED = 3
EXIT_ROLLOUT_REVERTED = 4
EXIT_ROLLOUT_CANCELLED = 5

_EXIT_BY_STATE = {
    "FAILED": EXIT_ROLLOUT_FAILED,
    "REVERTED": EXIT_ROLLOUT_REVERTED,
    "CANCELLED": EXIT_ROLLOUT_CANCELLED,
}
TERMINAL = frozenset({"SUCCESSFUL", "FAILED", "REVERTED", "CANCELLED"})

app = typer.Typer(
    help="Rollouts: how a definition's new revision reaches its nodes, batch by batch.",
    no_args_is_help=True,
)


def exit_code(state: str) -> int:
    """0 for a live or successful rollout; 3 FAILED, 4 REVERTED, 5 CANCELLED."""
    return _EXIT_BY_STATE.get(state, EXIT_OK)


_STATE_STYLE = {"SUCCESSFUL": "green", "FAILED": "red bold", "REVERTED": "red",
                "REVERTING": "yellow", "CANCELLED": "dim", "PAUSED": "yellow",
                "AWAITING_PROMOTION": "cyan"}  # fmt: skip


def _revisions(view: dict[str, Any]) -> str:
    target, previous = view["target_revision"], view["previous_revision"]
    if view["reverted_from"]:
        return f"revision {view['reverted_from']} -> back to {target}"
    return f"revision {previous} -> {target}" if previous else f"revision {target}"


def _counts(view: dict[str, Any]) -> str:
    total = view["total"]
    parts = [f"{view['done']}/{total} done"]
    if view["updating"]:
        parts.append(f"{view['updating']} updating")
    if view["pending"]:
        offline = f" ({view['offline']} offline)" if view["offline"] else ""
        parts.append(f"{view['pending']} pending{offline}")
    if view["failed"]:
        parts.append(f"{view['failed']} failed")
    return ", ".join(parts)


def progress_line(view: dict[str, Any]) -> str:
    """One line of progress (what -w prints on each change), without a time."""
    batch = view["batch"]
    where = "" if batch < 0 else " canary batch" if batch == 0 else f" batch {batch}"
    reason = f": {view['reason']}" if view["reason"] else ""
    counts = f", {_counts(view)}" if view["total"] else ""
    return f"{view['state']}{where}{counts}{reason}"


def _policy_line(policy: dict[str, Any]) -> str:
    parts = [f"max_parallel {policy['max_parallel'] or '25%'}"]
    if policy["canary"]:
        promote = "auto-promote" if policy["auto_promote"] else "manual promote"
        parts.append(f"canary {policy['canary']} ({promote})")
    for key, label in (
        ("min_healthy_time_seconds", "min_healthy_time"),
        ("healthy_deadline_seconds", "healthy_deadline"),
        ("progress_deadline_seconds", "progress_deadline"),
        ("pause_between_batches_seconds", "pause"),
    ):
        if policy[key] is not None and (policy[key] or key != "pause_between_batches_seconds"):
            parts.append(f"{label} {format_duration(policy[key])}")
    if policy["auto_revert"]:
        parts.append("auto_revert")
    return ", ".join(parts)


def _node_name(node: dict[str, Any]) -> str:
    return str(node["node_id"]) + (" (offline)" if node["offline"] else "")


def status_lines(view: dict[str, Any], *, now_ms: int) -> list[str]:
    """The rollout for people: what, how far per batch, which nodes wait or failed (pure)."""
    lines = [
        f"Rollout {view['id']} of {view['name']}: {_revisions(view)}",
        f"State:    {view['state']}" + (f" ({view['reason']})" if view["reason"] else ""),
        f"Started:  {view['created_at']} ({format_age(view['created_at_ms'], now_ms=now_ms)})"
        f" by {view['actor'] or '-'}" + (f": {view['message']}" if view["message"] else ""),
        f"Policy:   {_policy_line(view['policy'])}",
        f"Progress: {_counts(view)}",
    ]
    if view["ended_at"]:
        lines.insert(3, f"Ended:    {view['ended_at']}")
    batches: dict[int, list[dict[str, Any]]] = {}
    for node in view["nodes"]:
        if node["batch"] >= 0:
            batches.setdefault(node["batch"], []).append(node)
    for number in sorted(batches):
        nodes = batches[number]
        done = sum(1 for n in nodes if n["phase"] == "DONE")
        counts = [f"{done}/{len(nodes)} done"]
        for phase in ("UPDATING", "FAILED"):
            count = sum(1 for n in nodes if n["phase"] == phase)
            if count:
                counts.append(f"{count} {phase.lower()}")
        label = "canary batch" if number == 0 else f"batch {number}"
        current = " (current)" if number == view["batch"] and view["state"] not in TERMINAL else ""
        names = ", ".join(n["node_id"] for n in nodes)
        lines.append(f"  {label}{current}: {', '.join(counts)}: {names}")
    # DONE outside every batch: the node already ran the target revision (e.g. a revert's
    # nodes the failed revision never reached); without this line Progress counts them unseen.
    unchanged = [n for n in view["nodes"] if n["phase"] == "DONE" and n["batch"] < 0]
    if unchanged:
        lines.append(
            f"  unchanged (already at revision {view['target_revision']}): {len(unchanged)}:"
            f" {', '.join(n['node_id'] for n in unchanged)}"
        )
    pending = [n for n in view["nodes"] if n["phase"] == "PENDING"]
    if pending:
        offline = sum(1 for n in pending if n["offline"])
        note = f", {offline} offline (they converge when they return)" if offline else ""
        lines.append(
            f"  pending: {len(pending)}{note}: {', '.join(_node_name(n) for n in pending)}"
        )
    for node in view["nodes"]:
        if node["phase"] == "FAILED":
            lines.append(f"  failed: {node['node_id']}: {node['reason'] or 'no reason given'}")
    if view["state"] == "AWAITING_PROMOTION":
        lines.append(f"Next:     fleetctl rollout promote {view['name']}")
    return lines


_NODE_COLUMNS = [
    Column("NODE", "node_id"),
    Column("BATCH", "batch", cell=lambda b: "-" if b < 0 else "canary" if b == 0 else str(b)),
    Column("PHASE", "phase"),
    Column("OFFLINE", "offline"),
    Column("RUNS", "running_revision", cell=lambda r: str(r) if r else "-"),
    Column("STATUS", "status"),
    Column("HEALTH", "health"),
    Column("REASON", "reason"),
]


def _print_status(cli: Cli, view: dict[str, Any]) -> None:
    if cli.fmt.structured:
        cli.out.out(dump(cli.fmt, view), end="", highlight=False)
        return
    for i, line in enumerate(status_lines(view, now_ms=int(time.time() * 1000))):
        style = _STATE_STYLE.get(view["state"], "") if i == 1 else ""
        cli.out.print(line, markup=False, style=style, soft_wrap=True)
    if cli.fmt is OutputFormat.wide and view["nodes"]:
        print_rows(cli.out, cli.fmt, view["nodes"], _NODE_COLUMNS)


async def _watch(cli: Cli, stub: Stub, name: str, rollout_id: int) -> int:
    """Follow WatchRollout: a line per change, the full status at the end."""
    stream = stub.WatchRollout(
        fleet_pb2.FleetServiceWatchRolloutRequest(name=name, rollout_id=rollout_id), timeout=None
    )
    last: dict[str, Any] | None = None
    shown = ""
    fmt = cli.fmt
    async for item in stream:
        last = rollout_view(item.rollout)
        if fmt is OutputFormat.json:
            cli.out.out(json.dumps(last, ensure_ascii=False), highlight=False)
        elif fmt is OutputFormat.yaml:
            cli.out.out("---\n" + dump(fmt, last), end="", highlight=False)
        else:
            line = progress_line(last)
            if line != shown:
                if not shown:
                    cli.out.print(
                        f"Rollout {last['id']} of {last['name']}: {_revisions(last)}",
                        markup=False,
                    )
                stamp = time.strftime("%H:%M:%S")
                cli.out.print(f"{stamp}  {line}", markup=False, soft_wrap=True,
                              style=_STATE_STYLE.get(last["state"], ""))  # fmt: skip
                shown = line
        cli.out.file.flush()
        if last["state"] in TERMINAL:
            break
    if last is None:
        raise Failure(f"the manager ended the watch of {name}'s rollout without a state")
    if last["state"] not in TERMINAL:
        raise Failure(
            f"the manager ended the watch of rollout {last['id']} while {last['state']};"
            f" run fleetctl rollout status {name} -w again"
        )
    if not fmt.structured:
        cli.out.print("", markup=False)
        _print_status(cli, last)
    return exit_code(last["state"])


@app.command("status")
def status(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The definition.")],
    watch: Annotated[
        bool,
        typer.Option("--watch", "-w", help="Follow it until it ends (exit code: its outcome)."),
    ] = False,
    rollout_id: Annotated[
        int, typer.Option("--id", min=0, help="This rollout (default: the latest).")
    ] = 0,
) -> None:
    """Show a rollout's progress per batch, pending (and offline) nodes, failures.

    Exit code: 0 live or successful, 3 FAILED, 4 REVERTED, 5 CANCELLED.
    """
    cli = Cli.of(ctx)

    async def body(stub: Stub, conn: Connection) -> int:
        if watch:
            return await _watch(cli, stub, name, rollout_id)
        reply = await stub.GetRollout(
            fleet_pb2.FleetServiceGetRolloutRequest(name=name, rollout_id=rollout_id),
            timeout=conn.timeout,
        )
        view = rollout_view(reply.rollout)
        _print_status(cli, view)
        return exit_code(view["state"])

    cli.call(body, on_interrupt=None if watch else "interrupted")


def _list_columns(now_ms: int) -> list[Column]:
    return [
        Column("ID", "id"),
        Column("NAME", "name"),
        Column("REVISION", "revisions", cell=str),
        Column("STATE", "state", style=lambda s: _STATE_STYLE.get(str(s), "")),
        Column("BATCH", "batch", cell=lambda b: "-" if b < 0 else "canary" if b == 0 else str(b)),
        Column("DONE", "done"),
        Column("FAILED", "failed"),
        Column("PENDING", "pending", wide=True),
        Column("STARTED", "created_at_ms", cell=lambda ms: format_age(int(ms), now_ms=now_ms)),
        Column("BY", "actor"),
        Column("REASON", "reason"),
        Column("MESSAGE", "message", wide=True),
    ]


@app.command("list")
def list_rollouts(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Only this definition's.")] = None,
    live: Annotated[
        bool, typer.Option("--live", help="Only rollouts that have not ended.")
    ] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 100,
) -> None:
    """List rollouts, newest first."""
    cli = Cli.of(ctx)

    async def body(stub: Stub, conn: Connection) -> int:
        reply = await stub.ListRollouts(
            fleet_pb2.FleetServiceListRolloutsRequest(name=name or "", live=live, limit=limit),
            timeout=conn.timeout,
        )
        rows = []
        for rollout in reply.rollouts:
            view = rollout_view(rollout)
            view.pop("nodes")  # ListRollouts leaves out the per-node records (not the counts)
            if not cli.fmt.structured:
                view["revisions"] = _revisions(view).removeprefix("revision ")
            rows.append(view)
        empty = "No live rollouts." if live else "No rollouts."
        print_rows(cli.out, cli.fmt, rows, _list_columns(int(time.time() * 1000)), empty=empty,
                   key="rollouts")  # fmt: skip
        return EXIT_OK

    cli.call(body)


Control = Callable[[Stub, str, str, float], Awaitable[desired_pb2.Rollout]]
"""A control RPC: (stub, definition name, deadline in seconds) -> the rollout."""


def _control(verb: str, done: str, call: Control) -> Callable[..., None]:
    def command(
        ctx: typer.Context,
        name: Annotated[str, typer.Argument(help="The definition.")],
        message: Annotated[
            str, typer.Option("--message", help="Why (kept in the reason, event and audit).")
        ] = "",
    ) -> None:
        cli = Cli.of(ctx)

        async def body(stub: Stub, conn: Connection) -> int:
            try:
                rollout = await call(stub, name, message, conn.timeout)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    raise Failure(f"cannot {verb} {name}'s rollout: {exc.details()}") from None
                raise
            view = rollout_view(rollout)
            if cli.fmt.structured:
                view.pop("nodes")
                cli.out.out(dump(cli.fmt, view), end="", highlight=False)
            else:
                cli.out.print(
                    f"rollout {view['id']} of {name} {done}: {progress_line(view)}", markup=False
                )
            return EXIT_OK

        cli.call(body)

    return command


async def _pause(stub: Stub, name: str, why: str, deadline: float) -> desired_pb2.Rollout:
    request = fleet_pb2.FleetServicePauseRolloutRequest(name=name, message=why)
    return (await stub.PauseRollout(request, timeout=deadline)).rollout


async def _resume(stub: Stub, name: str, why: str, deadline: float) -> desired_pb2.Rollout:
    request = fleet_pb2.FleetServiceResumeRolloutRequest(name=name, message=why)
    return (await stub.ResumeRollout(request, timeout=deadline)).rollout


async def _promote(stub: Stub, name: str, why: str, deadline: float) -> desired_pb2.Rollout:
    request = fleet_pb2.FleetServicePromoteRolloutRequest(name=name, message=why)
    return (await stub.PromoteRollout(request, timeout=deadline)).rollout


async def _abort(stub: Stub, name: str, why: str, deadline: float) -> desired_pb2.Rollout:
    request = fleet_pb2.FleetServiceAbortRolloutRequest(name=name, message=why)
    return (await stub.AbortRollout(request, timeout=deadline)).rollout


app.command("pause", help="Hold the live rollout: no new batch starts (nodes moving finish).")(
    _control("pause", "paused", _pause)
)
app.command("resume", help="Let a paused rollout start its next batches again.")(
    _control("resume", "resumed", _resume)
)
app.command("promote", help="Go on past healthy canaries (manual promotion).")(
    _control("promote", "promoted", _promote)
)
app.command("abort", help="Fail the live rollout now (with auto_revert, nodes move back).")(
    _control("abort", "aborted", _abort)
)


@app.command("undo")
def undo(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The definition.")],
    to_revision: Annotated[
        int,
        typer.Option(
            "--to-revision",
            min=0,
            help="Apply this revision's content again (default: the last that succeeded"
            " before the current one).",
        ),
    ] = 0,
    message: Annotated[str, typer.Option("--message", help="Why (stored with the revision).")] = "",
    plan: Annotated[bool, typer.Option("--plan", help="Only say what it would do.")] = False,
) -> None:
    """Roll back: store an earlier revision's content as a new revision and roll it out."""
    cli = Cli.of(ctx)

    async def body(stub: Stub, conn: Connection) -> int:
        request = fleet_pb2.FleetServiceUndoRolloutRequest(
            name=name, to_revision=to_revision, message=message, plan=plan
        )
        try:
            reply = await stub.UndoRollout(request, timeout=conn.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                # The manager names no flag: say which one names the revision.
                flag = "" if to_revision else " (--to-revision N)"
                raise Failure(f"cannot undo {name}: {exc.details()}{flag}") from None
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise UsageProblem(f"cannot undo {name}: {exc.details()}") from None
            raise
        print_changes(cli, [reply.change], plan=plan)
        return EXIT_OK

    cli.call(body)
