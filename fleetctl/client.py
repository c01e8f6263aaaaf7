"""Connecting to the manager (mTLS) and explaining why a call failed.

The manager is dialed with ``grpc.ssl_target_name_override =
manager.<trust domain>`` so the handshake proves it is the fleet's manager,
whatever address was dialed. Every failure becomes ONE line for the
operator: which address, what failed, what to check. TLS failures are
explained in words: `probe` looks at the certificate the server presents.
An error about a node, agent or metric type that does not exist points at
the fleetctl command that lists what does (`hinted`): the manager names the
resource, fleetctl knows its own commands.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from fleet.errors import ConfigError, FleetError, from_rpc_error
from fleet.reachability import Cause, cause, last_error
from fleet.tls import TLSConfig, TLSFileError, channel_credentials, channel_options
from fleet.v1 import fleet_pb2_grpc
from fleetctl.settings import FleetctlConfig
from fleetctl.tlsprobe import probe

if TYPE_CHECKING:
    from fleet.v1.fleet_pb2_grpc import FleetServiceAsyncStub

__all__ = [
    "Connection",
    "connect",
    "connect_sync",
    "explain_rpc_error",
    "hinted",
    "resolve_connection",
]

# NOT_FOUND about a resource kind -> the command that lists what exists.
_SEE = {
    "node": "fleetctl nodes list",
    "agent": "fleetctl agents list --node {node}",
    "metric-type": "fleetctl metrics types --node {node}",
    "artifact": "fleetctl artifacts list",
}
_SEE_WORDS = {
    "definition '": "definitions list",
    "job '": "jobs list",
    "join token '": "tokens list",
}
"""NOT_FOUND messages that name what is missing only in words, by how they start."""


@dataclass(frozen=True)
class Connection:
    """Everything needed to dial the manager."""

    address: str
    """host:port dialed."""
    tls: TLSConfig
    """The operator's certificate, key and the fleet CA."""
    server_name: str
    """The name the manager's certificate must carry: manager.<trust domain>."""
    timeout: float
    """Deadline in seconds for each unary call."""
    identity: str
    """Who we are ("operator/alice"), for messages."""


_TLS_SOURCES = {
    "ca_file": "ca (--ca, FLEET_CA or the config file)",
    "cert_file": "cert (--cert, FLEET_CERT or the config file)",
    "key_file": "key (--key, FLEET_KEY or the config file)",
}


def resolve_connection(
    config: FleetctlConfig, sources: Mapping[str, str] = _TLS_SOURCES
) -> Connection:
    """Check the TLS files locally and work out the manager's expected name.

    Raises ConfigError (one line) for missing options, unusable files, an
    expired or not-yet-valid certificate, or a key not matching it, so those
    never reach the network as an obscure handshake failure.
    """
    missing = [
        f"--{name} (FLEET_{name.upper()})"
        for name, value in (("ca", config.ca), ("cert", config.cert), ("key", config.key))
        if value is None
    ]
    if missing:
        raise ConfigError(
            f"no operator certificate configured: set {', '.join(missing)}"
            " or ca/cert/key in the config file (fleetctl pki issue operator NAME makes one)"
        )
    assert config.ca is not None
    assert config.cert is not None
    assert config.key is not None
    tls = TLSConfig(ca_file=config.ca, cert_file=config.cert, key_file=config.key)
    try:
        identity = tls.identity()  # validates the files
    except TLSFileError as exc:  # said of the setting it came from (`settings.tls_sources`)
        raise exc.in_setting(sources[exc.field]) from None
    if identity.role != "operator":
        raise ConfigError(
            f"TLS certificate file {config.cert}: it is {identity}, but the manager only"
            " lets operator certificates use fleetctl; issue one with fleetctl pki issue operator"
        )
    domain = config.trust_domain or identity.trust_domain
    return Connection(
        address=config.manager,
        tls=tls,
        server_name=f"manager.{domain}",
        timeout=config.timeout,
        identity=str(identity),
    )


@asynccontextmanager
async def connect(conn: Connection) -> AsyncIterator[FleetServiceAsyncStub]:
    """A FleetService stub on a fresh mTLS channel, closed on exit."""
    async with aio.secure_channel(
        conn.address, channel_credentials(conn.tls), options=_options(conn)
    ) as channel:
        yield fleet_pb2_grpc.FleetServiceStub(channel)


