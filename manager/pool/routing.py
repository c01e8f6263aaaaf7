"""Which way a command goes to a node, as pure functions of plain values and `now`.

Three ways, tried in this order (`choose_transport`):

1. the node's control stream on this replica (`StreamTransport`);
2. the replica that holds the node's stream, if the shared directory says so
   and that replica is alive (`RelayTransport`, replica to replica);
3. dialling the daemon's listen address (`DialledTransport`).

A stream record is usable (`usable_route`) only if it names another replica
that refreshed its row within `stale_after`: a replica that died leaves its
records behind, and they must not send commands into the void for longer
than that. A record naming this replica is stale by definition (the stream
would be in this replica's own table if it were open). A replica that could
not be reached is not routed to again until it refreshes its row: if it died
that never happens, so its records stop counting at once instead of after
`stale_after`; if it was only out of reach for a moment, it is tried again
after its next refresh.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Route", "Via", "choose_transport", "usable_route"]


@dataclass(frozen=True)
class Route:
    """Another replica holding a node's control stream, and where to reach it."""

    replica_id: str
    """The replica's manager certificate name (checked in the TLS handshake)."""
    address: str
    """host:port of its main gRPC port."""
    epoch: int = 0
    """The stream record's epoch (a newer stream of the node has a higher one)."""
    replica_seen_ms: int = 0
    """When the replica last refreshed its row, as read with the record (its clock)."""

    def same_record(self, other: Route | None) -> bool:
        """Whether `other` was read from the same stream record (same replica and epoch)."""
        return (
            other is not None and other.replica_id == self.replica_id and other.epoch == self.epoch
        )


class Via(enum.Enum):
    """How one command reaches its node."""

    STREAM = "stream"
    """The node's control stream on this replica."""
    RELAY = "relay"
    """Forwarded to the replica holding the node's stream."""
    DIAL = "dial"
    """The daemon's own listen address."""
    NOWHERE = "nowhere"
    """No stream anywhere known and no listen address: UNAVAILABLE (the daemon is down or
    between two streams; it may be back in a moment)."""


def choose_transport(*, local_stream: bool, route: Route | None, address: str) -> Via:
    """How to reach a node: its stream here, else its stream's replica, else its address."""
    if local_stream:
        return Via.STREAM
    if route is not None:
        return Via.RELAY
    if address:
        return Via.DIAL
    return Via.NOWHERE


def usable_route(
    *,
    replica_id: str,
    replica_address: str,
    replica_last_seen_ms: int,
    self_id: str,
    now_ms: int,
    stale_after_ms: int,
    epoch: int = 0,
    unreachable_seen_ms: int | None = None,
) -> Route | None:
    """The route a stream record gives, or None if it must be ignored.

    Ignored: a record naming this replica (`self_id`), one whose replica has
    no row (it stopped) or no address, one whose replica has not refreshed
    its row for more than `stale_after_ms` (it died; its nodes reconnect
    elsewhere), and one whose replica could not be reached when its row said
    `unreachable_seen_ms` and has not refreshed it since. A last-seen in the
    future (clock skew between replicas) counts as fresh.
    """
    if replica_id == self_id or not replica_address:
        return None
    if now_ms - replica_last_seen_ms > stale_after_ms:
        return None
    if unreachable_seen_ms is not None and replica_last_seen_ms <= unreachable_seen_ms:
        return None
    return Route(replica_id, replica_address, epoch, replica_last_seen_ms)
