"""fleetctl run, and fleetctl jobs: list, show, logs, cancel, rerun.

`run` starts a job (RunJob) on the nodes -l or --node picks, then follows
it (`jobfollow.follow`): output prefixed by node as it arrives, a progress
line on a terminal, a summary table at the end; the exit code is the job's
outcome (`joboutput.exit_code`: 0 only if every target succeeded).
Before a job that may reach more than one node it asks, as `agents restart
-l` does: it resolves the targets (RunJob with plan), shows them and waits
for "y" on a terminal; with no terminal to ask on it refuses unless --yes.
`--plan` stops after showing them; `--detach` prints the job's id instead
of following.

Everything after the options is the command (like ssh and env): `fleetctl
run -l role=web grep -c x /var/log/syslog` sends ``-c`` to grep, and `--`
makes that explicit. `run --timeout` is the job's timeout per target (the
global --timeout, seconds per call, goes before `run`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer

from fleet import selectors
from fleet.errors import from_rpc_error
from fleet.v1 import fleet_pb2, jobs_pb2
from fleetctl.client import Connection, hinted
from fleetctl.jobfile import JobFlags, JobSpecError, build_spec, load_job
from fleetctl.jobfollow import OutputPrinter, follow, pending_note, unreached_notes
from fleetctl.joboutput import (
    STATE_STYLE,
    TERMINAL_JOB,
    TERMINAL_TARGET,
    counts_text,
    exit_code,
    header_lines,
    spec_lines,
    summary_line,
    target_counts,
)
from fleetctl.output import Column, dump, print_rows
from fleetctl.runtime import (
    EXIT_OK,
    EXIT_USAGE,
    Cli,
    Failure,
    Stub,
    UsageProblem,
    stdin_is_interactive,
)
from fleetctl.timespec import format_age, format_duration, parse_instant
from fleetctl.views import job_view

__all__ = ["RUN_VALUE_OPTIONS", "app", "run"]

RUN_VALUE_OPTIONS = frozenset(
    {
        "-f",
        "--file",
        "-l",
        "--selector",
        "-n",
        "--node",
        "--max-concurrency",
        "--max-errors",
        "--canary",
        "--timeout",
        "--delivery-timeout",
        "--lock",
        "--user",
        "-e",
        "--env",
        "--cwd",
        "--name",
    }
)
"""`run`'s options that take a value: the root command must not take them for its own
(--timeout), and the first word after them starts the job's command."""

app = typer.Typer(
    help="Jobs: commands run once on the nodes a selector picks (start one with fleetctl run).",
    no_args_is_help=True,
)

_STATES = ("pending", "running", "success", "failed", "partial", "cancelled")
_STARTED = frozenset({jobs_pb2.JOB_TARGET_STATE_QUEUED, jobs_pb2.JOB_TARGET_STATE_RUNNING})


def _style(value: Any) -> str:
    return STATE_STYLE.get(str(value), "")


def _exit_cell(target: dict[str, Any]) -> str:
    if not target["started_at_ms"] or target["state"] not in TERMINAL_TARGET:
        return "-"
    code = int(target["exit_code"])
    return f"signal {-code}" if code < 0 else str(code)


def _duration_cell(seconds: Any) -> str:
    if seconds is None:
        return "-"
    return format_duration(seconds) if seconds >= 60 else f"{float(seconds):.1f}s"


def _output_cell(target: dict[str, Any]) -> str:
    stored, total = target["output_stored_bytes"], target["output_bytes"]
    return f"{stored}/{total} (cut)" if target["output_truncated"] else str(total)


def _target_columns(canary: int) -> list[Column]:
    return [
        Column("NODE", "node_id"),
        Column("STATE", "state", style=_style),
        Column("EXIT", "exit", cell=str),
        Column("DURATION", "duration_seconds", cell=_duration_cell),
        Column("STAGE", "stage", wide=True, cell=lambda s: "canary" if canary and s == 0 else "-"),
        Column("STARTED", "started_at", wide=True),
        Column("OUTPUT", "output", wide=True, cell=str),
        Column("REASON", "reason"),
    ]