def _options(conn: Connection) -> list[tuple[str, Any]]:
    return [
        *channel_options(conn.server_name),
        # One attempt per call: a CLI reports at once instead of waiting out backoff.
        ("grpc.enable_retries", 0),
    ]


@contextmanager
def connect_sync(conn: Connection) -> Iterator[fleet_pb2_grpc.FleetServiceStub]:
    """A FleetService stub on grpc's synchronous client, for client-streaming calls.

    The asyncio client reports INTERNAL instead of the server's status when
    the server ends a call the client is still streaming to (grpc/grpc#36066):
    every early refusal of an upload (too large, version taken, already
    stored). The synchronous client reports the server's status.
    """
    channel = grpc.secure_channel(conn.address, channel_credentials(conn.tls), _options(conn))
    try:
        yield fleet_pb2_grpc.FleetServiceStub(channel)
    finally:
        channel.close()


def explain_rpc_error(error: grpc.RpcError, conn: Connection, *, diagnose: bool = True) -> str:
    """One line: what failed talking to the manager at `conn.address`, and what to check."""
    code = error.code()
    details = error.details() or ""
    where = f"manager at {conn.address}"
    if code == grpc.StatusCode.UNAVAILABLE:
        if about_a_node(error):
            # The manager answered: it is the node it cannot reach ("node-2: ...").
            return f"the {where} cannot reach {details}"
        return _unavailable(details, conn, where, diagnose=diagnose)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        if about_a_node(error):
            return details  # the manager's words: the node did not answer in time
        return (
            f"{where}: no answer within {conn.timeout:g}s; check that it is up and not"
            " overloaded, or raise --timeout"
        )
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"{where} refused {conn.identity}: {details}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"{where} did not accept our certificate {conn.tls.cert_file}: {details}"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return (
            f"{where} does not serve this call ({details or 'UNIMPLEMENTED'});"
            " is it an older fleet-manager, or not a fleet-manager at all?"
        )
    return hinted(from_rpc_error(error))


def about_a_node(error: grpc.RpcError) -> bool:
    """Whether an UNAVAILABLE or DEADLINE_EXCEEDED is the manager's answer about a node it
    could not reach or that did not answer in time (it names the node), not about itself."""
    about = from_rpc_error(error).resource
    return about is not None and about.kind == "node"


def hinted(error: FleetError) -> str:
    """`error`'s message; for a NOT_FOUND node, agent or metric type (or an
    INVALID_ARGUMENT naming one: a request field that names what does not exist), plus
    the command that lists what exists: "node 'n9' is not registered (see `fleetctl
    nodes list`)"."""
    about = error.resource
    # The desired-state, job and token RPCs name what they did not find in words only.
    words = error.message
    if (
        error.code == grpc.StatusCode.NOT_FOUND
        and about is None
        and words.endswith("does not exist")
    ):
        for start, lister in _SEE_WORDS.items():
            if words.startswith(start):
                return f"{words} (see `fleetctl {lister}`)"
    missing = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    if error.code not in missing or about is None or about.kind not in _SEE:
        return error.message
    see = _SEE[about.kind]
    if "{node}" in see and not about.node:
        see = see.split(" --", 1)[0]
    return f"{error.message} (see `{see.format(node=about.node)}`)"


def _unavailable(details: str, conn: Connection, where: str, *, diagnose: bool) -> str:
    why = cause(details)
    if why is Cause.REFUSED:
        return (
            f"cannot connect to the {where}: connection refused; check that fleet-manager"
            " is running there and that --manager / FLEET_MANAGER names its listen address"
        )
    if why is Cause.NO_NAME:
        return (
            f"cannot connect to the {where}: the name does not resolve; check"
            " --manager / FLEET_MANAGER (or use an IP address)"
        )
    if why in (Cause.TLS, Cause.CLOSED):
        finding = (
            probe(conn.address, conn.tls, conn.server_name, timeout=min(conn.timeout, 5.0))
            if diagnose
            else None
        )
        if finding:
            return f"TLS with the {where} failed: {finding}"
        return f"TLS with the {where} failed: {last_error(details)}"
    if why is Cause.TIMED_OUT:
        return (
            f"cannot connect to the {where}: timed out; check the address, firewalls,"
            " and that fleet-manager is running"
        )
    return f"{where} is unavailable: {last_error(details)}"
