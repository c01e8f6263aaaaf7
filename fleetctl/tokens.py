"""fleetctl tokens: join tokens that let a host enroll (create, list, revoke)."""

from __future__ import annotations

import shlex
import time
from typing import Annotated, Any

import typer

from fleet.identity import Identity
from fleet.v1 import enroll_pb2, fleet_pb2
from fleetctl.client import Connection
from fleetctl.nodes import parse_label_changes
from fleetctl.output import Column, print_object, print_rows
from fleetctl.runtime import EXIT_OK, Cli, Stub, UsageProblem
from fleetctl.timespec import format_age, format_time, parse_duration

__all__ = ["app", "install_command", "token_view"]

app = typer.Typer(
    help="Join tokens: a host enrolls with one and gets its certificate from the manager.",
    no_args_is_help=True,
)


def token_view(token: enroll_pb2.JoinToken) -> dict[str, Any]:
    """One join token (never its secret: the manager does not have it)."""
    if token.node_name:
        scope = token.node_name
    elif token.name_prefix:
        scope = f"{token.name_prefix}*"
    else:
        scope = "*"
    return {
        "id": token.id,
        "names": scope,
        "node_name": token.node_name,
        "name_prefix": token.name_prefix,
        "labels": dict(sorted(token.labels.items())),
        "uses_left": token.uses_left,
        "uses_total": token.uses_total,
        "created_by": token.created_by,
        "create_time": format_time(token.create_time),
        "expire_time": format_time(token.expire_time),
        "expire_time_ms": token.expire_time,
        "revoke_time": format_time(token.revoke_time),
        "description": token.description,
        "enrolled_nodes": list(token.enrolled_nodes),
    }


def _state(view: dict[str, Any], now_ms: int) -> str:
    if view["revoke_time"]:
        return "revoked"
    if view["expire_time_ms"] <= now_ms:
        return "expired"
    if view["uses_left"] <= 0:
        return "used up"
    return "usable"


def install_command(
    address: str, token: str, ca_hash: str, node_name: str, *, program: str = "fleet-daemon enroll"
) -> str:
    """The line to run on the new host: `program` (``fleet-daemon enroll``, or the
    install tarball's ``./install.sh``, which takes the same flags)."""
    words = [*program.split(), "--manager", address or "MANAGER:PORT"]
    words += ["--token", token, "--ca-hash", ca_hash]
    if node_name:
        words += ["--name", node_name]
    return shlex.join(words)


def _check_name(option: str, value: str | None, *, prefix: bool) -> str:
    if not value:
        return ""
    # A prefix need only be a valid start of a name: complete it to check it.
    candidate = f"{value}0" if prefix and not value[-1].isalnum() else value
    try:
        Identity("node", candidate, "fleet.local")
    except ValueError:
        raise UsageProblem(
            f"{option} {value!r}: node names are 1-63 letters, digits, '.', '_' or '-',"
            " starting and ending with a letter or digit"
        ) from None
    return value


