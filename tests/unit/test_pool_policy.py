"""The pool's pure decisions: idle channels, LRU eviction, retry delays."""

from __future__ import annotations

import random

from fleet.retry import Backoff
from manager.pool.policy import ChannelUse, eviction_victim, idle_channels, retry_delay


def test_idle_channels_are_those_unused_for_idle_after() -> None:
    """Only channels unused for at least idle_after are closed; the next due time is reported."""
    uses = [ChannelUse("a", 100.0, 0), ChannelUse("b", 150.0, 0), ChannelUse("c", 90.0, 0)]
    assert idle_channels(uses, now=189.0, idle_after=100.0) == ([], 190.0)
    assert idle_channels(uses, now=200.0, idle_after=100.0) == (["a", "c"], 250.0)


def test_busy_channels_are_never_idle() -> None:
    """A channel with a call or stream in flight stays open however old its last use."""
    uses = [ChannelUse("stream", 0.0, 1)]
    assert idle_channels(uses, now=1e9, idle_after=1.0) == ([], None)


def test_no_channels_nothing_due() -> None:
    """With no channels the reaper has nothing to wait for."""
    assert idle_channels([], now=5.0, idle_after=1.0) == ([], None)


def test_eviction_takes_the_least_recently_used_free_channel() -> None:
    """The first channel in LRU order without calls in flight is evicted; all busy gives None."""
    uses = [
        ChannelUse("old-busy", 1.0, 2),
        ChannelUse("older-free", 2.0, 0),
        ChannelUse("new", 3.0, 0),
    ]
    assert eviction_victim(uses) == "older-free"
    assert eviction_victim([ChannelUse("x", 1.0, 1)]) is None


def _delay(**kw: object) -> float | None:
    args: dict[str, object] = {
        "retryable": True,
        "attempt": 0,
        "max_attempts": 4,
        "backoff": Backoff(initial=1.0, multiplier=2.0, maximum=8.0, jitter="none"),
        "remaining": 100.0,
    }
    args.update(kw)
    return retry_delay(**args)  # type: ignore[arg-type]


def test_retry_delay_follows_the_backoff() -> None:
    """Retryable failures wait the backoff's delay for their attempt number."""
    assert [_delay(attempt=n) for n in range(3)] == [1.0, 2.0, 4.0]


def test_no_retry_for_non_retryable_errors_or_after_max_attempts() -> None:
    """Non-idempotent calls and calls out of attempts are not retried."""
    assert _delay(retryable=False) is None
    assert _delay(attempt=3, max_attempts=4) is None
    assert _delay(attempt=0, max_attempts=1) is None


def test_no_retry_that_would_end_past_the_deadline() -> None:
    """A wait that would reach the call's deadline stops the retries instead."""
    assert _delay(attempt=2, remaining=4.0) is None
    assert _delay(attempt=2, remaining=4.5) == 4.0


def test_full_jitter_stays_under_the_ceiling() -> None:
    """With full jitter every delay is between 0 and the backoff's ceiling."""
    backoff = Backoff(initial=0.5, multiplier=2.0, maximum=3.0)
    rng = random.Random(7)
    delays = [
        retry_delay(
            retryable=True, attempt=a, max_attempts=10, backoff=backoff, remaining=99, rng=rng
        )
        for a in range(8)
    ]
    assert all(d is not None and 0 <= d <= backoff.ceiling(a) for a, d in enumerate(delays))
