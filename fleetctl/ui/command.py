"""fleetctl ui: the web console on this machine, speaking to the manager as this operator."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
import sys
import webbrowser
from typing import Annotated

import typer
import uvicorn

from fleet.errors import ConfigError
from fleet.listen import listen_sockets
from fleet.v1 import fleet_pb2
from fleetctl.client import Connection
from fleetctl.runtime import EXIT_OK, Cli, Stub
from fleetctl.ui.app import ConsoleApp

__all__ = ["allowed_hosts", "is_loopback", "start_server", "ui"]

DEFAULT_LISTEN = "127.0.0.1:0"


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or "localhost") is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _unspecified(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")  # noqa: S104  # recognizing it, not binding it


def allowed_hosts(host: str, port: int) -> set[str]:
    """The Host header values the console answers to when listening on host:port.

    Loopback names always; the listen address itself; for a wildcard
    listen, this machine's names. Anything else is a DNS-rebinding page.
    """
    names = {"127.0.0.1", "localhost", "[::1]"}
    if _unspecified(host):
        names |= {socket.gethostname(), socket.getfqdn()}
    else:
        names.add(f"[{host}]" if ":" in host else host)
    return {f"{name.lower()}:{port}" for name in names}


def _url_host(host: str) -> str:
    if _unspecified(host):
        return socket.getfqdn()
    return f"[{host}]" if ":" in host else host


def _has_display() -> bool:
    return sys.platform == "darwin" or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    )


def ui(
    ctx: typer.Context,
    listen: Annotated[
        str,
        typer.Option(
            "--listen",
            help="host:port to serve on; port 0 picks a free one. Anything but loopback"
            " lets other machines reach the console (a warning says so).",
        ),
    ] = DEFAULT_LISTEN,
    no_browser: Annotated[
        bool, typer.Option("--no-browser", help="Print the link only; do not open a browser.")
    ] = False,
) -> None:
    """Serve the web console on this machine (docs/console.md).

    Prints a link that opens it once; every action in it is made with your
    operator certificate and audited as you. Ctrl-C stops it.
    """
    cli = Cli.of(ctx)
    host = listen.rpartition(":")[0].strip("[]")

    async def body(stub: Stub, conn: Connection) -> int:
        sockets = listen_sockets("--listen", listen)
        for sock in sockets:
            sock.setblocking(False)
        try:
            return await _serve(cli, stub, conn, sockets, host, no_browser=no_browser)
        finally:
            for sock in sockets:
                sock.close()

    if ":" not in listen or not listen.rpartition(":")[2].isdigit():
        cli.fail(f"--listen {listen!r}: expected host:port (e.g. {DEFAULT_LISTEN})", 2)
    cli.call(body, on_interrupt=None)


async def _serve(
    cli: Cli,
    stub: Stub,
    conn: Connection,
    sockets: list[socket.socket],
    host: str,
    *,
    no_browser: bool,
) -> int:
    # One cheap call first: a wrong address or certificate is one line now,
    # not an error page in the browser later.
    await stub.ListRollouts(
        fleet_pb2.FleetServiceListRolloutsRequest(limit=1), timeout=conn.timeout
    )
    port = sockets[0].getsockname()[1]
    app = ConsoleApp(stub, conn, port=port, allowed_hosts=allowed_hosts(host, port))
    server = await start_server(app, sockets)
    url = f"http://{_url_host(host)}:{port}/login?secret={app.sessions.secret}"
    if not is_loopback(host):
        cli.warn(
            f"the console listens on {host or '*'}:{port}, reachable from other machines over"
            f" plain HTTP; whoever has the link acts as {conn.identity}"
        )
    cli.out.print(f"Fleet console: {url}", markup=False, soft_wrap=True)
    cli.out.file.flush()
    cli.note(
        f"fleetctl: the link opens the console once, as {conn.identity}"
        f" (manager {conn.address}); Ctrl-C stops it"
    )
    if not no_browser and _has_display():
        # webbrowser may block while it starts a browser; the server must not.
        asyncio.get_running_loop().run_in_executor(None, webbrowser.open, url)

    stop = asyncio.Event()
    cli.sigint = stop.set
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()
    finally:
        cli.sigint = None
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)
        app.stopping.set()
        await server.shutdown(sockets=sockets)
    return EXIT_OK


async def start_server(app: ConsoleApp, sockets: list[socket.socket]) -> uvicorn.Server:
    """uvicorn serving `app` on `sockets` (non-blocking, listening); stop with
    ``server.shutdown(sockets=sockets)``. Signals stay ours: serve() would take them."""
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        http="h11",
        timeout_graceful_shutdown=1,
    )
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)  # what serve() would set; startup needs it
    try:
        await server.startup(sockets=sockets)
    except SystemExit:  # uvicorn's way of saying it could not start; it logged why
        port = sockets[0].getsockname()[1]
        raise ConfigError(f"--listen port {port}: the console could not start") from None
    return server
