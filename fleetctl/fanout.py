"""fleetctl agents operate / start / stop / restart: one agent or a fan-out.

``-l SELECTOR`` runs the manager's OperateAgents fan-out (a sliding window
of --max-concurrency targets, stopping at --max-errors failures) and streams
each target's outcome into a progress bar and a summary table. Before
touching more than one target it resolves them (a plan) and asks for
confirmation, unless --yes; without a terminal to ask on it refuses.

``--node N`` acts on that node only: OperateAgent for one agent id, or, with
--type, every agent of that type on the node (resolved with ListAgents and
run here with the same window and error budget, since OperateAgents selects
nodes by label only).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import grpc
import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from fleet import selectors
from fleet.errors import NotFound, Resource, from_rpc_error
from fleet.v1 import common_pb2, fleet_pb2
from fleetctl.client import Connection, about_a_node, hinted
from fleetctl.nodes import SelectorOpt, parse_selector
from fleetctl.output import Column, print_object, print_rows
from fleetctl.runtime import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Cli,
    Stub,
    stdin_is_interactive,
)
from fleetctl.views import summary_view, target_view

__all__ = ["Action", "operate", "restart", "start", "stop"]

Response = fleet_pb2.FleetServiceOperateAgentsResponse


class Action(enum.StrEnum):
    """What to do with the agents."""

    start = "start"
    stop = "stop"
    restart = "restart"

    @property
    def proto(self) -> common_pb2.AgentOperation.ValueType:
        """The AgentOperation value."""
        return {
            Action.start: common_pb2.AGENT_OPERATION_START,
            Action.stop: common_pb2.AGENT_OPERATION_STOP,
            Action.restart: common_pb2.AGENT_OPERATION_RESTART,
        }[self]


AgentArg = Annotated[
    str, typer.Argument(metavar="AGENT", help="Agent id (or agent type with --type).")
]
NodeOpt = Annotated[str | None, typer.Option("--node", "-n", help="Only this node.")]
TypeOpt = Annotated[
    bool, typer.Option("--type", help="AGENT names an agent type: every agent of that type.")
]
ConcurrencyOpt = Annotated[
    int, typer.Option("--max-concurrency", min=1, help="Targets in flight at once.")
]
ErrorsOpt = Annotated[
    int,
    typer.Option(
        "--max-errors", min=0, help="Stop launching new targets after N failures (0: no limit)."
    ),
]
PlanOpt = Annotated[bool, typer.Option("--plan", help="Only list the targets; touch nothing.")]
YesOpt = Annotated[
    bool, typer.Option("--yes", "-y", help="Do not ask before acting on several targets.")
]


def operate(
    ctx: typer.Context,
    action: Annotated[Action, typer.Argument(help="start, stop or restart.")],
    agent: AgentArg,
    node: NodeOpt = None,
    selector: SelectorOpt = None,
    by_type: TypeOpt = False,
    max_concurrency: ConcurrencyOpt = 10,
    max_errors: ErrorsOpt = 0,
    plan: PlanOpt = False,
    yes: YesOpt = False,
) -> None:
    """Start, stop or restart an agent on one node (--node) or across nodes (-l)."""
    _run(ctx, action, agent, node, selector, by_type, max_concurrency, max_errors, plan, yes)


def _short_form(action: Action) -> Any:
    """`agents <action> AGENT ...`: `agents operate <action>` with the action fixed."""

    def command(
        ctx: typer.Context,
        agent: AgentArg,
        node: NodeOpt = None,
        selector: SelectorOpt = None,
        by_type: TypeOpt = False,
        max_concurrency: ConcurrencyOpt = 10,
        max_errors: ErrorsOpt = 0,
        plan: PlanOpt = False,
        yes: YesOpt = False,
    ) -> None:
        _run(ctx, action, agent, node, selector, by_type, max_concurrency, max_errors, plan, yes)

    command.__name__ = action.value
    command.__doc__ = f"Short for: agents operate {action.value} AGENT ..."
    return command


start = _short_form(Action.start)
stop = _short_form(Action.stop)
restart = _short_form(Action.restart)


def _run(
    ctx: typer.Context,
    action: Action,
    agent: str,
    node: str | None,
    selector: str | None,
    by_type: bool,
    max_concurrency: int,
    max_errors: int,
    plan: bool,
    yes: bool,
) -> None:
    cli = Cli.of(ctx)
    if (node is None) == (selector is None):
        # `agents show` and `logs` take NODE/AGENT; an agent id never holds a '/'.
        on, slash, named = agent.partition("/")
        hint = (
            f"; for {agent}: fleetctl agents {action.name} {named} --node {on}"
            if slash and node is None and selector is None and on and named
            else ""
        )
        cli.fail(
            "say where: --node NODE for one node, or -l SELECTOR for the nodes it matches"
            f" (exactly one of them){hint}",
            EXIT_USAGE,
        )
    sel = cli.checked(lambda: parse_selector(selector))
    request = fleet_pb2.FleetServiceOperateAgentsRequest(
        selector=selectors.to_proto(sel),
        agent_id="" if by_type else agent,
        agent_type=agent if by_type else "",
        operation=action.proto,
        max_concurrency=max_concurrency,
        max_errors=max_errors,
        batch_results=True,
    )
    what = f"{action} {'agents of type' if by_type else 'agent'} {agent}"

    async def body(stub: Stub, conn: Connection) -> int:
        def launch(plan_only: bool) -> AsyncIterator[Response]:
            if node is not None:
                return _on_node(stub, conn, node, request, plan_only=plan_only)
            req = fleet_pb2.FleetServiceOperateAgentsRequest()
            req.CopyFrom(request)
            req.plan = plan_only
            # A plan only resolves targets: bounded by --timeout. The real run is not:
            # the manager applies its per-target deadlines.
            return _aiter(stub.OperateAgents(req, timeout=conn.timeout if plan_only else None))

        planned = [r async for msg in launch(True) for r in _results(msg)]
        if plan:
            return _print_plan(cli, planned)
        where = f"node {node}" if node is not None else f"nodes matching {str(sel)!r}"
        if not planned:
            one = node is not None and not by_type
            raise NotFound(
                f"nothing to {action}: no {what.split(' ', 1)[1]} on {where}",
                resource=Resource("agent", agent, node=node or "") if one else None,
            )
        if len(planned) > 1 and not yes:
            _confirm(cli, what, planned)
        return await _execute(cli, launch(False), len(planned), what)

    cli.call(
        body,
        on_interrupt=(
            "interrupted; targets already started may have completed"
            " (check with fleetctl agents list)"
        ),
    )


async def _aiter(call: Any) -> AsyncIterator[Response]:
    async for item in call:
        yield item


def _results(msg: Response) -> list[fleet_pb2.TargetResult]:
    """The target results a message carries: one (`result`) or a batch (`results`)."""
    if msg.WhichOneof("item") == "result":
        return [msg.result]
    return list(msg.results)


def _confirm(cli: Cli, what: str, planned: list[fleet_pb2.TargetResult]) -> None:
    names = ", ".join(f"{t.node_id}/{t.agent_id}" for t in planned[:5])
    more = f" and {len(planned) - 5} more" if len(planned) > 5 else ""
    if not stdin_is_interactive():
        cli.fail(
            f"refusing to {what} on {len(planned)} targets without confirmation and there is"
            " no terminal to ask on; pass --yes (see them first with --plan)",
            EXIT_USAGE,
        )
    cli.note(f"{what} on {len(planned)} targets: {names}{more}")
    cli.confirm("Proceed?", aborted="aborted; nothing was changed")


def _print_plan(cli: Cli, planned: list[fleet_pb2.TargetResult]) -> int:
    rows = [target_view(t) for t in planned]
    if cli.fmt.structured:
        print_object(cli.out, cli.fmt, {"targets": rows}, [])
        return EXIT_OK
    columns = [Column("NODE", "node_id"), Column("AGENT", "agent_id")]
    if any(r["status"] for r in rows):  # the manager may resolve targets without their state
        columns += [Column("STATUS", "status"), Column("PID", "pid")]
    print_rows(cli.out, cli.fmt, rows, columns, empty="No targets match.")
    cli.note(f"{len(rows)} target(s); nothing was changed (--plan).")
    return EXIT_OK


_OUTCOME_STYLE = {"OK": "green", "FAILED": "red", "SKIPPED": "yellow", "PLANNED": "cyan"}


async def _execute(cli: Cli, stream: AsyncIterator[Response], total: int, what: str) -> int:
    results: list[dict[str, Any]] = []
    summary: dict[str, Any] | None = None
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[green]{task.fields[ok]} ok[/] [red]{task.fields[failed]} failed[/]"),
        TimeElapsedColumn(),
        console=cli.err,
        transient=True,
        disable=not cli.err.is_terminal,
    )
    broken: grpc.RpcError | None = None
    with progress:
        task = progress.add_task(what, total=total, ok=0, failed=0)
        try:
            async for item in stream:
                if item.WhichOneof("item") == "summary":
                    summary = summary_view(item.summary)
                    continue
                for result in _results(item):
                    row = target_view(result)
                    results.append(row)
                    if row["outcome"] == "FAILED":
                        msg = f"✗ {row['node_id']}/{row['agent_id']}: {row['message']}"
                        cli.note(msg, style="red")
                progress.update(
                    task,
                    completed=len(results),
                    total=max(total, len(results)),
                    ok=sum(r["outcome"] == "OK" for r in results),
                    failed=sum(r["outcome"] == "FAILED" for r in results),
                )
        except grpc.RpcError as exc:
            if not results:
                raise
            broken = exc  # show what did happen before saying why the rest is unknown
    if summary is None:
        summary = _summarise(results, "")
    results.sort(key=lambda r: (r["node_id"], r["agent_id"]))
    _print_outcome(cli, results, summary, what)
    if broken is not None:
        cli.warn(
            f"the stream of results broke after {len(results)} of {total} targets;"
            " the others' outcome is unknown (check with fleetctl agents list)"
        )
        raise broken
    return EXIT_FAILED if summary["failed"] or summary["skipped"] else EXIT_OK


def _summarise(results: list[dict[str, Any]], operation_id: str) -> dict[str, Any]:
    count = {o: sum(r["outcome"] == o for r in results) for o in _OUTCOME_STYLE}
    return {
        "operation_id": operation_id,
        "total": len(results),
        "ok": count["OK"],
        "failed": count["FAILED"],
        "skipped": count["SKIPPED"],
        "planned": count["PLANNED"],
        "duration_ms": sum(r["duration_ms"] for r in results),
    }


def _print_outcome(
    cli: Cli, results: list[dict[str, Any]], summary: dict[str, Any], what: str
) -> None:
    if cli.fmt.structured:
        print_object(cli.out, cli.fmt, {"targets": results, "summary": summary}, [])
        return
    print_rows(
        cli.out,
        cli.fmt,
        results,
        [
            Column("NODE", "node_id"),
            Column("AGENT", "agent_id"),
            Column("OUTCOME", "outcome", style=lambda v: _OUTCOME_STYLE.get(str(v), "")),
            Column("STATUS", "status"),
            Column("PID", "pid"),
            Column("TIME", "duration_ms", cell=lambda ms: f"{int(ms) / 1000:.2f}s"),
            Column("MESSAGE", "message"),
        ],
    )
    op = f" (operation {summary['operation_id']})" if summary["operation_id"] else ""
    line = (
        f"{what}: {summary['ok']} ok, {summary['failed']} failed, {summary['skipped']} skipped"
        f" of {summary['total']} in {summary['duration_ms'] / 1000:.2f}s{op}"
    )
    style = "red" if summary["failed"] or summary["skipped"] else "green"
    cli.out.print(line, markup=False, style=style)


async def _on_node(
    stub: Stub,
    conn: Connection,
    node: str,
    request: fleet_pb2.FleetServiceOperateAgentsRequest,
    *,
    plan_only: bool,
) -> AsyncIterator[Response]:
    """OperateAgents' stream for one node, run here (the RPC selects by label only)."""
    if request.agent_type:
        reply = await stub.ListAgents(
            fleet_pb2.FleetServiceListAgentsRequest(node_id=node), timeout=conn.timeout
        )
        targets = [a.agent for a in reply.agents if a.agent.type == request.agent_type]
    else:
        # One agent id: OperateAgent itself says NOT_FOUND, so the plan needs no lookup
        # unless it is only a plan.
        targets = [common_pb2.AgentInfo(id=request.agent_id)]
        if plan_only:
            reply = await stub.ListAgents(
                fleet_pb2.FleetServiceListAgentsRequest(node_id=node), timeout=conn.timeout
            )
            targets = [a.agent for a in reply.agents if a.agent.id == request.agent_id]
    if plan_only:
        for t in targets:
            yield Response(
                result=fleet_pb2.TargetResult(
                    node_id=node,
                    agent_id=t.id,
                    outcome=fleet_pb2.TARGET_OUTCOME_PLANNED,
                    agent=t,
                )
            )
        return
    async for item in _window(stub, conn, node, targets, request):
        yield item


