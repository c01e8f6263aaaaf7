"""How a failed relay is read: the peer's answer, or the way to the node failing (and
whether the command may have been delivered), from gRPC's status and trailers."""

from __future__ import annotations

import grpc
import pytest
from grpc import aio

from fleet import errors
from manager.pool.outcome import TransportFailed
from manager.pool.relay import PeerUnreachable, translate_relay_error
from manager.pool.routing import Route

MB = Route("mb", "10.0.0.12:7443", epoch=3, replica_seen_ms=1_000)
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
REFUSED = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.12:7443: "
    "Failed to connect to remote host: Connection refused"
)


def relay_error(
    details: str, code: grpc.StatusCode = UNAVAILABLE, **trailers: str
) -> errors.FleetError:
    """What the relay makes of a call to n1 through MB that ended with this status."""
    trailing = aio.Metadata(*((k.replace("_", "-"), v) for k, v in trailers.items()))
    rpc = aio.AioRpcError(code, aio.Metadata(), trailing, details, None)
    return translate_relay_error(rpc, node_id="n1", route=MB, budget=30.0)


@pytest.mark.parametrize(
    ("details", "delivered", "words"),
    [
        (REFUSED, False, "which refused the connection"),  # nothing was sent
        (
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.12:7443: "
            "Peer name mb.manager.fleet.local is not in peer certificate",
            False,
            "whose certificate is not manager/mb",
        ),
        ("Socket closed", True, "which closed or reset the connection"),  # sent, then cut
        ("Connection reset by peer", True, "which closed or reset the connection"),
    ],
)
def test_a_peer_that_cannot_be_reached_is_a_transport_failure(
    details: str, delivered: bool, words: str
) -> None:
    """Our connection to the peer failed: PeerUnreachable, naming the peer in words,
    undelivered only if gRPC never sent the call."""
    err = relay_error(details)
    assert isinstance(err, PeerUnreachable)
    assert err.route == MB
    assert err.delivered is delivered
    assert err.message.startswith("n1: its control stream is ")
    assert words in err.message


def test_the_peers_own_failure_is_read_from_its_trailer_whatever_it_quotes() -> None:
    """The holding replica's stream broke (its message quoting gRPC's "Socket closed"):
    a TransportFailed with its words and delivery mark, not our connection to it."""
    err = relay_error(
        "n1: the node's control stream closed (the stream broke: Socket closed)",
        fleet_transport_failed="maybe-delivered",
    )
    assert type(err) is TransportFailed
    assert err.delivered
    assert err.message == "n1: the node's control stream closed (the stream broke: Socket closed)"
    not_here = relay_error(
        "n1: its control stream is not on manager replica mb (it closed or moved to another "
        "replica); try again",
        fleet_transport_failed="undelivered",
    )
    assert type(not_here) is TransportFailed
    assert not not_here.delivered


def test_an_answer_from_the_daemon_passes_through_as_is() -> None:
    """The daemon's own errors, even UNAVAILABLE, are answers: never a transport failure."""
    missing = relay_error(
        "n1: no agent 'absent'",
        grpc.StatusCode.NOT_FOUND,
        fleet_resource_kind="agent",
        fleet_resource_name="absent",
        fleet_resource_node="n1",
    )
    assert type(missing) is errors.NotFound
    assert missing.resource == errors.Resource("agent", "absent", "n1")
    busy = relay_error("n1: the daemon is restarting its supervisor")
    assert type(busy) is errors.Unavailable
