"""One manager per port, even with several servers sharing it (`[server] accept_loops`).

grpc.aio's server takes one new call at a time, so the manager may start
several gRPC servers on `server.listen`, bound with SO_REUSEPORT: the
kernel spreads new connections over their listening sockets and each
server takes calls on its own. SO_REUSEPORT would also let a second
manager process (same user) join the port and silently take half the
connections, where today's single server (``grpc.so_reuseport`` 0) makes
it fail. Two guards keep that failure:

- before anything binds, `fleet.listen.check_listen_addresses` binds and
  listens on the port WITHOUT SO_REUSEPORT, which fails while any socket
  listens there (a manager, with or without SO_REUSEPORT, or any other
  program);
- two managers starting at the same instant can both pass that check, so
  the manager also holds a claim for the port for as long as it serves: a
  Linux abstract Unix socket named after the port number. Only one process
  can bind a name; the kernel releases it when the process exits, however
  it exits (``kill -9`` included), and the namespace is per network
  namespace, like the port itself.

The claim is by port number, not address: with accept_loops > 1, two
managers on one host cannot share a port number even on different
addresses (accept_loops = 1 keeps the old behaviour).
"""

from __future__ import annotations

import errno
import socket
import sys

from fleet.errors import ConfigError

__all__ = ["claim_name", "claim_port", "reuseport_supported"]


def reuseport_supported() -> bool:
    """True where the claim and SO_REUSEPORT's spreading of connections work (Linux)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def claim_name(port: int) -> bytes:
    """The abstract socket name that stands for `port`."""
    return b"\0fleet-manager-port-%d" % port


def claim_port(port: int, *, what: str, address: str) -> socket.socket:
    """Hold `port` for this process; ConfigError (naming `what`) if another manager holds it.

    Keep the returned socket open while serving; close it after the servers
    stopped.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(claim_name(port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"{what} {address}: cannot listen: another manager on this host serves port {port}"
            ) from None
        raise ConfigError(f"{what} {address}: cannot claim port {port}: {exc}") from None
    return sock