_STEP_COLUMNS = [
    Column("NODE", "node_id"),
    Column("STEP", "step", cell=str),
    Column("STATE", "state", style=_style),
    Column("EXIT", "exit", cell=str),
    Column("DURATION", "duration_seconds", cell=_duration_cell),
    Column("REASON", "reason"),
]


def _target_rows(view: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**t, "exit": _exit_cell(t), "output": _output_cell(t)} for t in view["targets"]]


def _step_rows(view: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            **s,
            "node_id": t["node_id"],
            "step": f"{s['index'] + 1}. {s['name']}",
            "exit": _exit_cell(s),
        }
        for t in view["targets"]
        for s in t["steps"]
    ]


def print_targets(cli: Cli, view: dict[str, Any], *, steps: bool) -> None:
    """The per-target table (and, with `steps`, a table of every target's steps)."""
    print_rows(
        cli.out,
        cli.fmt,
        _target_rows(view),
        _target_columns(view["spec"]["canary"]),
        empty="No targets.",
    )
    if steps and any(t["steps"] for t in view["targets"]):
        cli.out.print("", markup=False)
        print_rows(cli.out, cli.fmt, _step_rows(view), _STEP_COLUMNS)
    cut = [t["node_id"] for t in view["targets"] if t["output_truncated"]]
    if cut:
        node = cut[0] if len(cut) == 1 else "NODE"
        cli.note(
            f"fleetctl: the manager cut the output of {', '.join(cut)} at its bound;"
            f" the full output: fleetctl jobs logs {view['id']} {node} --from-node"
        )


def _print_structured(cli: Cli, view: dict[str, Any]) -> None:
    cli.out.out(dump(cli.fmt, view), end="", highlight=False)


def _print_summary(cli: Cli, view: dict[str, Any]) -> None:
    if cli.fmt.structured:
        _print_structured(cli, view)
        return
    cli.out.print("", markup=False)
    print_targets(cli, view, steps=False)
    code = exit_code(view)
    cli.out.print(summary_line(view), markup=False, style="green" if code == EXIT_OK else "red")


async def _get(stub: Stub, conn: Connection, job_id: str) -> jobs_pb2.Job:
    reply = await stub.GetJob(
        fleet_pb2.FleetServiceGetJobRequest(job_id=job_id), timeout=conn.timeout
    )
    return reply.job


async def follow_to_end(
    cli: Cli, stub: Stub, conn: Connection, job: jobs_pb2.Job, *, detach: bool, group: bool
) -> int:
    """After RunJob or RerunJob: print the id (detach), or follow, summarise, exit."""
    view = job_view(job)
    count = len(view["targets"])
    if detach:
        if cli.fmt.structured:
            _print_structured(cli, view)
        else:
            cli.out.print(job.id, markup=False)
        cli.note(
            f"fleetctl: job {job.id} started on {count} target(s); follow it:"
            f" fleetctl jobs logs {job.id} -f"
        )
        return EXIT_OK
    cli.note(
        f"job {job.id} started on {count} target(s)"
        + (f" (rerun of {job.rerun_of})" if job.rerun_of else "")
    )
    left, _ = await follow(cli, stub, job, group=group, show_output=not cli.fmt.structured)
    if left is not None:
        return left
    final = job_view(await _get(stub, conn, job.id))
    _print_summary(cli, final)
    return exit_code(final)


def _print_plan(cli: Cli, view: dict[str, Any]) -> int:
    if cli.fmt.structured:
        _print_structured(cli, view)
        return EXIT_OK
    for line in spec_lines(view):
        cli.out.print(line, markup=False, soft_wrap=True)
    cli.out.print("", markup=False)
    rows = _target_rows(view)
    columns = [Column("NODE", "node_id")]
    if view["spec"]["canary"]:
        columns.append(Column("STAGE", "stage", cell=lambda s: "canary" if s == 0 else "-"))
    if any(r["reason"] for r in rows):
        columns.append(Column("NOTE", "reason"))
    print_rows(cli.out, cli.fmt, rows, columns, empty="No targets match.")
    cli.note(f"{len(rows)} target(s); nothing was run (--plan).")
    return EXIT_OK