async def _window(
    stub: Stub,
    conn: Connection,
    node: str,
    targets: list[common_pb2.AgentInfo],
    request: fleet_pb2.FleetServiceOperateAgentsRequest,
) -> AsyncIterator[Response]:
    """A sliding window of OperateAgent calls that stops launching at max_errors."""
    limit = max(1, request.max_concurrency)
    started = time.monotonic()
    queue: asyncio.Queue[fleet_pb2.TargetResult] = asyncio.Queue()
    pending = list(targets)
    tasks: set[asyncio.Task[None]] = set()

    async def one(agent_id: str) -> None:
        t0 = time.monotonic()
        result = fleet_pb2.TargetResult(node_id=node, agent_id=agent_id)
        try:
            reply = await stub.OperateAgent(
                fleet_pb2.FleetServiceOperateAgentRequest(
                    node_id=node, agent_id=agent_id, operation=request.operation
                ),
                timeout=conn.timeout,
            )
        except grpc.RpcError as exc:
            result.outcome = fleet_pb2.TARGET_OUTCOME_FAILED
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not about_a_node(exc):
                # Our own deadline ("Stream removed (Deadline Exceeded)"), not the
                # manager's words about the node.
                result.message = (
                    f"{node}: the manager at {conn.address} did not answer within"
                    f" {conn.timeout:g} s; the operation may still happen (raise --timeout)"
                )
            else:
                result.message = hinted(from_rpc_error(exc))
        else:
            result.outcome = fleet_pb2.TARGET_OUTCOME_OK
            result.agent.CopyFrom(reply.agent.agent)
        result.duration_ms = int((time.monotonic() - t0) * 1000)
        await queue.put(result)

    results: list[fleet_pb2.TargetResult] = []
    launched = failed = 0
    try:
        while True:
            budget_left = request.max_errors == 0 or failed < request.max_errors
            while pending and budget_left and launched - len(results) < limit:
                tasks.add(asyncio.create_task(one(pending.pop(0).id)))
                launched += 1
            if launched == len(results):
                break
            result = await queue.get()
            if result.outcome == fleet_pb2.TARGET_OUTCOME_FAILED:
                failed += 1
            results.append(result)
            yield Response(result=result)
    finally:
        for task in tasks:
            task.cancel()
    for t in pending:
        skipped = fleet_pb2.TargetResult(
            node_id=node,
            agent_id=t.id,
            outcome=fleet_pb2.TARGET_OUTCOME_SKIPPED,
            message=f"not attempted: max_errors ({request.max_errors}) reached",
        )
        results.append(skipped)
        yield Response(result=skipped)
    outcomes = [r.outcome for r in results]
    yield Response(
        summary=fleet_pb2.OperationSummary(
            total=len(results),
            ok=outcomes.count(fleet_pb2.TARGET_OUTCOME_OK),
            failed=outcomes.count(fleet_pb2.TARGET_OUTCOME_FAILED),
            skipped=outcomes.count(fleet_pb2.TARGET_OUTCOME_SKIPPED),
            duration_ms=int((time.monotonic() - started) * 1000),
        )
    )
