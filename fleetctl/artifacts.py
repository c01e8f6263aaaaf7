"""fleetctl artifacts: push, list, show, delete.

`push` hashes the file here, then streams it to the manager in 1 MiB chunks
with a progress bar on stderr; the manager stores it only if the bytes it
received have that digest. The upload runs on grpc's synchronous client in
a thread (see `fleetctl.client.connect_sync`), so a refusal before the last
chunk still shows the manager's reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from fleet.artifacts import CHUNK_SIZE, file_digest, validate_name, validate_version
from fleet.errors import InvalidArgument
from fleet.v1 import desired_pb2, fleet_pb2
from fleetctl.client import Connection, connect_sync
from fleetctl.output import Column, print_object, print_rows
from fleetctl.runtime import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Cli,
    Failure,
    Stub,
    UsageProblem,
    stdin_is_interactive,
)
from fleetctl.timespec import format_age
from fleetctl.views import artifact_view

__all__ = ["app", "parse_artifact_ref"]

app = typer.Typer(
    help=(
        "Files and archives stored in the manager for definitions to run"
        " (content-addressed by SHA-256; a version never changes)."
    ),
    no_args_is_help=True,
)

PushRequest = fleet_pb2.FleetServicePushArtifactRequest


def _checked_name(name: str, version: str) -> tuple[str, str]:
    try:
        return validate_name(name), validate_version(version)
    except InvalidArgument as exc:
        raise UsageProblem(exc.message) from None


def parse_artifact_ref(text: str) -> tuple[str, str]:
    """NAME:VERSION -> (name, version); UsageProblem saying what is wrong."""
    name, sep, version = text.partition(":")
    if not sep or not version:
        raise UsageProblem(
            f"{text!r}: give the artifact as NAME:VERSION, e.g. web:1.4.2"
            f" (its versions: fleetctl artifacts list {name or 'NAME'})"
        )
    return _checked_name(name, version)


def _progress(cli: Cli) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=cli.err,
        transient=True,
        disable=not cli.err.is_terminal,
    )


def _requests(
    path: Path, upload: desired_pb2.ArtifactUpload, sent: Callable[[int], None]
) -> Iterator[PushRequest]:
    """The PushArtifact stream: the upload, then the file in CHUNK_SIZE pieces."""
    yield PushRequest(upload=upload)
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            yield PushRequest(chunk=chunk)
            done += len(chunk)
            sent(done)


async def _upload(
    conn: Connection, requests: Iterator[PushRequest]
) -> fleet_pb2.FleetServicePushArtifactResponse:
    """PushArtifact on the synchronous client in its own thread; Ctrl-C cancels it."""
    loop = asyncio.get_running_loop()
    finished = asyncio.Event()
    with connect_sync(conn) as stub:
        call = stub.PushArtifact.future(requests)

        def done(_: object) -> None:
            loop.call_soon_threadsafe(finished.set)

        call.add_done_callback(done)
        try:
            await finished.wait()
        except asyncio.CancelledError:
            call.cancel()  # type: ignore[no-untyped-call]  # grpc's stub leaves it untyped
            raise
        reply: fleet_pb2.FleetServicePushArtifactResponse = call.result()
        return reply


@app.command("push")
def push(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="The file or archive (tar, tar.gz, zip) to store.")],
    name: Annotated[str, typer.Option("--name", help="Artifact name, e.g. web.")],
    version: Annotated[str, typer.Option("--version", help="Its version, e.g. 1.4.2.")],
) -> None:
    """Store FILE in the manager as NAME VERSION; prints its digest.

    The same name, version and content again changes nothing; other content
    under a stored version is refused (versions never change: push a new one).
    """
    cli = Cli.of(ctx)
    name, version = cli.checked(lambda: _checked_name(name, version))
    if not file.is_file():
        cli.fail(f"{file}: no such file", EXIT_FAILED)

    async def body(stub: Stub, conn: Connection) -> int:
        try:
            size = file.stat().st_size
            with _progress(cli) as bar:
                task = bar.add_task(f"hashing {file.name}", total=size)
                digest = await asyncio.to_thread(
                    file_digest, file, progress=lambda n: bar.update(task, completed=n)
                )
                bar.update(task, description=f"uploading {name} {version}", completed=0)
                upload = desired_pb2.ArtifactUpload(
                    name=name, version=version, digest=digest, size_bytes=size
                )
                requests = _requests(file, upload, lambda n: bar.update(task, completed=n))
                reply = await _upload(conn, requests)
        except OSError as exc:
            raise Failure(f"{file}: {exc.strerror or exc}") from None
        view = {**artifact_view(reply.artifact), "existed": reply.existed}
        if cli.fmt.structured:
            print_object(cli.out, cli.fmt, view, [])
        elif reply.existed:
            cli.out.print(
                f"artifact {name} {version} is already stored with this content"
                f" ({reply.artifact.digest}); nothing changed",
                markup=False,
            )
        else:
            cli.out.print(
                f"artifact {name} {version} stored: {reply.artifact.digest} ({view['size']})",
                markup=False,
            )
        return EXIT_OK

    cli.call(body, on_interrupt="interrupted; the manager stored nothing of this upload")


def _columns(now_ms: int) -> list[Column]:
    return [
        Column("NAME", "name"),
        Column("VERSION", "version"),
        Column("SIZE", "size"),
        Column("DIGEST", "digest", cell=lambda d: str(d)[:19]),
        Column("PUSHED", "created_at_ms", cell=lambda ms: format_age(int(ms), now_ms=now_ms)),
        Column("BY", "actor"),
        Column("USED BY", "referenced_by"),
        Column("FULL DIGEST", "digest", wide=True),
    ]


@app.command("list")
def list_artifacts(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Only this artifact's versions.")] = None,
) -> None:
    """List stored artifacts (or NAME's versions), oldest version first."""
    cli = Cli.of(ctx)
    if name is not None:
        cli.checked(lambda: _checked_name(name, "1"))

    async def body(stub: Stub, conn: Connection) -> int:
        reply = await stub.ListArtifacts(
            fleet_pb2.FleetServiceListArtifactsRequest(name=name or ""), timeout=conn.timeout
        )
        rows = [artifact_view(a) for a in reply.artifacts]
        empty = f"No versions of artifact {name}." if name else "No artifacts stored."
        columns = _columns(int(time.time() * 1000))
        print_rows(cli.out, cli.fmt, rows, columns, empty=empty, key="artifacts")
        return EXIT_OK

    cli.call(body)


_FIELDS = [
    ("Name", "name"),
    ("Version", "version"),
    ("Digest", "digest"),
    ("Size", "size_line"),
    ("Pushed", "pushed_line"),
    ("Used by", "used_by_line"),
]


def _show(cli: Cli, view: dict[str, Any]) -> None:
    if cli.fmt.structured:
        print_object(cli.out, cli.fmt, view, [])
        return
    now_ms = int(time.time() * 1000)
    human = {
        **view,
        "size_line": f"{view['size']} ({view['size_bytes']} bytes)",
        "pushed_line": f"{view['created_at']} ({format_age(view['created_at_ms'], now_ms=now_ms)})"
        f" by {view['actor']}",
        "used_by_line": ", ".join(view["referenced_by"]) or "no definition",
    }
    print_object(cli.out, cli.fmt, human, _FIELDS)


@app.command("show")
def show(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="NAME:VERSION", help="e.g. web:1.4.2")],
) -> None:
    """Show one artifact: digest, size, who pushed it when, and the definitions using it."""
    cli = Cli.of(ctx)
    name, version = cli.checked(lambda: parse_artifact_ref(ref))

    async def body(stub: Stub, conn: Connection) -> int:
        reply = await stub.GetArtifact(
            fleet_pb2.FleetServiceGetArtifactRequest(name=name, version=version),
            timeout=conn.timeout,
        )
        _show(cli, artifact_view(reply.artifact))
        return EXIT_OK

    cli.call(body)


