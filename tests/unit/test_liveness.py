"""Pure liveness decisions: interval scaling, jitter, offline cutoff, failover grace."""

from __future__ import annotations

import random

import pytest

from manager.service.liveness import (
    STEP_TOLERANCE,
    LivenessPolicy,
    StepWatch,
    TtlHighWater,
    clock_step,
    heartbeat_ttl,
    jittered_interval,
    offline_after,
    stream_refresh_interval,
    sweep_cutoff,
)

POLICY = LivenessPolicy(min_ttl=10.0, max_rate=100.0, jitter=0.1, grace=10.0, failover_grace=60.0)


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [(0, 10.0), (1, 10.0), (1000, 10.0), (1001, 10.01), (5000, 50.0), (100_000, 1000.0)],
)
def test_ttl_is_min_ttl_until_the_rate_ceiling_binds(nodes: int, expected: float) -> None:
    """ttl = max(min_ttl, nodes / max_rate): small fleets get min_ttl, big ones a longer one."""
    assert heartbeat_ttl(nodes, 10.0, 100.0) == pytest.approx(expected)


def test_total_heartbeat_rate_never_exceeds_the_ceiling() -> None:
    """Whatever the fleet size, nodes / interval stays at or under max_rate."""
    rng = random.Random(1)
    for nodes in (1, 10, 999, 1000, 1001, 50_000, 1_000_000):
        ttl = heartbeat_ttl(nodes, POLICY.min_ttl, POLICY.max_rate)
        shortest = min(jittered_interval(ttl, POLICY.jitter, rng) for _ in range(200))
        assert nodes / shortest <= POLICY.max_rate + 1e-9


def test_jitter_spreads_intervals_within_ttl_and_ttl_times_one_plus_jitter() -> None:
    """Intervals are spread over [ttl, ttl * (1 + jitter)], not all equal."""
    rng = random.Random(7)
    values = [jittered_interval(10.0, 0.1, rng) for _ in range(1000)]
    assert min(values) >= 10.0
    assert max(values) <= 11.0
    assert max(values) - min(values) > 0.5


def test_bad_knobs_are_refused() -> None:
    """A zero min_ttl or rate is a ValueError, not a division by zero later."""
    with pytest.raises(ValueError, match="positive"):
        heartbeat_ttl(10, 0.0, 100.0)
    with pytest.raises(ValueError, match="positive"):
        heartbeat_ttl(10, 10.0, 0.0)


def test_offline_after_longest_interval_plus_grace() -> None:
    """A node is offline only after missing the longest interval it could hold, plus grace."""
    assert offline_after(10.0, POLICY) == pytest.approx(10.0 * 1.1 + 10.0)


def test_no_cutoff_during_failover_grace() -> None:
    """Right after the sweeper starts nobody can be marked offline."""
    assert sweep_cutoff(now=1059.0, active_since=1000.0, ttl=10.0, policy=POLICY) is None


def test_cutoff_after_failover_grace() -> None:
    """After the failover grace the cutoff is now - (ttl * (1 + jitter) + grace)."""
    cutoff = sweep_cutoff(now=1060.0, active_since=1000.0, ttl=10.0, policy=POLICY)
    assert cutoff == pytest.approx(1060.0 - 21.0)


def test_high_water_keeps_a_shrunk_ttl_until_nodes_could_have_adopted_it() -> None:
    """After the fleet shrinks, the sweeper still honours the longer interval nodes hold."""
    hw = TtlHighWater()
    hw.note(50.0, now=100.0, policy=POLICY)
    hw.note(10.0, now=101.0, policy=POLICY)  # fleet shrank: smaller ttl handed out
    assert hw.effective(110.0, POLICY) == 50.0
    assert hw.effective(100.0 + offline_after(50.0, POLICY) + 1, POLICY) == 0.0


def test_high_water_follows_the_latest_larger_ttl() -> None:
    """A larger ttl handed out later replaces the recorded one."""
    hw = TtlHighWater()
    hw.note(10.0, now=0.0, policy=POLICY)
    hw.note(20.0, now=5.0, policy=POLICY)
    assert hw.effective(6.0, POLICY) == 20.0


def test_stream_refresh_keeps_the_configured_interval_in_a_long_window() -> None:
    """With the default 21 s window the configured 5 s refresh stands."""
    assert stream_refresh_interval(5.0, POLICY) == 5.0


def test_stream_refresh_shrinks_to_a_third_of_a_short_window() -> None:
    """A 3 s offline window (min_ttl 1, grace 2) is refreshed every second, not every 5 s."""
    short = LivenessPolicy(min_ttl=1.0, max_rate=100.0, jitter=0.0, grace=2.0, failover_grace=3.0)
    assert stream_refresh_interval(5.0, short) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("wall", "mono", "step"),
    [
        (1.0, 1.0, 0.0),  # time passed
        (30.0, 30.0, 0.0),  # a stall of the process moves both clocks
        (1.0 + STEP_TOLERANCE, 1.0, 0.0),  # slewing, within the tolerance
        (3601.0, 1.0, 3600.0),  # +1 h
        (-599.0, 1.0, -600.0),  # -10 min
        (3600.0, 0.0, 3600.0),  # a suspended VM: the monotonic clock stood still
    ],
)
def test_clock_step_is_the_wall_clocks_advance_past_the_monotonic_one(
    wall: float, mono: float, step: float
) -> None:
    assert clock_step(wall_then=0.0, mono_then=0.0, wall_now=wall, mono_now=mono) == step


def test_step_watch_reports_each_step_once() -> None:
    watch = StepWatch()
    assert watch.observe(1_700_000_000.0, 50.0) == 0.0  # the first reading
    assert watch.observe(1_700_000_001.0, 51.0) == 0.0
    assert watch.observe(1_700_003_602.0, 52.0) == 3600.0
    assert watch.observe(1_700_003_603.0, 53.0) == 0.0  # re-based on the new time
    assert watch.observe(1_700_003_004.0, 54.0) == -600.0
