"""When the daemon process stopped running: a late tick on the monotonic clock."""

from __future__ import annotations

import time

from daemon.stalls import Stalls


def test_on_time_ticks_are_no_stall() -> None:
    s = Stalls(every=1.0, slack=5.0, now=100.0)
    for t in (101.0, 102.1, 108.0):  # up to `slack` late is scheduling, not a stall
        assert s.observe(t) is None
    assert s.stalled(108.5, within=30.0) is None


def test_a_late_tick_is_a_stall_remembered_for_a_while() -> None:
    s = Stalls(every=1.0, slack=5.0, now=100.0)
    assert s.observe(142.0) == 42.0
    for t in range(143, 173):  # ticking on time again
        assert s.observe(float(t)) is None
    assert s.stalled(172.0, within=30.0) == 42.0
    assert s.stalled(172.5, within=30.0) is None  # long ago: not what broke a stream now


def test_a_stall_not_ticked_yet_is_seen_from_the_gap() -> None:
    # The process runs again and the link handles the broken stream before the ticker's
    # late wake-up (I/O callbacks run before due timers).
    s = Stalls(every=1.0, slack=5.0, now=100.0)
    assert s.stalled(120.0, within=30.0) == 20.0
    assert s.stalled(105.5, within=30.0) is None  # not yet more than `slack` late


def test_a_new_watch_has_seen_no_stall_before_its_ticker_runs() -> None:
    # A link may ask before the ticker's first step: the process's uptime is no stall.
    assert Stalls().stalled(time.monotonic(), within=30.0) is None
