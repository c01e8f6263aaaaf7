"""`HelloPacer`: new control streams at most `rate`/s after a burst (pure, manual clock)."""

from __future__ import annotations

import pytest

from manager.service.admission import HelloPacer


def test_a_burst_goes_at_once_then_the_rate_applies() -> None:
    p = HelloPacer(rate=10.0, burst=3, max_wait=5.0)
    assert [p.reserve(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert p.reserve(0.0) == pytest.approx(0.1)
    assert p.reserve(0.0) == pytest.approx(0.2)


def test_admissions_never_exceed_the_rate_over_any_window() -> None:
    rate, burst = 100.0, 20
    p = HelloPacer(rate=rate, burst=burst, max_wait=1e9)
    # 5,000 hellos arriving within one second: when each is admitted.
    admitted = sorted(t + (p.reserve(t) or 0.0) for t in (i / 5000 for i in range(5000)))
    for start in range(0, len(admitted) - 1, 97):
        window = [a for a in admitted if admitted[start] <= a < admitted[start] + 1.0]
        assert len(window) <= rate + burst
    # And the herd is through in (5,000 - burst) / rate seconds, not more.
    assert admitted[-1] == pytest.approx((5000 - burst) / rate, abs=0.05)


def test_idle_time_refills_the_burst() -> None:
    p = HelloPacer(rate=10.0, burst=2, max_wait=5.0)
    assert [p.reserve(0.0), p.reserve(0.0)] == [0.0, 0.0]
    assert p.reserve(0.0) == pytest.approx(0.1)
    assert [p.reserve(10.0), p.reserve(10.0)] == [0.0, 0.0]


def test_a_hello_that_would_wait_too_long_is_refused_and_takes_no_slot() -> None:
    p = HelloPacer(rate=1.0, burst=1, max_wait=2.0)
    assert [p.reserve(0.0), p.reserve(0.0), p.reserve(0.0)] == [0.0, 1.0, 2.0]
    assert p.reserve(0.0) is None
    assert p.reserve(0.0) is None
    assert p.reserve(1.0) == pytest.approx(2.0)  # the slot at 3 s: refusals took none
