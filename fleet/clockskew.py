"""A host clock that disagrees with the manager's: how far, and what that costs.

The manager estimates a node's clock offset from the times its daemon stamps
on what it sends (the hello's `time`, stream or RegisterNode) against
its own receipt time; the network delay makes a node look behind by at most a
round trip, well under `SHOWN_FROM_MS`. Shared by the manager (its event and
log line) and `fleetctl nodes show`, so both say the same.
"""

from __future__ import annotations

__all__ = [
    "METRICS_MAX_FUTURE_MS",
    "SHOWN_FROM_MS",
    "clock_words",
    "offset_words",
]

METRICS_MAX_FUTURE_MS = 5 * 60 * 1000
"""A metric sample stamped further ahead of the manager's clock is refused (its batch
dropped by the daemon)."""

SHOWN_FROM_MS = 2000
"""An offset smaller than this is NTP's business and the network's, not worth a word."""


def _duration(ms: int) -> str:
    s = round(abs(ms) / 1000)  # a node ahead reads a few ms less (the hello's way here)
    if s < 60:
        return f"{abs(ms) / 1000:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s"
    return f"{s // 3600}h{(s % 3600) // 60}m"


def offset_words(offset_ms: int) -> str:
    """ "7m12s behind the manager" / "2.5s ahead of the manager"."""
    where = "behind the manager" if offset_ms < 0 else "ahead of the manager"
    return f"{_duration(offset_ms)} {where}"


def clock_words(offset_ms: int) -> str:
    """What an operator should know of a node whose clock is `offset_ms` off the
    manager's (positive: ahead): how far, what is refused or misfiled, what to do."""
    off = _duration(offset_ms)
    parts = [f"{offset_words(offset_ms)} (the times it stamps are off by as much"]
    if offset_ms > METRICS_MAX_FUTURE_MS:
        parts.append(
            f"; its metric samples are more than {_duration(METRICS_MAX_FUTURE_MS)} ahead:"
            " the manager refuses them and the daemon drops each batch, so its metrics stop"
        )
    elif offset_ms < -SHOWN_FROM_MS:
        parts.append(f"; its metric samples are stored {off} in the past")
    parts.append("); run NTP on the host")
    return "".join(parts)
