"""`fleet-manager serve|migrate --config PATH`.

Problems an operator can fix (a bad config, unusable certificates, a
database that cannot be reached or is on an old schema) are one line on
stderr and a non-zero exit, never a traceback: exit 2 for configuration,
1 for everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer

from fleet.config import load_config
from fleet.errors import ConfigError, FleetError
from fleet.observability import setup_logging
from fleet.service import raise_open_files_limit, run_until_signalled
from fleet.systemd import SystemdNotifier
from manager.config import ENV_PREFIX, ManagerConfig
from manager.gc_tuning import settle_gc

__all__ = ["app", "main"]

log = logging.getLogger("manager.cli")

app = typer.Typer(
    name="fleet-manager",
    help="The Fleet manager: node registry, liveness and metrics store.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (FLEET_MANAGER_* env vars override)."),
]


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"fleet-manager: {message}", err=True)
    return typer.Exit(code)


def _setup_logging(config: ManagerConfig) -> None:
    setup_logging(config.logging.level, config.logging.json)
    if config.logging.level != "debug":  # alembic narrates every plugin it loads at INFO
        logging.getLogger("alembic").setLevel(logging.WARNING)


NO_CONFIG = "; no --config was given (the defaults and FLEET_MANAGER_* variables were used)"
"""Said after a config problem when no file was named: the usual cause is the missing flag."""


def _load(path: Path | None) -> ManagerConfig:
    try:
        return load_config(ManagerConfig, path, env_prefix=ENV_PREFIX)
    except ConfigError as exc:
        raise _fail(exc.message + ("" if path else NO_CONFIG), 2) from None


async def _serve(config: ManagerConfig) -> None:
    from manager.server import ManagerServer  # deferred: `--help` stays fast

    # A descriptor per daemon connection: 15,000 control streams need the hard limit.
    open_files = raise_open_files_limit()
    notifier = SystemdNotifier()
    server = ManagerServer(config)
    watchdog: list[asyncio.Task[None]] = []

    async def start() -> None:
        await server.start()
        settle_gc()  # freeze the start-up heap, collect less often (why: gc_tuning)
        watchdog.append(asyncio.create_task(notifier.watchdog_loop(), name="watchdog"))
        notifier.ready()
        notifier.status(f"serving ManagerService on port {server.port}")
        # Logged once serving: a refused start prints its one line and nothing else.
        log.info("open files limit: %d", open_files)

    async def stop(grace: float) -> None:
        notifier.stopping()
        log.info("stopping: draining calls for up to %.1f s", grace)
        for task in watchdog:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await server.stop(grace)

    try:
        await run_until_signalled(start, stop, grace=config.server.shutdown_grace_seconds)
    except BaseException:
        await server.stop(0)  # start failed half-way: undo it (no-op if nothing started)
        raise


def _run(main: Coroutine[Any, Any, None], path: Path | None) -> None:
    try:
        asyncio.run(main)
    except ConfigError as exc:
        raise _fail(exc.message + ("" if path else NO_CONFIG), 2) from None
    except FleetError as exc:
        raise _fail(exc.message, 1) from None
    except OSError as exc:
        raise _fail(str(exc), 1) from None


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run the manager until SIGTERM/SIGINT (then drain and flush)."""
    cfg = _load(config)
    _setup_logging(cfg)
    _run(_serve(cfg), config)


async def _migrate(config: ManagerConfig) -> None:
    from manager.server import open_database

    db = await open_database(config, migrate=True)
    await db.close()


@app.command()
def migrate(config: ConfigOption = None) -> None:
    """Apply pending database migrations and exit."""
    cfg = _load(config)
    _setup_logging(cfg)
    _run(_migrate(cfg), config)
    typer.echo(f"database is at the latest schema ({cfg.database_url.split('://')[0]})")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
