"""fleetctl definitions: list, show, history, delete.

`show` and `history` print a definition in the file's spelling (canonical
YAML, `fleetctl.deffile.render`), so what an operator reads can be applied
again, and history's diffs show only what changed between two revisions.
"""

from __future__ import annotations

import difflib
import time
from typing import Annotated, Any

import typer

from fleet.v1 import desired_pb2, fleet_pb2
from fleetctl.apply import print_changes
from fleetctl.client import Connection
from fleetctl.deffile import render
from fleetctl.output import Column, dump, print_object, print_rows
from fleetctl.runtime import EXIT_OK, EXIT_USAGE, Cli, Stub, stdin_is_interactive
from fleetctl.timespec import format_age
from fleetctl.views import definition_status_view, revision_view

__all__ = ["app", "revision_diff"]

app = typer.Typer(
    help="What runs where: the definitions the manager converges the fleet to, and their history.",
    no_args_is_help=True,
)


def _rollout_cell(rollout: Any) -> str:
    if not rollout:
        return "-"
    return f"{rollout['state']} #{rollout['id']}"


def _columns(now_ms: int) -> list[Column]:
    return [
        Column("NAME", "name"),
        Column("REVISION", "revision"),
        Column("STABLE", "stable_revision", cell=lambda r: str(r) if r else "-"),
        Column("NODES", "nodes_line"),
        Column("FAILED", "nodes_failed"),
        Column("ROLLOUT", "rollout", cell=_rollout_cell,
               style=lambda r: "red" if r and r["state"] in ("FAILED", "REVERTED") else ""),
        Column("SELECTOR", "selector"),
        Column("UPDATED", "updated_at_ms", cell=lambda ms: format_age(int(ms), now_ms=now_ms)),
        Column("BY", "actor", wide=True),
        Column("MESSAGE", "message", wide=True),
    ]  # fmt: skip


@app.command("list")
def list_definitions(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", "-a", help="Also list deleted ones.")] = False,
) -> None:
    """List definitions: revision, last good revision, nodes up to date, latest rollout."""
    cli = Cli.of(ctx)

    async def body(stub: Stub, conn: Connection) -> int:
        reply = await stub.ListDefinitions(
            fleet_pb2.FleetServiceListDefinitionsRequest(include_deleted=all_),
            timeout=conn.timeout,
        )
        rows = []
        for status in reply.definitions:
            view = definition_status_view(status)
            if not cli.fmt.structured:
                line = f"{view['nodes_current']}/{view['nodes']}"
                view["nodes_line"] = f"{line} (deleted)" if view["deleted"] else line
            rows.append(view)
        columns = _columns(int(time.time() * 1000))
        empty = "No definitions. Apply one with fleetctl apply -f FILE."
        print_rows(cli.out, cli.fmt, rows, columns, empty=empty, key="definitions")
        return EXIT_OK

    cli.call(body)


_FIELDS = [
    ("Name", "name"),
    ("Revision", "revision_line"),
    ("Applied", "applied_line"),
    ("Message", "message"),
    ("Stable", "stable_line"),
    ("Nodes", "nodes_line"),
    ("Rollout", "rollout_line"),
]


@app.command("show")
def show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The definition.")],
    revision: Annotated[
        int, typer.Option("--revision", "-r", min=0, help="This revision (default: the current).")
    ] = 0,
) -> None:
    """Show a definition (or one of its revisions) as a file would hold it, and its state."""
    cli = Cli.of(ctx)

    async def body(stub: Stub, conn: Connection) -> int:
        reply = await stub.GetDefinition(
            fleet_pb2.FleetServiceGetDefinitionRequest(name=name, revision=revision),
            timeout=conn.timeout,
        )
        status = definition_status_view(reply.status)
        shown = revision_view(reply.revision)
        if cli.fmt.structured:
            cli.out.out(dump(cli.fmt, {**shown, "status": status}), end="", highlight=False)
            return EXIT_OK
        now_ms = int(time.time() * 1000)
        age = format_age(shown["created_at_ms"], now_ms=now_ms)
        current = status["revision"]
        rollout = status["rollout"]
        human = {
            "name": name,
            "revision_line": f"{shown['revision']}"
            + ("" if shown["revision"] == current else f" (current: {current})")
            + (" (deleted)" if shown["deleted"] else ""),
            "applied_line": f"{shown['created_at']} ({age}) by {shown['actor']}",
            "message": shown["message"],
            "stable_line": status["stable_revision"] or "none yet",
            "nodes_line": f"{status['nodes_current']} of {status['nodes']} run the current"
            f" revision and are healthy; {status['nodes_failed']} failed"
            + (
                f"; {status['unplaced']} unplaced: {status['unplaced_reason']}"
                if status["unplaced"]
                else ""
            ),
            "rollout_line": f"#{rollout['id']} {rollout['state']} (revision"
            f" {rollout['target_revision']}) {rollout['reason']}".rstrip()
            if rollout
            else None,
        }
        print_object(cli.out, cli.fmt, human, _FIELDS)
        cli.out.print("---", markup=False)
        cli.out.out(render(reply.revision.definition), end="", highlight=False)
        return EXIT_OK

    cli.call(body)


