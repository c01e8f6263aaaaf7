"""The root `fleetctl` command: global options, the nouns, and `main()`."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from fleetctl import (
    agents,
    apply,
    artifacts,
    definitions,
    events,
    jobs,
    metrics,
    nodes,
    pki,
    rollouts,
    tokens,
)
from fleetctl.output import OutputFormat
from fleetctl.runtime import Cli, GlobalOptions
from fleetctl.ui.command import ui

__all__ = ["app", "hoist_global_options", "main"]

# Global options with a value; kubectl-style, they may follow the subcommand too.
_GLOBAL_WITH_VALUE = ("-o", "--output", "-m", "--manager", "--ca", "--cert", "--key",
                      "--timeout", "--config")  # fmt: skip


def hoist_global_options(args: list[str]) -> list[str]:
    """Move global options (and their values) found after the subcommand to the front.

    So ``fleetctl nodes list -o json`` works like ``fleetctl -o json nodes list``.
    Nothing after ``--`` is touched, nor `run`'s own options (its --timeout is the
    job's) and the job's command after them.
    """
    front: list[str] = []
    rest: list[str] = []
    command: str | None = None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i:])
            break
        name = arg.split("=", 1)[0]
        if command == "run" and name in jobs.RUN_VALUE_OPTIONS:
            # run's own (--timeout is the job's): keep it and its value in place.
            take = 1 if "=" in arg or (not arg.startswith("--") and len(arg) > 2) else 2
            rest.extend(args[i : i + take])
            i += take
            continue
        if not arg.startswith("-") and command is not None and command == "run":
            rest.extend(args[i:])  # the job's command: none of it is ours
            break
        if name in _GLOBAL_WITH_VALUE and "=" in arg and name.startswith("--"):
            front.append(arg)
        elif arg in _GLOBAL_WITH_VALUE and i + 1 < len(args):
            front.extend(args[i : i + 2])
            i += 1
        elif arg.startswith("-o") and len(arg) > 2 and not arg.startswith("--"):
            front.append(arg)  # -ojson
        else:
            if command is None and not arg.startswith("-"):
                command = arg
            rest.append(arg)
        i += 1
    return front + rest


def _agent_ref_hint(ctx: Any, message: str) -> str:
    """`agents show node-1 web` where one NODE/AGENT is asked: say how to write it."""
    extra = re.fullmatch(r"Got unexpected extra argument\(s\)? \((\S+)\)", message)
    if ctx is None or extra is None:
        return ""
    for param in ctx.command.params:
        node = ctx.params.get(param.name)
        if param.metavar == "NODE/AGENT" and isinstance(node, str) and "/" not in node:
            return f": give the agent as NODE/AGENT, e.g. {node}/{extra.group(1)}"
    return ""


class _OneLineErrors(TyperGroup):
    """Usage errors as one line (``fleetctl: error: ...``) instead of click's panel."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        argv = hoist_global_options(sys.argv[1:] if args is None else list(args))
        try:
            rv = super().main(argv, prog_name, complete_var, False, windows_expand_args, **extra)
        except typer.TyperException as exc:  # click's UsageError, BadParameter, ...
            if not standalone_mode:
                raise
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            message = " ".join(exc.format_message().split())
            # Typer validates through pydantic, which prefixes a validator's
            # ValueError with "Value error, "; the operator needs only the reason.
            message = message.replace(": Value error, ", ": ", 1) + _agent_ref_hint(ctx, message)
            print(f"fleetctl: error: {message}{hint}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            print("fleetctl: aborted", file=sys.stderr)
            sys.exit(1)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


app = typer.Typer(
    cls=_OneLineErrors,
    name="fleetctl",
    help=(
        "Drive a Fleet: nodes, agents, operations, metrics, events, definitions, rollouts and"
        " artifacts, and jobs (fleetctl run) through the manager."
        " Settings come from flags, FLEET_* variables and ~/.config/fleet/fleetctl.toml."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(nodes.app, name="nodes")
app.add_typer(agents.app, name="agents")
app.add_typer(metrics.app, name="metrics")
app.add_typer(artifacts.app, name="artifacts")
app.command("apply")(apply.apply)
app.add_typer(definitions.app, name="definitions")
app.add_typer(rollouts.app, name="rollout")
app.add_typer(pki.app, name="pki")
app.command("events")(events.events)
app.command("run", context_settings={"allow_interspersed_args": False})(jobs.run)
app.add_typer(jobs.app, name="jobs")
app.add_typer(tokens.app, name="tokens")
app.command("ui")(ui)


@app.callback()
def root(
    ctx: typer.Context,
    output: Annotated[
        OutputFormat | None,
        typer.Option("--output", "-o", help="table, wide, json or yaml (default: table)."),
    ] = None,
    manager: Annotated[
        str | None,
        typer.Option("--manager", "-m", help="Manager host:port (env FLEET_MANAGER)."),
    ] = None,
    ca: Annotated[
        Path | None, typer.Option("--ca", help="Fleet CA certificate (env FLEET_CA).")
    ] = None,
    cert: Annotated[
        Path | None, typer.Option("--cert", help="Operator certificate (env FLEET_CERT).")
    ] = None,
    key: Annotated[
        Path | None, typer.Option("--key", help="Operator private key (env FLEET_KEY).")
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", min=0.001, help="Seconds per call (env FLEET_TIMEOUT; 30)."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Config file (env FLEETCTL_CONFIG; default ~/.config/fleet/fleetctl.toml).",
        ),
    ] = None,
) -> None:
    """Global options apply to every command."""
    ctx.obj = Cli(
        GlobalOptions(
            output=output,
            manager=manager,
            ca=ca,
            cert=cert,
            key=key,
            timeout=timeout,
            config=config,
        )
    )


def main() -> None:
    """Console-script entry point."""
    app(prog_name="fleetctl")
