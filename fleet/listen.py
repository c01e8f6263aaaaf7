"""Check listen addresses before a process touches anything else.

A server that finds its port taken only after it migrated a database or
started agents has already changed things, and gRPC core logs its own line
about the failed bind before ours. So every process checks all of its
listen addresses first, together (two of them naming the same port is
caught too), by binding them for a moment the way the servers will: TCP
with SO_REUSEADDR, which gRPC and http.server set, so a socket left in
TIME_WAIT by the previous run is not mistaken for a live listener.

A check cannot reserve the address (gRPC binds its own socket), so a port
taken in the instant between the check and the real bind is still reported
by the server itself; the check turns the common case -- another process
holds the port -- into one line before anything changed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Sequence
from pathlib import Path

from fleet.errors import ConfigError

__all__ = ["check_listen_addresses", "check_unix_socket_free", "listen_sockets"]


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError("expected host:port")
    if int(port) > 65535:
        # getaddrinfo would take it modulo 65536: 99999 would listen on 34463.
        raise ValueError(f"port {int(port)} is out of range (0-65535)")
    return host.strip("[]"), int(port)


def check_listen_addresses(addresses: Sequence[tuple[str, str]]) -> None:
    """ConfigError naming the first (setting, address) a TCP server could not listen on.

    `addresses` holds (setting name, "host:port") pairs; empty addresses
    (disabled listeners) are skipped, port 0 only checks that the host is
    local.
    """
    held: list[socket.socket] = []
    try:
        for what, address in addresses:
            if address:
                held.extend(listen_sockets(what, address, backlog=1))
    finally:
        for sock in held:
            sock.close()


def listen_sockets(what: str, address: str, *, backlog: int = 128) -> list[socket.socket]:
    """Listening sockets for `address` (host:port), one per address the host resolves to.

    Port 0 picks one free port, shared by every address. ConfigError naming
    `what` (the setting) and the reason if it cannot listen.
    """
    try:
        host, port = _split(address)
    except ValueError as exc:
        raise ConfigError(f"{what} {address!r}: {exc}") from None
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"{what} {address}: cannot resolve {host!r}: {exc.strerror}") from None
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(bound) > 1:
                sockaddr = (sockaddr[0], bound[0].getsockname()[1], *sockaddr[2:])
            try:
                sock.bind(sockaddr)
                sock.listen(backlog)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    why = "address already in use (another process listens there)"
                elif exc.errno == errno.EADDRNOTAVAIL:
                    why = "this host has no such address"
                elif exc.errno == errno.EACCES:
                    why = "permission denied (ports below 1024 need privileges)"
                else:
                    why = exc.strerror or str(exc)
                raise ConfigError(f"{what} {address}: cannot listen: {why}") from None
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


def check_unix_socket_free(path: Path, *, what: str) -> None:
    """ConfigError if a live server answers on the Unix socket `path` (a stale file is fine)."""
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(os.fspath(path))
    except OSError:
        return  # nobody listens: a leftover the server replaces
    finally:
        probe.close()
    raise ConfigError(
        f"{what} {path}: another process is serving there (is another fleet-daemon using"
        " this run_dir?)"
    )
