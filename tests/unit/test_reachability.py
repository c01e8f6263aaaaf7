"""fleet.reachability: gRPC's UNAVAILABLE details sorted into what an operator can act on.

The details are gRPC's own, as grpcio 1.85 words them (and older resolvers'
wordings, which other builds still use).
"""

from __future__ import annotations

import pytest

from fleet.reachability import Cause, cause, last_error

REFUSED = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:38111: "
    "Failed to connect to remote host: Connection refused"
)


@pytest.mark.parametrize(
    ("details", "expected"),
    [
        (REFUSED, Cause.REFUSED),
        (
            "failed to connect to all addresses; last error: UNKNOWN: ipv6:%5B::1%5D:1: "
            "Failed to connect to remote host: Connection refused",
            Cause.REFUSED,
        ),
        (
            "errors resolving node.invalid:7443: [field:hostname lookup error:address lookup "
            "failed for node.invalid:7443: Domain name not found]",
            Cause.NO_NAME,
        ),
        (
            "DNS resolution failed for node.invalid:7443: C-ares status is not ARES_SUCCESS "
            "qtype=A name=node.invalid is_balancer=0: Domain name not found",
            Cause.NO_NAME,
        ),
        ("DNS resolution failed for x:1: Name or service not known", Cause.NO_NAME),
        (
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:32927: "
            "connection attempt timed out before receiving SETTINGS frame",
            Cause.TIMED_OUT,
        ),
        (
            "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:32927: "
            "Handshake read failed (Endpoint closing)",
            Cause.TIMED_OUT,
        ),
        (
            "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:45377: "
            "Socket closed",
            Cause.CLOSED,
        ),
        (
            "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:45377: "
            "Handshake read failed (recvmsg:Connection reset by peer (104))",
            Cause.CLOSED,
        ),
        (
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:4: "
            "Ssl handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL "
            "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED",
            Cause.TLS,
        ),
        (
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.7:7443: "
            "Failed to connect to remote host: No route to host",
            Cause.OTHER,
        ),
    ],
)
def test_cause_sorts_grpc_wordings(details: str, expected: Cause) -> None:
    """Each of gRPC's wordings is read as the cause an operator would name."""
    assert cause(details) is expected


def test_last_error_drops_grpcs_framing() -> None:
    """What is left is the cause itself, without gRPC's preamble, code and address."""
    assert last_error(REFUSED) == "Failed to connect to remote host: Connection refused"
    unreachable = REFUSED.replace("Connection refused", "No route to host")
    assert last_error(unreachable) == "Failed to connect to remote host: No route to host"
    assert last_error("daemon is warming up") == "daemon is warming up"