def revision_diff(
    older: desired_pb2.DefinitionRevision | None, newer: desired_pb2.DefinitionRevision
) -> str:
    """A unified diff of the canonical renderings (the whole body for the first revision)."""
    before = render(older.definition).splitlines(keepends=True) if older else []
    after = [] if newer.deleted else render(newer.definition).splitlines(keepends=True)
    return "".join(
        difflib.unified_diff(
            before,
            after,
            fromfile=f"revision {older.revision}" if older else "/dev/null",
            tofile=f"revision {newer.revision}" + (" (deleted)" if newer.deleted else ""),
        )
    )


@app.command("history")
def history(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The definition.")],
    diff: Annotated[
        bool, typer.Option("--diff/--no-diff", help="Show what changed in each revision.")
    ] = True,
) -> None:
    """Every revision, oldest first: who applied it when and why, and the diff to the one before."""
    cli = Cli.of(ctx)

    async def body(stub: Stub, conn: Connection) -> int:
        reply = await stub.ListDefinitionRevisions(
            fleet_pb2.FleetServiceListDefinitionRevisionsRequest(name=name), timeout=conn.timeout
        )
        revisions = sorted(reply.revisions, key=lambda r: r.revision)
        entries = []
        previous: desired_pb2.DefinitionRevision | None = None
        for rev in revisions:
            entries.append({**revision_view(rev), "diff": revision_diff(previous, rev)})
            previous = rev
        if cli.fmt.structured:
            cli.out.out(dump(cli.fmt, {"name": name, "revisions": entries}), end="",
                        highlight=False)  # fmt: skip
            return EXIT_OK
        for entry in entries:
            what = " (deleted)" if entry["deleted"] else ""
            cli.out.print(
                f"revision {entry['revision']}{what}  {entry['created_at']}  by {entry['actor']}"
                + (f": {entry['message']}" if entry["message"] else ""),
                markup=False,
                style="bold",
            )
            if diff and entry["diff"]:
                for line in entry["diff"].splitlines():
                    style = "green" if line.startswith("+") else "red" if line[:1] == "-" else ""
                    cli.out.print(f"  {line}", markup=False, style=style)
        return EXIT_OK

    cli.call(body)


@app.command("delete")
def delete(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The definition.")],
    message: Annotated[str, typer.Option("--message", help="Why (stored in its history).")] = "",
    plan: Annotated[bool, typer.Option("--plan", help="Only say which nodes lose it.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove the definition's agent from every node (its history is kept)."""
    cli = Cli.of(ctx)

    async def body(stub: Stub, conn: Connection) -> int:
        def request(dry: bool) -> fleet_pb2.FleetServiceDeleteDefinitionRequest:
            return fleet_pb2.FleetServiceDeleteDefinitionRequest(
                name=name, message=message, plan=dry
            )

        if plan:
            reply = await stub.DeleteDefinition(request(True), timeout=conn.timeout)
            print_changes(cli, [reply.change], plan=True)
            return EXIT_OK
        if not yes:
            forecast = await stub.DeleteDefinition(request(True), timeout=conn.timeout)
            if not stdin_is_interactive():
                cli.fail(
                    f"refusing to delete definition {name} ({forecast.change.summary}) without"
                    " confirmation and there is no terminal to ask on; pass --yes",
                    EXIT_USAGE,
                )
            cli.confirm(
                f"{forecast.change.summary}. Delete?", aborted="aborted; nothing was deleted"
            )
        reply = await stub.DeleteDefinition(request(False), timeout=conn.timeout)
        change = reply.change
        if cli.fmt.structured:
            print_changes(cli, [change], plan=False)
        else:
            cli.out.print(
                f"{name}: deleted as revision {change.revision} ({change.summary})", markup=False
            )
        return EXIT_OK

    cli.call(body)
