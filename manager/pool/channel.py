"""One daemon's channel, its long-lived counters, and error translation.

Each daemon gets its own `grpc.aio` channel and its own TCP connection:
`channel_args` adds a per-node argument and a local subchannel pool, so two
daemons never share a connection even if they end up at the same address.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from fleet.errors import ConfigError, DeadlineExceeded, FleetError, Unavailable, from_rpc_error
from fleet.keepalive import keepalive_args
from fleet.reachability import Cause, cause, last_error
from fleet.tls import TLSConfig, channel_credentials, channel_options
from manager.pool.config import PoolConfig
from manager.pool.state import ConnectionState, ConnEvent, apply

if TYPE_CHECKING:
    import asyncio

__all__ = [
    "NodeStats",
    "ReloadingCredentials",
    "WrongDaemonIdentity",
    "channel_args",
    "never_sent",
    "no_connection",
    "translate_error",
    "wrong_peer",
]

log = logging.getLogger(__name__)

NODE_ARG = "fleet.node_id"
"""Channel argument naming the daemon: makes every daemon's channel arguments distinct."""

_HISTORY = 16


class ReloadingCredentials:
    """The pool's mTLS client credentials, rebuilt when the files change on disk.

    Checked when a channel is opened, not per call: open connections keep
    their session, new ones present the renewed certificate, so the
    manager's certificate can be rotated without a restart. New files that
    do not validate are ignored with one warning; the last good ones stay.
    """

    def __init__(self, tls: TLSConfig) -> None:
        self._tls = tls
        self._stamp = self._stat()
        self._credentials = channel_credentials(tls)  # ConfigError: unusable at start
        self._rejected: tuple[tuple[int, ...], ...] | None = None

    def _stat(self) -> tuple[tuple[int, ...], ...]:
        stamps: list[tuple[int, ...]] = []
        for path in (self._tls.ca_file, self._tls.cert_file, self._tls.key_file):
            try:
                st = path.stat()
            except OSError:
                stamps.append((-1,))
            else:
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def __call__(self) -> grpc.ChannelCredentials:
        """The current credentials (reloaded first if the files changed)."""
        stamp = self._stat()
        if stamp not in (self._stamp, self._rejected):
            try:
                self._credentials = channel_credentials(self._tls)
            except ConfigError as exc:
                log.warning("TLS files changed but are unusable; still using the old: %s", exc)
                self._rejected = stamp
            else:
                self._stamp = stamp
                log.info("TLS client certificate reloaded from %s", self._tls.cert_file)
        return self._credentials


class WrongDaemonIdentity(Unavailable):
    """The daemon at the node's address is not that node (or not of our fleet).

    The TLS handshake failed: its certificate does not name the node we
    dialed, or our CA did not sign it. Retrying does not help; check the
    node's registered address and the certificate its daemon serves.
    """


def channel_args(node_id: str, server_name: str, config: PoolConfig) -> list[tuple[str, Any]]:
    """The gRPC channel arguments of the channel to daemon `node_id`."""
    ms = 1000.0
    return [
        *channel_options(server_name),
        # Own subchannel pool + a per-node argument: never share a connection.
        ("grpc.use_local_subchannel_pool", 1),
        (NODE_ARG, node_id),
        *keepalive_args(config.keepalive_time, config.keepalive_timeout),
        ("grpc.keepalive_permit_without_calls", int(config.keepalive_permit_without_calls)),
        ("grpc.http2.max_pings_without_data", 0),
        # gRPC's own reconnect backoff follows ours; "min reconnect backoff"
        # is what gRPC uses as the minimum connect (TCP + TLS) timeout.
        ("grpc.initial_reconnect_backoff_ms", max(1, round(config.retry.initial * ms))),
        ("grpc.max_reconnect_backoff_ms", max(1, round(config.retry.maximum * ms))),
        ("grpc.min_reconnect_backoff_ms", round(config.connect_timeout * ms)),
    ]


# What gRPC (BoringSSL) says when the handshake fails on the daemon's certificate.
_NOT_THAT_NODE = (
    "Hostname Verification Check failed",
    "is not in peer certificate",
    "No match found for server name",
)
_UNTRUSTED = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed")


# Why a daemon could not be reached, in words (gRPC's own text stays in the log).
_UNREACHABLE = {
    Cause.REFUSED: "daemon at {address} refused the connection (is fleet-daemon running there?)",
    Cause.NO_NAME: "daemon at {address}: the name does not resolve (check its advertise setting)",
    Cause.TIMED_OUT: "daemon at {address} did not complete the connection in time"
    " (is the address right and the port open?)",
    Cause.CLOSED: "the connection to the daemon at {address} was closed or reset",
}