def _confirm(cli: Cli, view: dict[str, Any]) -> None:
    targets = [t["node_id"] for t in view["targets"]]
    names = ", ".join(targets[:5]) + (f" and {len(targets) - 5} more" if len(targets) > 5 else "")
    what = "; ".join(line.split(":", 1)[1].strip() for line in spec_lines(view)[2:] if ":" in line)
    if not stdin_is_interactive():
        cli.fail(
            f"refusing to run a job on {len(targets)} nodes without confirmation and there is"
            " no terminal to ask on; pass --yes (see them first with --plan)",
            EXIT_USAGE,
        )
    cli.note(f"run {what or 'the job'} on {len(targets)} nodes: {names}")
    cli.confirm("Proceed?", aborted="aborted; nothing was run")


async def _start_asking(
    cli: Cli, start: Callable[[bool], Awaitable[jobs_pb2.Job]], *, ask: bool
) -> jobs_pb2.Job:
    """`start(False)`; with `ask`, first `start(True)` (the plan) and, on more than one
    target, the confirmation (`run` and `jobs rerun`)."""
    if ask:
        planned = job_view(await start(True))
        if len(planned["targets"]) > 1:
            _confirm(cli, planned)
    return await start(False)


def _job_call_error(
    exc: grpc.RpcError, what: str, spec: jobs_pb2.JobSpec | None = None
) -> Exception:
    """FAILED_PRECONDITION and INVALID_ARGUMENT as one line saying what could not be done;
    a selector that matched no node gets the command that shows what it matches."""
    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
        details = exc.details() or ""
        if spec is not None and spec.HasField("selector") and details.startswith("spec.selector:"):
            shown = shlex.quote(str(selectors.from_proto(spec.selector)))
            return Failure(f"cannot {what}: {details} (see `fleetctl nodes list -l {shown}`)")
        return Failure(f"cannot {what}: {details}")
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return UsageProblem(f"cannot {what}: {hinted(from_rpc_error(exc))}")
    return exc


