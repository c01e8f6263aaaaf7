"""`convergence.pass_gap`: poked passes are paced by their own cost (pure)."""

from __future__ import annotations

import pytest

from manager.service.convergence import pass_gap


def test_a_cheap_pass_waits_only_the_debounce() -> None:
    assert pass_gap(spent=0.002, since=0.0, debounce=0.05, pace=3.0) == 0.05


def test_an_expensive_pass_is_followed_by_pace_times_its_duration() -> None:
    # 0.2 s pass, poked at once: the next starts 0.6 s after it ended (25% of the loop).
    assert pass_gap(spent=0.2, since=0.0, debounce=0.05, pace=3.0) == pytest.approx(0.6)


def test_time_already_waited_counts() -> None:
    assert pass_gap(spent=0.2, since=0.5, debounce=0.05, pace=3.0) == pytest.approx(0.1)
    # Idle for longer than the gap (the poke came late): just the debounce.
    assert pass_gap(spent=0.2, since=5.0, debounce=0.05, pace=3.0) == 0.05


def test_steady_pokes_keep_passes_to_a_share_of_the_time() -> None:
    spent, debounce, pace = 0.3, 0.05, 3.0
    cycle = spent + pass_gap(spent=spent, since=0.0, debounce=debounce, pace=pace)
    assert spent / cycle == pytest.approx(1 / (1 + pace))
