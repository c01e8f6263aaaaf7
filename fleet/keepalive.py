"""gRPC keepalive arguments, the same on every side (manager, daemon, pool, simulations)."""

from __future__ import annotations

__all__ = ["DEFAULT_PING_TIMEOUT", "keepalive_args"]

DEFAULT_PING_TIMEOUT = 60.0
"""gRPC core's own default for `grpc.http2.ping_timeout_ms`, in seconds."""


def keepalive_args(
    time_s: float, timeout_s: float, ping_timeout_s: float = DEFAULT_PING_TIMEOUT
) -> list[tuple[str, int]]:
    """Channel or server arguments for a keepalive ping every `time_s` seconds.

    Two timeouts, because gRPC core (1.85) has two: `timeout_s`
    (`grpc.keepalive_timeout_ms`) ends a connection whose kernel stops acknowledging
    TCP (a host down, a cut network: TCP_USER_TIMEOUT); `ping_timeout_s`
    (`grpc.http2.ping_timeout_ms`) ends one whose ping is not acknowledged while its
    TCP still is (the peer process stopped). The second stays long by default: a
    manager saturated by a reconnecting fleet reads acks late, and at 10 s it dropped
    healthy streams of a 10,000-node reconnect (docs/reliability.md).
    """
    return [
        ("grpc.keepalive_time_ms", round(time_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(timeout_s * 1000)),
        ("grpc.http2.ping_timeout_ms", round(ping_timeout_s * 1000)),
    ]
