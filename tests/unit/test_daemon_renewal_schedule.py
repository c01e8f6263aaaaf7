"""When the daemon renews its certificate, and how it retries: pure functions on a manual clock."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from daemon.renewal import (
    RETRY,
    expiry_margin,
    renewal_time,
    retry_delay,
    seconds_until_renewal,
)
from fleet.retry import Backoff

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
WEEK = dt.timedelta(days=7)
EXACT = Backoff(initial=5.0, multiplier=2.0, maximum=3600.0, jitter="none")


def test_renewal_is_due_at_two_thirds_of_the_lifetime() -> None:
    """A 7-day certificate without jitter renews 4 2/3 days after it became valid."""
    assert renewal_time(T0, T0 + WEEK, 0.0) == T0 + WEEK * 2 / 3


def test_jitter_moves_renewal_at_most_five_percent_of_the_lifetime_earlier() -> None:
    """Jitter 1 renews 5% of the lifetime sooner; out-of-range jitter is clamped."""
    assert renewal_time(T0, T0 + WEEK, 1.0) == T0 + WEEK * (2 / 3 - 0.05)
    assert renewal_time(T0, T0 + WEEK, 7.0) == renewal_time(T0, T0 + WEEK, 1.0)
    assert renewal_time(T0, T0 + WEEK, -1.0) == renewal_time(T0, T0 + WEEK, 0.0)
    spread = {renewal_time(T0, T0 + WEEK, random.Random(i).random()) for i in range(20)}
    assert len(spread) == 20, "nodes enrolled together renew at different moments"
    assert all(T0 + WEEK * 0.61 < t <= T0 + WEEK * 2 / 3 for t in spread)


def test_seconds_until_renewal_count_down_on_a_manual_clock() -> None:
    """The wait shrinks as the clock moves and is 0 from the due moment on."""
    not_after = T0 + dt.timedelta(seconds=90)
    now = T0
    waits = []
    for _ in range(5):
        waits.append(seconds_until_renewal(T0, not_after, now, 0.0))
        now += dt.timedelta(seconds=20)
    assert waits == [60.0, 40.0, 20.0, 0.0, 0.0]


def test_a_certificate_found_past_its_renewal_point_is_renewed_at_once() -> None:
    """A daemon that was down past two thirds renews right away."""
    assert seconds_until_renewal(T0, T0 + WEEK, T0 + WEEK * 0.9, 0.5) == 0.0


def test_margin_is_a_tenth_of_the_lifetime_and_at_most_five_minutes() -> None:
    """Short certificates get a tenth; long ones 5 minutes."""
    assert expiry_margin(T0, T0 + dt.timedelta(seconds=60)) == dt.timedelta(seconds=6)
    assert expiry_margin(T0, T0 + WEEK) == dt.timedelta(minutes=5)


def test_retries_back_off_exponentially_up_to_an_hour() -> None:
    """Far from expiry the delays are the backoff's: 5 s doubling, capped at 1 h."""
    now = T0 + WEEK * 2 / 3
    delays = [
        retry_delay(n, not_before=T0, not_after=T0 + WEEK, now=now, backoff=EXACT)
        for n in range(12)
    ]
    assert delays[:5] == [5.0, 10.0, 20.0, 40.0, 80.0]
    assert delays[-1] == 3600.0
    assert delays == sorted(delays)


def test_a_retry_never_waits_past_expiry_minus_the_margin() -> None:
    """With 10 min left, an hour's backoff is cut to the 5 min before the margin."""
    not_after = T0 + WEEK
    now = not_after - dt.timedelta(minutes=10)
    delay = retry_delay(20, not_before=T0, not_after=not_after, now=now, backoff=EXACT)
    assert delay == 300.0


def test_past_the_margin_retries_come_at_most_a_margin_apart() -> None:
    """Within the margin or expired: retries keep coming, at most the margin apart."""
    not_after = T0 + WEEK
    for now in (not_after - dt.timedelta(minutes=1), not_after + dt.timedelta(hours=3)):
        delay = retry_delay(20, not_before=T0, not_after=not_after, now=now, backoff=EXACT)
        assert delay == 300.0


def test_full_jitter_never_retries_sooner_than_a_second() -> None:
    """A jitter draw near 0 still waits 1 s, so a failing manager is not hammered."""
    rng = random.Random(3)
    now = T0 + WEEK * 2 / 3
    delays = [
        retry_delay(0, not_before=T0, not_after=T0 + WEEK, now=now, backoff=RETRY, rng=rng)
        for _ in range(200)
    ]
    assert min(delays) == pytest.approx(1.0)
    assert max(delays) <= 5.0
