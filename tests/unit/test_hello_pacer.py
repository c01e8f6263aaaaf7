"""`HelloPacer`: new control streams at most `rate`/s after a burst, no more in progress
than finish within `max_wait`, and a time to come back for each refused one (pure,
manual clock)."""

from __future__ import annotations

import itertools

import pytest

from manager.service.admission import MIN_RETRY, HelloPacer, Refused


def _pacer(**kw: float) -> HelloPacer:
    # The in-progress bound out of the way: these are about the ceiling.
    return HelloPacer(min_in_flight=10**9, **kw)  # type: ignore[arg-type]


def test_a_burst_goes_at_once_then_the_rate_applies() -> None:
    p = _pacer(rate=10.0, burst=3, max_wait=5.0)
    assert [p.admit(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert p.admit(0.0) == pytest.approx(0.1)
    assert p.admit(0.0) == pytest.approx(0.2)


def test_admissions_never_exceed_the_rate_over_any_window() -> None:
    rate, burst = 100.0, 20
    p = _pacer(rate=rate, burst=burst, max_wait=1e9)
    # 5,000 hellos arriving within one second: when each is admitted.
    admitted = []
    for t in (i / 5000 for i in range(5000)):
        wait = p.admit(t)
        assert not isinstance(wait, Refused)
        admitted.append(t + wait)
    admitted.sort()
    for start in range(0, len(admitted) - 1, 97):
        window = [a for a in admitted if admitted[start] <= a < admitted[start] + 1.0]
        assert len(window) <= rate + burst
    # And the herd is through in (5,000 - burst) / rate seconds, not more.
    assert admitted[-1] == pytest.approx((5000 - burst) / rate, abs=0.05)


def test_idle_time_refills_the_burst() -> None:
    p = _pacer(rate=10.0, burst=2, max_wait=5.0)
    assert [p.admit(0.0), p.admit(0.0)] == [0.0, 0.0]
    assert p.admit(0.0) == pytest.approx(0.1)
    assert [p.admit(10.0), p.admit(10.0)] == [0.0, 0.0]


def test_an_anonymous_hello_that_would_wait_too_long_is_refused_and_takes_no_slot() -> None:
    p = _pacer(rate=1.0, burst=1, max_wait=2.0)
    assert [p.admit(0.0), p.admit(0.0), p.admit(0.0)] == [0.0, 1.0, 2.0]
    refused = p.admit(0.0)
    assert isinstance(refused, Refused)
    assert refused.why == "rate"
    assert refused.retry_after == pytest.approx(3.0)  # where its slot would be
    assert isinstance(p.admit(0.0), Refused)
    assert p.admit(1.0) == pytest.approx(2.0)  # the slot at 3 s: refusals took none


def test_a_node_refused_at_the_ceiling_keeps_its_slot_for_when_it_comes_back() -> None:
    p = _pacer(rate=1.0, burst=1, max_wait=2.0)
    assert [p.admit(0.0, f"n{i}") for i in range(3)] == [0.0, 1.0, 2.0]
    refused = p.admit(0.0, "late")
    assert refused == Refused(retry_after=pytest.approx(3.0), why="rate")
    # Its slot (3 s) is taken: the next node's is at 4 s, so it is refused for then.
    other = p.admit(0.0, "later")
    assert isinstance(other, Refused)
    assert other.retry_after == pytest.approx(4.0)
    # Back early, past max_wait: refused again for the same slot, which it keeps.
    again = p.admit(0.5, "late")
    assert isinstance(again, Refused)
    assert again.retry_after == pytest.approx(2.5)
    # Back at its time: admitted at once, without spending another slot.
    assert p.admit(3.0, "late") == 0.0
    assert p.admit(4.0, "later") == 0.0
    assert p.admit(4.0, "new") == pytest.approx(1.0)  # the slot after both: 5 s


def test_a_kept_slot_lapses_after_the_grace() -> None:
    p = _pacer(rate=1.0, burst=1, max_wait=0.5, grace=2.0)
    assert p.admit(0.0, "a") == 0.0
    assert isinstance(p.admit(0.0, "b"), Refused)  # its slot at 1 s
    # 5 s later its slot is gone: it is admitted like anyone, under the ceiling.
    assert p.admit(5.0, "b") == 0.0
    assert p.admit(5.0, "c") == Refused(retry_after=pytest.approx(1.0), why="rate")


def test_no_more_in_progress_than_finish_within_max_wait() -> None:
    p = HelloPacer(rate=1000.0, burst=1000, max_wait=5.0, window=2.0, min_in_flight=4)
    # Nothing finished yet: min_in_flight are let in, the next refused.
    assert [p.admit(0.0) for _ in range(4)] == [0.0] * 4
    refused = p.admit(0.0)
    assert isinstance(refused, Refused)
    assert refused.why == "busy"
    assert refused.retry_after >= MIN_RETRY
    # 20 finish within the first second (20/s: the window counts from the first
    # admission): 100 may be in progress.
    for i in range(20):
        p.done(0.05 * i)
        assert p.admit(0.05 * i) == 0.0  # each finished one makes room for one more
    now = 1.0
    assert p.finish_rate(now) == pytest.approx(20.0)
    admitted = 0
    while not isinstance(p.admit(now), Refused):
        admitted += 1
    assert p.in_flight == 100  # 4 + 96: 100 / (20/s) = 5 s of work
    assert admitted == 96
    # 0.9 s later the same 20 are ~10.5/s: room for ~52, none now.
    assert p.finish_rate(1.9) == pytest.approx(20 / 1.9)
    assert isinstance(p.admit(1.9), Refused)
    # The window forgets: with none finished lately, no more are let in.
    assert isinstance(p.admit(10.0), Refused)


def test_the_busy_are_queued_at_the_ceilings_rate() -> None:
    p = HelloPacer(rate=100.0, burst=100, max_wait=1.0, window=2.0, min_in_flight=4)
    for _ in range(4):
        p.admit(0.0)
    for i in range(40):  # 20/s finishing; as many admitted
        p.done(i / 20)
        p.admit(i / 20)
    now = 2.0
    assert p.finish_rate(now) == pytest.approx(19.5, abs=0.5)
    while not isinstance(p.admit(now), Refused):  # fill what finishes within max_wait
        pass
    hints = []
    for _ in range(200):
        refused = p.admit(now)
        assert isinstance(refused, Refused)
        hints.append(refused.retry_after)
    # The first soon (room enough), then one after the other at the ceiling's rate.
    assert hints[0] == pytest.approx(MIN_RETRY)
    gaps = [b - a for a, b in itertools.pairwise(hints[100:])]
    assert all(g == pytest.approx(1 / 100) for g in gaps)
    # Once their times pass, they no longer count as ahead of the next one.
    later = p.admit(now + hints[-1] + 0.01)
    assert isinstance(later, Refused)
    assert later.retry_after == pytest.approx(MIN_RETRY)


def test_a_busy_refusal_does_not_keep_a_slot_and_done_never_goes_negative() -> None:
    p = HelloPacer(rate=10.0, burst=1, max_wait=1.0, min_in_flight=1)
    assert p.admit(0.0, "a") == 0.0
    refused = p.admit(0.0, "b")
    assert isinstance(refused, Refused)
    assert refused.why == "busy"
    p.done(0.1)
    p.done(0.2)  # more ends than admissions (a caller's bug): counted as none in progress
    assert p.in_flight == 0
