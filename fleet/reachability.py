"""Why a peer could not be reached, read from gRPC's UNAVAILABLE details.

gRPC says it in its own terms ("failed to connect to all addresses; last
error: UNKNOWN: ipv4:10.0.0.7:7443: Failed to connect to remote host:
Connection refused", "errors resolving node-7.example:7443: [...] Domain
name not found"). `cause` sorts that into the few things an operator can act
on, so the manager's pool (about a daemon) and fleetctl (about the manager)
each say it in one line of words. Pure code; the wordings matched are
gRPC's (checked with grpcio 1.85: the c-ares, native and event-engine
resolvers word a failed lookup differently).
"""

from __future__ import annotations

import enum
import re

__all__ = ["Cause", "cause", "last_error"]


class Cause(enum.Enum):
    """What kept the connection from being made."""

    REFUSED = "refused"
    """Nothing listens at the address (connection refused)."""
    NO_NAME = "no-name"
    """The host name does not resolve."""
    TIMED_OUT = "timed-out"
    """The connection attempt did not complete in time."""
    CLOSED = "closed"
    """Something answered but closed or reset the connection (often: not gRPC over TLS)."""
    TLS = "tls"
    """The TLS handshake failed on a certificate."""
    OTHER = "other"
    """Anything else (no route to host, network unreachable, ...)."""


_NO_NAME = (
    "errors resolving",
    "dns resolution failed",
    "domain name not found",
    "address lookup failed",
    "name or service not known",
    "nodename nor servname",
    "temporary failure in name resolution",
)
# "Endpoint closing": gRPC gave up on a TLS handshake at its connect deadline.
_TIMED_OUT = ("timed out", "timeout", "deadline exceeded", "endpoint closing")
_CLOSED = ("socket closed", "connection reset", "broken pipe")
_TLS = ("certificate", "ssl", "tls", "hostname verification", "peer name")
_PREFIX = re.compile(
    r"^(?:failed to connect to all addresses; last error: )?"
    r"(?:[A-Z_]+: )?"  # the status gRPC gave the subchannel's failure
    r"(?:(?:ipv4|ipv6|unix|unix-abstract|dns):[^ ]*: )?"  # the address it tried
)


def cause(details: str) -> Cause:
    """What an UNAVAILABLE status's details say kept the connection from being made."""
    low = details.lower()
    if any(m in low for m in _NO_NAME):
        return Cause.NO_NAME
    if "connection refused" in low:
        return Cause.REFUSED
    if any(m in low for m in _TIMED_OUT):
        return Cause.TIMED_OUT
    if any(m in low for m in _TLS):
        return Cause.TLS
    if any(m in low for m in _CLOSED):
        return Cause.CLOSED
    return Cause.OTHER


def last_error(details: str) -> str:
    """gRPC's details without its framing: 'Failed to connect to remote host: No route to host'."""
    return _PREFIX.sub("", details.strip(), count=1) or details