@app.command("create")
def create(
    ctx: typer.Context,
    node_name: Annotated[
        str | None,
        typer.Option(
            "--node-name",
            help="Enroll exactly this node (also the way to re-enroll an existing or revoked one).",
        ),
    ] = None,
    name_prefix: Annotated[
        str | None,
        typer.Option("--name-prefix", help="Enroll any new node whose name starts with this."),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option("--labels", help="Labels granted to the node: k=v,k2=v2."),
    ] = None,
    ttl: Annotated[
        str, typer.Option("--ttl", help="How long the token is valid (e.g. 1h).")
    ] = "1h",
    uses: Annotated[int, typer.Option("--uses", min=1, help="How many hosts may use it.")] = 1,
    description: Annotated[
        str, typer.Option("--description", help="Why, for the token list and the audit log.")
    ] = "",
) -> None:
    """Create a join token and print it, once: the manager keeps only its hash.

    Without --node-name or --name-prefix the token enrolls any new name; a name
    that already exists always needs a token made with --node-name.
    """
    cli = Cli.of(ctx)

    def check() -> tuple[str, str, dict[str, str], float]:
        if node_name and name_prefix:
            raise UsageProblem("--node-name and --name-prefix exclude each other; pick one")
        name = _check_name("--node-name", node_name, prefix=False)
        prefix = _check_name("--name-prefix", name_prefix, prefix=True)
        granted: dict[str, str] = {}
        if labels:
            changes = [part for part in labels.split(",") if part]
            if any("=" not in part for part in changes):
                raise UsageProblem(f"--labels {labels!r}: use k=v,k2=v2")
            try:
                granted, _ = parse_label_changes(changes)
            except UsageProblem as exc:
                # Its messages speak of `nodes label` changes; these are the token's labels.
                raise UsageProblem(str(exc).replace("label change ", "--labels: ", 1)) from None
        try:
            seconds = parse_duration(ttl)
        except ValueError as exc:
            raise UsageProblem(f"--ttl: {exc}") from None
        if seconds <= 0:
            raise UsageProblem("--ttl must be longer than 0s")
        return name, prefix, granted, seconds

    name, prefix, granted, seconds = cli.checked(check)

    async def body(stub: Stub, conn: Connection) -> int:
        reply = await stub.CreateJoinToken(
            fleet_pb2.FleetServiceCreateJoinTokenRequest(
                node_name=name,
                name_prefix=prefix,
                labels=granted,
                ttl_seconds=seconds,
                uses=uses,
                description=description,
            ),
            timeout=conn.timeout,
        )
        view = token_view(reply.info)
        command = install_command(reply.enroll_address, reply.token, reply.ca_hash, name)
        install = install_command(
            reply.enroll_address, reply.token, reply.ca_hash, name, program="sudo ./install.sh"
        )
        if cli.fmt.structured:
            data = {
                **view,
                "token": reply.token,
                "ca_hash": reply.ca_hash,
                "enroll_address": reply.enroll_address,
                "enroll_command": command,
                "install_command": install,
            }
            print_object(cli.out, cli.fmt, data, [])
            return EXIT_OK
        now_ms = int(time.time() * 1000)
        expires_in = format_age(reply.info.expire_time, now_ms=now_ms)
        human = {
            **view,
            "token": reply.token,
            "ca_hash": reply.ca_hash,
            "expires": f"{view['expire_time']} ({expires_in})",
            "uses": str(reply.info.uses_total),
            "labels_text": ",".join(f"{k}={v}" for k, v in view["labels"].items()) or "-",
        }
        print_object(
            cli.out,
            cli.fmt,
            human,
            [
                ("Token", "token"),
                ("CA hash", "ca_hash"),
                ("Id", "id"),
                ("Names", "names"),
                ("Labels", "labels_text"),
                ("Uses", "uses"),
                ("Expires", "expires"),
            ],
        )
        cli.out.print("\nOn the new host (the token is not shown again):", markup=False)
        cli.out.print(f"  {command}", markup=False, soft_wrap=True)
        cli.out.print("or, from the install tarball (docs/install.md):", markup=False)
        cli.out.print(f"  {install}", markup=False, soft_wrap=True)
        if not reply.enroll_address:
            cli.note(
                "fleetctl: the manager advertises no enrollment address ([enroll]"
                " advertise_address); replace MANAGER:PORT with it"
            )
        return EXIT_OK

    cli.call(body)


def _columns(now_ms: int) -> list[Column]:
    return [
        Column("ID", "id"),
        Column("NAMES", "names"),
        Column("STATE", "state", style=lambda v: "green" if v == "usable" else "dim"),
        Column("USES LEFT", "uses", cell=str),
        Column(
            "EXPIRES",
            "expire_time_ms",
            cell=lambda ms: format_age(int(ms or 0), now_ms=now_ms),
        ),
        Column("LABELS", "labels"),
        Column("CREATED BY", "created_by", wide=True),
        Column("ENROLLED", "enrolled_nodes", wide=True, cell=lambda v: ",".join(v) or "-"),
        Column("DESCRIPTION", "description", wide=True),
    ]


@app.command("list")
def list_tokens(
    ctx: typer.Context,
    show_all: Annotated[
        bool, typer.Option("--all", "-A", help="Also expired, used-up and revoked tokens.")
    ] = False,
) -> None:
    """List join tokens (only usable ones unless --all)."""
    cli = Cli.of(ctx)

    async def body(stub: Stub, conn: Connection) -> int:
        reply = await stub.ListJoinTokens(
            fleet_pb2.FleetServiceListJoinTokensRequest(all=show_all), timeout=conn.timeout
        )
        now_ms = int(time.time() * 1000)
        rows = []
        for token in sorted(reply.tokens, key=lambda t: t.create_time):
            view = token_view(token)
            view["state"] = _state(view, now_ms)
            view["uses"] = f"{token.uses_left}/{token.uses_total}"
            rows.append(view)
        print_rows(
            cli.out,
            cli.fmt,
            rows,
            _columns(now_ms),
            key="tokens",
            empty="No usable join tokens." if not show_all else "No join tokens.",
        )
        return EXIT_OK

    cli.call(body)


@app.command("revoke")
def revoke(
    ctx: typer.Context,
    token_id: Annotated[str, typer.Argument(metavar="ID", help="The token's id (tokens list).")],
) -> None:
    """Revoke a join token: no host can enroll with it any more (hosts already enrolled stay)."""
    cli = Cli.of(ctx)
    # Accept the whole token too, but never send its secret.
    ident = token_id.partition(".")[0]

    async def body(stub: Stub, conn: Connection) -> int:
        reply = await stub.RevokeJoinToken(
            fleet_pb2.FleetServiceRevokeJoinTokenRequest(token_id=ident), timeout=conn.timeout
        )
        if cli.fmt.structured:
            print_object(cli.out, cli.fmt, token_view(reply.info), [])
        else:
            cli.out.print(f"token {reply.info.id} revoked", markup=False)
        return EXIT_OK

    cli.call(body)