def translate_error(
    error: aio.AioRpcError, *, node_id: str, address: str, budget: float | None = None
) -> FleetError:
    """The FleetError for a failed call to `node_id`, with a message naming the node.

    `budget` is the call's deadline in seconds, named when our own deadline
    expired. A daemon that cannot be reached is said in words, never in
    gRPC's ("failed to connect to all addresses; ..."). A `Resource` the
    daemon names (an agent) belongs to `node_id`.
    """
    details = error.details() or ""
    code = error.code()
    translated: FleetError
    if (
        budget is not None
        and code == grpc.StatusCode.DEADLINE_EXCEEDED
        and details == "Deadline Exceeded"  # gRPC's own wording: our deadline, not the daemon's
    ):
        translated = DeadlineExceeded(
            f"{node_id}: daemon at {address} did not answer within {budget:.3g} s"
        )
    elif code == grpc.StatusCode.UNAVAILABLE and wrong_peer(details) == "name":
        translated = WrongDaemonIdentity(
            f"{node_id} at {address} presented a certificate that is not node/{node_id}"
        )
    elif code == grpc.StatusCode.UNAVAILABLE and wrong_peer(details) == "ca":
        translated = WrongDaemonIdentity(
            f"{node_id} at {address} presented a certificate not signed by the fleet CA "
            "(check the daemon's cert and the manager's ca_file)"
        )
    elif code == grpc.StatusCode.UNAVAILABLE and no_connection(details):
        why = _UNREACHABLE.get(cause(details))
        if why is None:
            why = f"cannot reach the daemon at {{address}}: {last_error(details)}"
        translated = Unavailable(f"{node_id}: {why.format(address=address)}")
    else:
        translated = from_rpc_error(error, target=node_id)
        resource = translated.resource
        if resource is not None and not resource.node:
            translated.resource = dataclasses.replace(resource, node=node_id)
    translated.__cause__ = error  # keep gRPC's debug string for the logs
    return translated


def wrong_peer(details: str) -> str | None:
    """Why the TLS handshake refused the peer, from an UNAVAILABLE's details: "name"
    (its certificate is not the identity dialled), "ca" (not signed by the fleet
    CA), or None (not a handshake failure)."""
    if any(m in details for m in _NOT_THAT_NODE):
        return "name"
    if any(m in details for m in _UNTRUSTED):
        return "ca"
    return None


def no_connection(details: str) -> bool:
    """gRPC's own UNAVAILABLE for a connection it could not make or keep (not the peer's)."""
    return never_sent(details) or cause(details) is Cause.CLOSED


def never_sent(details: str) -> bool:
    """gRPC's own UNAVAILABLE for a call it never sent: no connection could be made
    (refused, timed out, a TLS handshake that failed) or the name did not resolve.

    "failed to connect to all addresses" is how gRPC fails a call that found no
    ready connection to go out on; a connection closed or reset under a call
    that was sent says "Socket closed" or "Connection reset" instead.
    """
    return details.startswith("failed to connect to all addresses") or (
        cause(details) is Cause.NO_NAME
    )


@dataclass(frozen=True)
class NodeStats:
    """What the pool knows about its connection to one daemon."""

    node_id: str
    """The daemon's node id."""
    address: str | None
    """The address of its open channel, else the last one used (None: never called)."""
    state: ConnectionState
    """Connection state now."""
    calls: int
    """Pool calls made to it (a retried call counts once)."""
    failures: int
    """Pool calls that ended in an error."""
    retries: int
    """Extra attempts made by idempotent calls after UNAVAILABLE."""
    connections: int
    """Connections established to it (entries into READY)."""
    reconnects: int
    """Times a connection attempt failed or a connection dropped (entries into RECONNECTING)."""
    in_flight: int
    """Calls and log streams using its channel right now."""
    created_at: float | None
    """Pool clock reading when the open channel was created (None: no channel open)."""
    last_used: float | None
    """Pool clock reading when a call last started or ended."""
    channel_args: tuple[tuple[str, Any], ...]
    """Arguments of the open channel (empty when none is open)."""
    history: tuple[ConnectionState, ...]
    """The most recent states, oldest first, starting from IDLE."""


class NodeRecord:
    """Counters and state of one daemon; outlives its channels (idle close, eviction)."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.address: str | None = None
        self.state = ConnectionState.IDLE
        self.calls = 0
        self.failures = 0
        self.retries = 0
        self.connections = 0
        self.reconnects = 0
        self.last_used: float | None = None
        self.history: collections.deque[ConnectionState] = collections.deque(
            [ConnectionState.IDLE], maxlen=_HISTORY
        )

    def observe(self, events: tuple[ConnEvent, ...]) -> bool:
        """Apply `events`; True if the state changed."""
        before = self.state
        for state in apply(self.state, events):
            if state is ConnectionState.READY:
                self.connections += 1
            elif state is ConnectionState.RECONNECTING:
                self.reconnects += 1
            if state is not self.state:
                self.history.append(state)
            self.state = state
        return self.state is not before


class DaemonChannel:
    """The open channel to one daemon (or, in the relay's pool, one peer replica) and how
    it is being used. `stub` is the service stub made for it (DaemonService or
    ReplicaService)."""

    def __init__(
        self,
        node_id: str,
        address: str,
        channel: aio.Channel,
        stub: Any,
        args: list[tuple[str, Any]],
        now: float,
    ) -> None:
        self.node_id = node_id
        self.address = address
        self.channel = channel
        self.stub = stub
        self.args = tuple(args)
        self.created_at = now
        self.last_used = now
        self.in_flight = 0
        self.watcher: asyncio.Task[None] | None = None
        self.drained: asyncio.Event | None = None
        """Set when a retired channel's last call ends (or the pool closes)."""


def node_stats(record: NodeRecord, channel: DaemonChannel | None) -> NodeStats:
    """A snapshot of `record` and its open `channel`."""
    return NodeStats(
        node_id=record.node_id,
        address=channel.address if channel else record.address,
        state=record.state,
        calls=record.calls,
        failures=record.failures,
        retries=record.retries,
        connections=record.connections,
        reconnects=record.reconnects,
        in_flight=channel.in_flight if channel else 0,
        created_at=channel.created_at if channel else None,
        last_used=channel.last_used if channel else record.last_used,
        channel_args=channel.args if channel else (),
        history=tuple(record.history),
    )