def _read_file(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageProblem(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        # Python's own text names the path a second time, with its errno.
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UsageProblem(f"{path}: cannot read the job file: {why or exc}") from None


def _spec(file: str | None, flags: JobFlags) -> jobs_pb2.JobSpec:
    try:
        return build_spec(flags, load_job(file, _read_file(file)) if file else None)
    except JobSpecError as exc:
        raise UsageProblem(str(exc)) from None


def run(
    ctx: typer.Context,
    command: Annotated[
        list[str] | None,
        typer.Argument(metavar="CMD", help="The program and its arguments (after -- to be sure)."),
    ] = None,
    file: Annotated[
        str | None,
        typer.Option("--file", "-f", help="A job file (TOML or YAML; - for stdin): steps and all."),
    ] = None,
    selector: Annotated[
        str | None, typer.Option("-l", "--selector", help="The nodes whose labels match.")
    ] = None,
    nodes: Annotated[
        list[str] | None, typer.Option("--node", "-n", help="This node (repeatable).")
    ] = None,
    max_concurrency: Annotated[
        str | None,
        typer.Option("--max-concurrency", help="Targets running at once: N or P% (default all)."),
    ] = None,
    max_errors: Annotated[
        int | None,
        typer.Option("--max-errors", help="Launch no more targets after N failed (0: no limit)."),
    ] = None,
    canary: Annotated[
        int | None,
        typer.Option("--canary", help="Run on N nodes first; the rest only if they all succeed."),
    ] = None,
    timeout: Annotated[
        str | None,
        typer.Option("--timeout", help="Stop a target's processes after this long (e.g. 10m)."),
    ] = None,
    delivery_timeout: Annotated[
        str | None,
        typer.Option(
            "--delivery-timeout", help="A node unreachable this long is UNDELIVERABLE (5m)."
        ),
    ] = None,
    lock: Annotated[
        str | None,
        typer.Option("--lock", help="Exclusive per node: jobs with the same lock never overlap."),
    ] = None,
    user: Annotated[str | None, typer.Option("--user", help="Run as this user.")] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="NAME=VALUE (repeatable).")
    ] = None,
    cwd: Annotated[str | None, typer.Option("--cwd", help="Working directory on the node.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="A name for people.")] = None,
    plan: Annotated[
        bool, typer.Option("--plan", help="List the targets and steps; run nothing.")
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask before running on several nodes.")
    ] = False,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Start it, print its id, do not follow.")
    ] = False,
    group: Annotated[
        bool, typer.Option("--group", help="Print each target's output together when it ends.")
    ] = False,
) -> None:
    """Run a command (or a job file's steps) on the nodes -l or --node picks.

    fleetctl run -l role=web --max-concurrency 25% --max-errors 2 -- systemctl restart nginx

    Flags override the job file's values. Exit code: 0 every target
    succeeded, 3 none did, 4 some did, 5 cancelled, 130 left running (Ctrl-C).
    """
    cli = Cli.of(ctx)
    flags = JobFlags(
        command=tuple(command or ()),
        selector=selector,
        nodes=tuple(nodes or ()),
        max_concurrency=max_concurrency,
        max_errors=max_errors,
        canary=canary,
        timeout=timeout,
        delivery_timeout=delivery_timeout,
        lock=lock,
        user=user,
        env=tuple(env or ()),
        cwd=cwd,
        name=name,
    )
    spec = cli.checked(lambda: _spec(file, flags))

    async def body(stub: Stub, conn: Connection) -> int:
        async def start(plan_only: bool) -> jobs_pb2.Job:
            request = fleet_pb2.FleetServiceRunJobRequest(spec=spec, plan=plan_only)
            try:
                reply = await stub.RunJob(request, timeout=conn.timeout)
            except grpc.RpcError as exc:
                raise _job_call_error(exc, "run the job", spec) from None
            return reply.job

        if plan:
            return _print_plan(cli, job_view(await start(True)))
        one_node = len(spec.node_ids) == 1 and not spec.HasField("selector")
        job = await _start_asking(cli, start, ask=not yes and not one_node)
        return await follow_to_end(cli, stub, conn, job, detach=detach, group=group)

    cli.call(body, on_interrupt="interrupted")


JobArg = Annotated[str, typer.Argument(metavar="JOB", help="The job's id.")]


def _list_columns(now_ms: int) -> list[Column]:
    return [
        Column("ID", "id"),
        Column("NAME", "name"),
        Column("STATE", "state", style=_style),
        Column("TARGETS", "counts", cell=lambda c: counts_text(c) if c else "-"),
        Column("CREATED", "created_at_ms", cell=lambda ms: format_age(int(ms), now_ms=now_ms)),
        Column("DURATION", "duration_seconds", cell=_duration_cell),
        Column("BY", "actor"),
        Column("RERUN OF", "rerun_of", wide=True),
        Column("REASON", "reason"),
    ]


@app.command("list")
def list_jobs(
    ctx: typer.Context,
    state: Annotated[
        list[str] | None,
        typer.Option("--state", help=f"Only jobs in this state (repeatable): {'/'.join(_STATES)}."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Only jobs created since: a duration (1d) or RFC 3339 time."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 100,
) -> None:
    """List jobs, newest first."""
    cli = Cli.of(ctx)

    def request() -> fleet_pb2.FleetServiceListJobsRequest:
        states = []
        for s in state or ():
            if s.lower() not in _STATES:
                raise UsageProblem(f"--state {s!r}: expected one of {', '.join(_STATES)}")
            states.append(jobs_pb2.JobState.Value(f"JOB_STATE_{s.upper()}"))
        since_ms = 0
        if since is not None:
            try:
                when = parse_instant(since, now=dt.datetime.now(dt.UTC))
            except ValueError as exc:
                raise UsageProblem(f"--since: {exc}") from None
            since_ms = int(when.timestamp() * 1000)
        return fleet_pb2.FleetServiceListJobsRequest(states=states, since=since_ms, limit=limit)

    req = cli.checked(request)

    async def body(stub: Stub, conn: Connection) -> int:
        reply = await stub.ListJobs(req, timeout=conn.timeout)
        rows = []
        for job in reply.jobs:
            view = job_view(job)
            view.pop("targets")  # ListJobs leaves them out (not the counts)
            rows.append(view)
        print_rows(
            cli.out,
            cli.fmt,
            rows,
            _list_columns(int(time.time() * 1000)),
            empty="No jobs.",
            key="jobs",
        )
        return EXIT_OK

    cli.call(body)


@app.command("show")
def show(ctx: typer.Context, job_id: JobArg) -> None:
    """Show a job: what, who, when, and a row per target (and per step).

    Exit code: the job's outcome (0 succeeded or still running, 3 failed,
    4 partial, 5 cancelled).
    """
    cli = Cli.of(ctx)

    async def body(stub: Stub, conn: Connection) -> int:
        job = await _get(stub, conn, job_id)
        view = job_view(job)
        if cli.fmt.structured:
            _print_structured(cli, view)
            return exit_code(view)
        for i, line in enumerate(header_lines(view, now_ms=int(time.time() * 1000))):
            cli.out.print(
                line, markup=False, soft_wrap=True, style=_style(view["state"]) if i == 1 else ""
            )
        cli.out.print("", markup=False)
        print_targets(cli, view, steps=len(view["spec"]["steps"]) > 1)
        pending = [t.node_id for t in job.targets if t.state == jobs_pb2.JOB_TARGET_STATE_PENDING]
        if pending and not job.ended_at:
            # A PENDING target says nothing of why; the usual why is an offline node.
            note = await pending_note(stub, job, pending, deadline=conn.timeout)
            if note:
                cli.note(f"fleetctl: {note}")
        return exit_code(view)

    cli.call(body)


@app.command("logs")
def logs(
    ctx: typer.Context,
    job_id: JobArg,
    node: Annotated[
        str | None, typer.Argument(help="Only this node's output, as it was written.")
    ] = None,
    follow_: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the targets finish.")
    ] = False,
    from_node: Annotated[
        bool,
        typer.Option("--from-node", help="Read the full output from the node (NODE required)."),
    ] = False,
    group: Annotated[
        bool, typer.Option("--group", help="Each target's lines together, when its output ends.")
    ] = False,
) -> None:
    """Print a job's output: every target's prefixed by node, or one node's as written.

    The manager stores each target's output up to a bound; where it cut one, a
    marker line says so, and --from-node reads the rest from the node itself.
    """
    cli = Cli.of(ctx)
    if from_node and node is None:
        cli.fail("--from-node reads one node's output: give the NODE", EXIT_USAGE)

    async def body(stub: Stub, conn: Connection) -> int:
        job = await _get(stub, conn, job_id)
        if node is not None and node not in {t.node_id for t in job.targets}:
            raise Failure(
                f"job {job_id} has no target {node!r}; its targets:"
                f" {', '.join(t.node_id for t in job.targets) or 'none'}"
            )
        printer = OutputPrinter(
            cli, job_id, [t.node_id for t in job.targets], group=group, raw=node is not None
        )
        request = fleet_pb2.FleetServiceReadJobOutputRequest(
            job_id=job_id, node_id=node or "", follow=follow_, from_node=from_node
        )

        async def started() -> list[str] | None:
            try:
                now = await _get(stub, conn, job_id)
            except grpc.RpcError:
                return []  # asked again next round; the output stream says if it is over
            if now.ended_at:
                return None
            return [
                t.node_id for t in now.targets if t.state in _STARTED and node in (None, t.node_id)
            ]

        # A node cut off mid-job would just go quiet: say why (stderr) while following.
        reaching = (
            asyncio.create_task(
                unreached_notes(
                    stub,
                    job,
                    started,
                    lambda n: cli.note(f"fleetctl: {n}"),
                    heard=printer.heard,
                    deadline=conn.timeout,
                )
            )
            if follow_ and not job.ended_at
            else None
        )
        try:
            async for msg in stub.ReadJobOutput(request, timeout=None if follow_ else conn.timeout):
                printer.on_message(msg)
        finally:
            if reaching is not None:
                reaching.cancel()
                await asyncio.gather(reaching, return_exceptions=True)
            printer.finish()
        return EXIT_OK

    cli.call(body, on_interrupt=None if follow_ else "interrupted")


@app.command("cancel")
def cancel(
    ctx: typer.Context,
    job_id: JobArg,
    nodes: Annotated[
        list[str] | None, typer.Option("--node", "-n", help="Only this target (repeatable).")
    ] = None,
) -> None:
    """Cancel a job (or some of its targets): stop what runs, launch nothing more."""
    cli = Cli.of(ctx)

    async def body(stub: Stub, conn: Connection) -> int:
        # Said apart from a cancellation: the manager answers an ended job's cancel with it.
        before = job_view(await _get(stub, conn, job_id))
        states = {t["node_id"]: t["state"] for t in before["targets"]}
        unknown = sorted(set(nodes or ()) - states.keys())
        if unknown:
            raise Failure(
                f"job {job_id} has no target {unknown[0]!r}; its targets:"
                f" {', '.join(sorted(states)) or 'none'}"
            )
        ended = (
            all(states[n] in TERMINAL_TARGET for n in nodes)
            if nodes
            else before["state"] in TERMINAL_JOB
        )
        view = before
        if not ended:
            request = fleet_pb2.FleetServiceCancelJobRequest(job_id=job_id, node_ids=nodes or [])
            try:
                reply = await stub.CancelJob(request, timeout=conn.timeout)
            except grpc.RpcError as exc:
                raise _job_call_error(exc, f"cancel job {job_id}") from None
            view = job_view(reply.job)
        if cli.fmt.structured:
            _print_structured(cli, view)
            return EXIT_OK
        which = f"targets {', '.join(nodes)} of job" if nodes else "job"
        counts = counts_text(view["counts"] or target_counts(view["targets"]))
        if ended:
            line = (
                f"{which} {job_id} had already ended ({view['state']}: {counts}); nothing to cancel"
            )
        else:
            line = f"{which} {job_id} cancelled: {view['state']}, {counts}"
        cli.out.print(line, markup=False)
        return EXIT_OK

    cli.call(body)


@app.command("rerun")
def rerun(
    ctx: typer.Context,
    job_id: JobArg,
    failed: Annotated[
        bool,
        typer.Option(
            "--failed", help="Only the targets that failed, timed out or were undeliverable."
        ),
    ] = False,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Start it, print its id, do not follow.")
    ] = False,
    group: Annotated[
        bool, typer.Option("--group", help="Print each target's output together when it ends.")
    ] = False,
    plan: Annotated[
        bool, typer.Option("--plan", help="List the targets it would run on; run nothing.")
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask before running on several nodes.")
    ] = False,
) -> None:
    """Run a job again as a new job linked to it, and follow it like run.

    On more than one node it shows them and asks first, as run does.
    Exit code: as run's.
    """
    cli = Cli.of(ctx)

    async def body(stub: Stub, conn: Connection) -> int:
        async def start(plan_only: bool) -> jobs_pb2.Job:
            request = fleet_pb2.FleetServiceRerunJobRequest(
                job_id=job_id, failed_only=failed, plan=plan_only
            )
            try:
                reply = await stub.RerunJob(request, timeout=conn.timeout)
            except grpc.RpcError as exc:
                error = _job_call_error(exc, f"rerun job {job_id}")
                if failed and isinstance(error, Failure):  # the manager names no flag
                    error = Failure(f"{error}; without --failed it re-runs every target")
                raise error from None
            return reply.job

        if plan:
            return _print_plan(cli, job_view(await start(True)))
        job = await _start_asking(cli, start, ask=not yes)
        return await follow_to_end(cli, stub, conn, job, detach=detach, group=group)

    cli.call(body)
