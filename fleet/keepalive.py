"""gRPC keepalive arguments, the same on every side (manager, daemon, pool, simulations)."""

from __future__ import annotations

__all__ = ["keepalive_args"]


def keepalive_args(time_s: float, timeout_s: float) -> list[tuple[str, int]]:
    """Channel or server arguments for a keepalive ping every `time_s` seconds that must be
    answered within `timeout_s`.

    `grpc.http2.ping_timeout_ms` as well as `grpc.keepalive_timeout_ms`: gRPC core (1.85)
    times an unanswered keepalive ping out after the former (60 s by default) when the
    peer's kernel still acknowledges TCP, i.e. its process is stopped or hung rather than
    its host or network gone (those end the connection at `keepalive_timeout` through
    TCP_USER_TIMEOUT). Without it a SIGSTOP'd daemon stayed online, and a hung manager
    kept its daemons, for a minute.
    """
    timeout_ms = round(timeout_s * 1000)
    return [
        ("grpc.keepalive_time_ms", round(time_s * 1000)),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.ping_timeout_ms", timeout_ms),
    ]
