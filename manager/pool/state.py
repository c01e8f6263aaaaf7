"""Per-daemon connection state: the original design's state machine, as a table.

::

    IDLE ──CONNECT──▶ CONNECTING ──CONNECTED──▶ READY ──CLOSE──▶ IDLE
                        │    ▲                    │
                   FAILED    RETRY             FAILED (connection dropped)
                        ▼    │                    │
                      RECONNECTING ◀──────────────┘
                        │
                   GIVE_UP (max retries) / CLOSE ──▶ IDLE

The rows of the original design are kept as they were; the rows marked
"added" cover what a real gRPC channel also does (closing a channel that is
still connecting, a connection dropping while READY).

`events_for` maps what the gRPC channel reports (its connectivity) to the
events that lead there from the state we hold. A watcher can miss fast
intermediate states, so it synthesises the path (IDLE seeing READY is
CONNECT then CONNECTED). It is total: every (state, connectivity) pair gives
events that `transition` accepts, which a unit test checks exhaustively.
Pure code, no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import grpc

__all__ = [
    "ConnEvent",
    "ConnectionState",
    "IllegalTransition",
    "apply",
    "events_for",
    "transition",
]


class ConnectionState(enum.Enum):
    """The manager's connection to one daemon (fleet.v1 ConnectionState)."""

    IDLE = "idle"
    """No connection: never used, closed after being idle, or given up."""
    CONNECTING = "connecting"
    """A connection attempt (TCP + TLS handshake) is under way."""
    READY = "ready"
    """Connected; calls go out immediately."""
    RECONNECTING = "reconnecting"
    """The last attempt failed (or the connection dropped); retrying with backoff."""


class ConnEvent(enum.Enum):
    """What happened to a daemon's connection."""

    CONNECT = "connect"
    """A call (or the channel) started a connection attempt."""
    CONNECTED = "connected"
    """The attempt succeeded: TCP, TLS and the daemon's identity check."""
    FAILED = "failed"
    """The attempt failed, or an established connection dropped."""
    RETRY = "retry"
    """The backoff elapsed; the next attempt starts."""
    GIVE_UP = "give_up"
    """A call used up its attempts against an unreachable daemon; the channel is closed."""
    CLOSE = "close"
    """The channel or its connection was closed (idle, evicted, replaced, pool closed)."""


class IllegalTransition(ValueError):
    """An event that cannot happen in the current state: a bug in the caller."""


_S = ConnectionState
_E = ConnEvent

TABLE: dict[tuple[ConnectionState, ConnEvent], ConnectionState] = {
    # The original design's diagram.
    (_S.IDLE, _E.CONNECT): _S.CONNECTING,
    (_S.CONNECTING, _E.CONNECTED): _S.READY,
    (_S.CONNECTING, _E.FAILED): _S.RECONNECTING,
    (_S.RECONNECTING, _E.RETRY): _S.CONNECTING,
    (_S.RECONNECTING, _E.GIVE_UP): _S.IDLE,
    (_S.READY, _E.CLOSE): _S.IDLE,
    # Added: a channel can be closed in any state, closing an idle one is a no-op.
    (_S.IDLE, _E.CLOSE): _S.IDLE,
    (_S.CONNECTING, _E.CLOSE): _S.IDLE,
    (_S.RECONNECTING, _E.CLOSE): _S.IDLE,
    # Added: a READY connection that drops while gRPC reconnects right away.
    (_S.READY, _E.FAILED): _S.RECONNECTING,
}
"""(state, event) -> next state. Anything not listed is illegal."""


def transition(state: ConnectionState, event: ConnEvent) -> ConnectionState:
    """The state after `event` in `state`; raises IllegalTransition if it cannot happen."""
    try:
        return TABLE[(state, event)]
    except KeyError:
        raise IllegalTransition(
            f"connection event {event.value!r} cannot happen in state {state.value!r}"
        ) from None


def apply(state: ConnectionState, events: Iterable[ConnEvent]) -> list[ConnectionState]:
    """The states visited by applying `events` in order (not including `state`)."""
    visited = []
    for event in events:
        state = transition(state, event)
        visited.append(state)
    return visited


_C = grpc.ChannelConnectivity

_EVENTS: dict[tuple[ConnectionState, grpc.ChannelConnectivity], tuple[ConnEvent, ...]] = {
    # gRPC reports IDLE when a connection drops or before the first call.
    (_S.IDLE, _C.IDLE): (),
    (_S.CONNECTING, _C.IDLE): (_E.CLOSE,),
    (_S.READY, _C.IDLE): (_E.CLOSE,),
    (_S.RECONNECTING, _C.IDLE): (_E.CLOSE,),
    (_S.IDLE, _C.CONNECTING): (_E.CONNECT,),
    (_S.CONNECTING, _C.CONNECTING): (),
    (_S.READY, _C.CONNECTING): (_E.FAILED, _E.RETRY),
    (_S.RECONNECTING, _C.CONNECTING): (_E.RETRY,),
    (_S.IDLE, _C.READY): (_E.CONNECT, _E.CONNECTED),
    (_S.CONNECTING, _C.READY): (_E.CONNECTED,),
    (_S.READY, _C.READY): (),
    # gRPC's pick_first stays in TRANSIENT_FAILURE while it retries
    # ("sticky"), so a success after failures is RETRY then CONNECTED.
    (_S.RECONNECTING, _C.READY): (_E.RETRY, _E.CONNECTED),
    (_S.IDLE, _C.TRANSIENT_FAILURE): (_E.CONNECT, _E.FAILED),
    (_S.CONNECTING, _C.TRANSIENT_FAILURE): (_E.FAILED,),
    (_S.READY, _C.TRANSIENT_FAILURE): (_E.FAILED,),
    (_S.RECONNECTING, _C.TRANSIENT_FAILURE): (),
    (_S.IDLE, _C.SHUTDOWN): (),
    (_S.CONNECTING, _C.SHUTDOWN): (_E.CLOSE,),
    (_S.READY, _C.SHUTDOWN): (_E.CLOSE,),
    (_S.RECONNECTING, _C.SHUTDOWN): (_E.CLOSE,),
}


def events_for(
    state: ConnectionState, connectivity: grpc.ChannelConnectivity
) -> tuple[ConnEvent, ...]:
    """The events that take `state` to what a channel reporting `connectivity` is in."""
    return _EVENTS[(state, connectivity)]
