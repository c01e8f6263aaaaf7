"""Pure decisions of the pool: idle channels, which one to evict, when to retry.

They take plain values and `now`, so their tests need no channel and no clock.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from fleet.retry import Backoff

__all__ = ["ChannelUse", "eviction_victim", "idle_channels", "retry_delay"]


@dataclass(frozen=True)
class ChannelUse:
    """How one open channel is being used, as the policies see it."""

    node_id: str
    """The daemon the channel belongs to."""
    last_used: float
    """Clock reading when a call last started or ended on it."""
    in_flight: int
    """Calls (and open log streams) currently using it."""


def idle_channels(
    uses: Iterable[ChannelUse], *, now: float, idle_after: float
) -> tuple[list[str], float | None]:
    """Channels to close now, and when the next one will be due (None: none open).

    A channel with calls in flight is never idle (a followed log stream can
    last hours); it becomes a candidate again once its last call ends.
    """
    expired: list[str] = []
    next_due: float | None = None
    for use in uses:
        if use.in_flight:
            continue
        due = use.last_used + idle_after
        if due <= now:
            expired.append(use.node_id)
        elif next_due is None or due < next_due:
            next_due = due
    return expired, next_due


def eviction_victim(uses_lru_first: Iterable[ChannelUse]) -> str | None:
    """The least recently used channel without calls in flight, or None if all are busy."""
    for use in uses_lru_first:
        if not use.in_flight:
            return use.node_id
    return None


def retry_delay(
    *,
    retryable: bool,
    attempt: int,
    max_attempts: int,
    backoff: Backoff,
    remaining: float,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds to wait before attempt `attempt + 1`, or None to stop and raise.

    Stops for errors that are not retryable (non-idempotent call, anything but
    UNAVAILABLE), after `max_attempts` attempts, and when the wait would end at
    or past the call's deadline (`remaining` seconds away).
    """
    if not retryable or attempt + 1 >= max_attempts:
        return None
    delay = backoff.delay(attempt, rng)
    return delay if delay < remaining else None
