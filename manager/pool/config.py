"""Settings of the manager's pooled daemon client (`[pool]` in the manager's TOML)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from fleet.control import PIECE_BYTES
from fleet.retry import Backoff

__all__ = ["ControlConfig", "PoolConfig"]


def _default_backoff() -> Backoff:
    return Backoff(initial=0.2, multiplier=2.0, maximum=5.0, jitter="full")


@dataclass(frozen=True)
class PoolConfig:
    """How the manager talks to daemons: deadlines, keepalive, retries, pool size."""

    call_timeout: float = 30.0
    """Deadline of one pool call in seconds, retries included (the original design's 30 s).
    A following log stream has no deadline; only its start is bounded."""
    connect_timeout: float = 10.0
    """Longest a single connection attempt (TCP + TLS handshake) may take, in seconds."""
    keepalive_time: float = 60.0
    """Seconds between HTTP/2 keepalive pings on a connection with calls in flight.
    Daemons must permit pings this often (their grpc.http2.min_ping_interval_without_data_ms)."""
    keepalive_timeout: float = 20.0
    """Seconds to wait for a ping's answer before the connection is considered dead."""
    keepalive_permit_without_calls: bool = False
    """Also ping connections without calls in flight (idle channels are closed anyway)."""
    retry: Backoff = field(default_factory=_default_backoff)
    """Backoff between attempts of an idempotent call that failed with UNAVAILABLE;
    also gRPC's reconnect backoff (initial and maximum) for each channel."""
    max_attempts: int = 4
    """Attempts of an idempotent call in total (1 = never retry), within call_timeout."""
    idle_close_after: float = 300.0
    """Close a daemon's channel after this many seconds without a call."""
    max_channels: int = 1024
    """Most daemon channels open at once. A new daemon evicts the least recently
    used channel without calls in flight; when every channel is busy the call
    waits for one to free up, within its deadline, then fails RESOURCE_EXHAUSTED."""

    def validate(self) -> None:
        """Raise ValueError naming the first unusable setting."""
        for f in fields(self):
            value: Any = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{f.name} must be a positive number, got {value!r}")
        if self.retry.maximum <= 0:
            raise ValueError(f"retry.maximum must be > 0, got {self.retry.maximum!r}")


@dataclass(frozen=True)
class ControlConfig:
    """The control channel (`ManagerService.Connect`, `[control]` in the manager's TOML)."""

    keepalive_time_seconds: float = 30.0
    """The manager pings each daemon's connection this often when it is quiet."""
    keepalive_timeout_seconds: float = 10.0
    """A ping unanswered this long closes the connection: a dead daemon or a cut
    network is seen within keepalive_time + keepalive_timeout."""
    ping_timeout_seconds: float = 60.0
    """A ping unanswered this long while the connection's TCP is still acknowledged
    closes it: a daemon process stopped (SIGSTOP) or frozen is seen within
    keepalive_time + this. Long by default: a manager busy with a reconnecting fleet
    reads answers late, and a short one drops healthy streams then."""
    min_ping_interval_seconds: float = 5.0
    """Daemons may ping at most this often (their keepalive time must be >= this);
    a daemon pinging faster is sent GOAWAY by gRPC."""
    offline_grace_seconds: float = 30.0
    """After a node's stream breaks, it stays online this long for it to reconnect (and
    within the liveness failover grace of the manager's start, until that ends)."""
    liveness_refresh_seconds: float = 5.0
    """Connected nodes' last-seen is written this often (for the sweeper and other
    replicas); must be well below the liveness offline window."""
    hello_timeout_seconds: float = 10.0
    """A stream that sends no hello within this is ended (DEADLINE_EXCEEDED)."""
    max_hellos_per_second: float = 500.0
    """Ceiling on new streams admitted per second (after a burst of as many): after
    a restart the fleet reconnects at once, and the streams already open keep being
    served. A hello past it waits for its slot."""
    max_hello_wait_seconds: float = 5.0
    """A hello that would wait longer than this for its slot is refused
    RESOURCE_EXHAUSTED (the daemon backs off and comes back); below the daemons'
    own wait for the welcome (`manager.welcome_timeout_seconds`, 30 s)."""
    max_pending_answers: int = 64
    """Upward messages of one stream being handled at once; at this many the
    manager stops reading that stream (backpressure on the daemon)."""
    max_in_flight_commands: int = 256
    """Commands to one node at once; more fail RESOURCE_EXHAUSTED at once."""
    max_queued_messages: int = 256
    """Messages waiting to be written to one daemon; a command that does not fit
    fails RESOURCE_EXHAUSTED at once (the daemon is not reading)."""
    max_message_bytes: int = 16 * 1024 * 1024
    """Largest reassembled request or result message on the stream."""
    stream_credit: int = 16
    """Result messages a streaming command may have outstanding (read ahead of the caller)."""

    def validate(self) -> None:
        """Raise ValueError naming the first unusable setting."""
        for f in fields(self):
            value: Any = getattr(self, f.name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"control.{f.name}: must be a positive number, got {value!r}")
        if self.min_ping_interval_seconds > self.keepalive_time_seconds:
            raise ValueError("control.min_ping_interval_seconds: must be <= keepalive_time_seconds")
        if self.max_queued_messages * PIECE_BYTES < self.max_message_bytes:
            raise ValueError(
                "control.max_queued_messages: too small to hold one max_message_bytes request"
            )
