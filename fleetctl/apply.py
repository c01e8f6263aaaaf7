"""fleetctl apply: send definition files to the manager (or, with --plan, ask what they'd do).

Every file is read and checked here first (`fleetctl.deffile`), so a bad
key, selector or value is one line naming the file, the definition and the
key, and nothing is sent. The manager then checks what only it can (an
artifact exists, a stale --check-revision); its refusal is one line too,
with the file of the definition it names.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer

from fleet.v1 import desired_pb2, fleet_pb2
from fleetctl.client import Connection
from fleetctl.deffile import DefinitionFileError, FileFormat, Loaded, check_unique, load_text
from fleetctl.output import Column, dump, print_rows
from fleetctl.runtime import EXIT_OK, Cli, Failure, Stub, UsageProblem
from fleetctl.views import definition_change_view

__all__ = ["apply", "print_changes", "read_definitions", "server_refusal"]

_NAMED = re.compile(r"definitions\[([^\]]+)\]")


def read_definitions(files: Sequence[str], fmt: FileFormat | None) -> list[Loaded]:
    """Every definition of every file ("-" is stdin, read once); UsageProblem for any problem."""
    if not files:
        raise UsageProblem("give at least one definition file with -f FILE (- for stdin)")
    if list(files).count("-") > 1:
        raise UsageProblem("-f -: stdin can be read once only")
    loaded: list[Loaded] = []
    try:
        for name in files:
            if name == "-":
                text = sys.stdin.read()
            else:
                try:
                    text = Path(name).read_text(encoding="utf-8")
                except FileNotFoundError:
                    raise UsageProblem(f"{name}: no such file") from None
                except (OSError, UnicodeDecodeError) as exc:
                    why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                    raise UsageProblem(f"{name}: cannot read it: {why or exc}") from None
            loaded.extend(load_text(name, text, fmt))
        check_unique(loaded)
    except DefinitionFileError as exc:
        raise UsageProblem(str(exc)) from None
    return loaded


def server_refusal(error: grpc.RpcError, loaded: Sequence[Loaded]) -> Exception | None:
    """The manager's INVALID_ARGUMENT / FAILED_PRECONDITION as one line with the file of the
    definition it names (``definitions[web]`` or ``definitions[0]``); None for other errors."""
    code = error.code()
    if code not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
        return None
    details = " ".join((error.details() or code.name).split())
    match = _NAMED.search(details)
    source = None
    if match:
        key = match.group(1)
        for i, item in enumerate(loaded):
            if item.definition.name == key or str(i) == key:
                source = item.source
                break
    elif len(loaded) == 1 or len({item.source for item in loaded}) == 1:
        source = loaded[0].source if loaded else None
    line = f"{source}: {details}" if source else details
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return UsageProblem(line)
    return Failure(line)


_ACTION_STYLE = {"add": "green", "restart": "yellow", "reconfigure": "cyan", "remove": "red",
                 "refused": "red bold"}  # fmt: skip
_NODE_COLUMNS = [
    Column("NODE", "node_id"),
    Column("ACTION", "action", style=lambda a: _ACTION_STYLE.get(str(a), "")),
    Column("NOTE", "reason"),
]


def _headline(view: dict[str, Any], *, plan: bool) -> str:
    name = view["name"]
    if not view["changed"]:
        return f"{name}: unchanged (revision {view['revision']})"
    if plan:
        summary = view["summary"] or f"revision {view['revision']}"
        return summary if summary.startswith(f"{name}:") else f"{name}: {summary}"
    if view["rollout_id"]:
        return f"{name}: revision {view['revision']} (rollout {view['rollout_id']} started)"
    return f"{name}: revision {view['revision']} ({view['summary'] or 'no rollout'})"


def print_changes(cli: Cli, changes: Sequence[desired_pb2.DefinitionChange], *, plan: bool) -> None:
    """One line per definition; with `plan`, the nodes and batches under each."""
    views = [definition_change_view(c) for c in changes]
    if cli.fmt.structured:
        cli.out.out(dump(cli.fmt, {"plan": plan, "changes": views}), end="", highlight=False)
        return
    for view in views:
        cli.out.print(_headline(view, plan=plan), markup=False)
        if not plan:
            continue
        moved = [n for n in view["nodes"] if n["action"] != "unchanged"]
        if moved:
            print_rows(cli.out, cli.fmt, moved, _NODE_COLUMNS)
        kept = len(view["nodes"]) - len(moved)
        if kept:
            cli.out.print(f"  {kept} node(s) unchanged", markup=False, style="dim")
        for batch in view["batches"]:
            label = "canary batch" if batch["number"] == 0 else f"batch {batch['number']}"
            cli.out.print(f"  {label}: {', '.join(batch['node_ids'])}", markup=False)
    if plan:
        cli.note("plan only: nothing was changed")


def apply(
    ctx: typer.Context,
    files: Annotated[
        list[str],
        typer.Option(
            "--filename", "-f", help="A definition file (TOML or YAML; - for stdin). Repeatable."
        ),
    ],
    plan: Annotated[
        bool,
        typer.Option(
            "--plan", help="Change nothing: print per node what would happen, and the batches."
        ),
    ] = False,
    check_revision: Annotated[
        int | None,
        typer.Option(
            "--check-revision",
            min=0,
            help="Refuse unless the definition's current revision is N (0: must not exist)."
            " One definition only.",
        ),
    ] = None,
    message: Annotated[
        str, typer.Option("--message", help="Why: the change cause stored with the revision.")
    ] = "",
    file_format: Annotated[
        str | None,
        typer.Option("--format", help="toml or yaml, for stdin or a file named otherwise."),
    ] = None,
) -> None:
    """Store a new revision of every definition that changed and roll it out.

    Prints one line per definition: "web: revision 3 (rollout 12 started)" or
    "web: unchanged (revision 3)". Follow a rollout with
    `fleetctl rollout status NAME -w`.
    """
    cli = Cli.of(ctx)

    def parse() -> list[Loaded]:
        fmt: FileFormat | None = None
        if file_format is not None:
            if file_format not in ("toml", "yaml"):
                raise UsageProblem(f"--format: must be toml or yaml, got {file_format!r}")
            fmt = "toml" if file_format == "toml" else "yaml"
        loaded = read_definitions(files, fmt)
        if check_revision is not None and len(loaded) != 1:
            raise UsageProblem(
                f"--check-revision applies to one definition; the files hold {len(loaded)}"
            )
        return loaded

    loaded = cli.checked(parse)
    request = fleet_pb2.FleetServiceApplyDefinitionsRequest(
        definitions=[item.definition for item in loaded], message=message, plan=plan
    )
    if check_revision is not None:
        request.expected_revisions[loaded[0].definition.name] = check_revision

    async def body(stub: Stub, conn: Connection) -> int:
        try:
            reply = await stub.ApplyDefinitions(request, timeout=conn.timeout)
        except grpc.RpcError as exc:
            refusal = server_refusal(exc, loaded)
            if refusal is None:
                raise
            raise refusal from None
        print_changes(cli, reply.changes, plan=plan)
        return EXIT_OK

    cli.call(body)
