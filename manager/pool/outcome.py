"""When the way to a node fails under a call: may the pool send the call again?

A call over a control stream or a relay can fail because the *way* failed
rather than because the daemon answered: the node's stream closed (the
daemon restarted, the network broke), or the replica holding the stream
could not be reached. Such a failure is a `TransportFailed`, and it says
whether the daemon may have received the command:

    =====================================================  ===============
    what failed                                            delivered
    =====================================================  ===============
    the stream closed before the command's last piece      no
    left this manager (still in its send queue)
    the stream closed after that                           maybe
    the connection to the peer replica was never made      no
    (refused, name not resolved, connect timeout, TLS
    refused the peer: gRPC sent nothing)
    the peer answered that the stream is not there         no
    (it checks before sending anything)
    the connection to the peer closed under the call,      maybe
    or the peer's own stream closed after sending
    =====================================================  ===============

The rule (`may_send_again`): a call is sent once more, another way, if it
is idempotent (ListAgents, GetAgentMetrics, start/stop, StartJob,
CancelJob, the start of a log read: the pool's retry table) or if it was
certainly not delivered. Anything else fails UNAVAILABLE saying that the
outcome is unknown (`outcome_unknown`): a restart or a PushUpdate that may
have run is never sent twice. An answer from the daemon, even UNAVAILABLE,
is not a `TransportFailed`; nor is the caller's deadline passing.

Over ReplicaService the holding replica says which kind it was in one
trailing metadata entry (`LOST_KEY`), so the relaying replica decides with
the same rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fleet.errors import Resource, Unavailable

__all__ = [
    "LOST_KEY",
    "TransportFailed",
    "lost_from_metadata",
    "may_send_again",
    "outcome_unknown",
]

LOST_KEY = "fleet-transport-failed"
"""Trailing metadata of a ReplicaService error that is a `TransportFailed` on the holding
replica: "undelivered" or "maybe-delivered". Absent: an answer (passed through as is)."""

_UNDELIVERED = "undelivered"
_MAYBE = "maybe-delivered"


class TransportFailed(Unavailable):
    """The way to the node failed under a call, not the daemon: its control stream
    closed, or the replica holding that stream could not be reached.

    `delivered` is False only when the daemon certainly never received the
    command, so any call may be sent again; True when it may have run, so
    only an idempotent one may. The pool does that by itself (see
    `manager.pool.outcome`); a caller seeing this error may retry an
    idempotent call.
    """

    def __init__(self, message: str, *, delivered: bool, resource: Resource | None = None) -> None:
        super().__init__(message, resource=resource)
        self.delivered = delivered

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """As ReplicaService trailing metadata (beside the Resource's, if any)."""
        about = self.resource.metadata() if self.resource is not None else ()
        return (*about, (LOST_KEY, _MAYBE if self.delivered else _UNDELIVERED))


def lost_from_metadata(metadata: Iterable[Any] | None) -> bool | None:
    """From a ReplicaService error's trailing metadata ((key, value) pairs): None if the
    error is an answer, else whether the failed command may have been delivered."""
    for key, value in metadata or ():
        if key == LOST_KEY:
            return str(value) != _UNDELIVERED
    return None


def may_send_again(*, idempotent: bool, delivered: bool) -> bool:
    """Whether a call whose way failed may be sent once more, another way."""
    return idempotent or not delivered


def outcome_unknown(error: TransportFailed, method: str) -> Unavailable:
    """The error for a call that may have run and must not be sent twice."""
    return Unavailable(
        f"{error.message}; {method} was in flight, so whether it ran on the node is unknown "
        "and it was not sent again: check the node before repeating it",
        resource=error.resource,
    )