@app.command("delete")
def delete(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="NAME:VERSION", help="e.g. web:1.4.2")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete one artifact version (refused while a definition uses it)."""
    cli = Cli.of(ctx)
    name, version = cli.checked(lambda: parse_artifact_ref(ref))

    async def body(stub: Stub, conn: Connection) -> int:
        if not yes:
            shown = await stub.GetArtifact(
                fleet_pb2.FleetServiceGetArtifactRequest(name=name, version=version),
                timeout=conn.timeout,
            )
            _confirm(cli, artifact_view(shown.artifact))
        await stub.DeleteArtifact(
            fleet_pb2.FleetServiceDeleteArtifactRequest(name=name, version=version),
            timeout=conn.timeout,
        )
        cli.out.print(f"artifact {name} {version} deleted", markup=False)
        return EXIT_OK

    cli.call(body)


def _confirm(cli: Cli, view: dict[str, Any]) -> None:
    what = f"artifact {view['name']} {view['version']} ({view['size']}, {view['digest']})"
    if not stdin_is_interactive():
        cli.fail(
            f"refusing to delete {what} without confirmation and there is no terminal to ask"
            " on; pass --yes",
            EXIT_USAGE,
        )
    if view["referenced_by"]:
        cli.note(f"used by {', '.join(view['referenced_by'])}: the manager will refuse")
    cli.confirm(f"Delete {what}?", aborted="aborted; nothing was deleted")
