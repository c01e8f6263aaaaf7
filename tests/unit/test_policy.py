"""Backoff delays and restart decisions after an exit (pure, no processes)."""

from __future__ import annotations

import random

import pytest

from daemon.supervisor.policy import (
    STALL_SLACK,
    Action,
    LastExit,
    backoff_delay,
    decide_after_exit,
    exit_of_process,
    woke_stalled,
)
from daemon.supervisor.spec import AgentSpec, BackoffSpec


def _spec(**kw: object) -> AgentSpec:
    return AgentSpec(id="a", argv=("/bin/true",), **kw)  # type: ignore[arg-type]


def test_backoff_grows_exponentially_and_caps_without_jitter() -> None:
    """initial * multiplier**attempt, never above max."""
    b = BackoffSpec(initial=1.0, multiplier=2.0, max=10.0, jitter=0.0)
    assert [backoff_delay(i, b) for i in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_backoff_huge_attempt_does_not_overflow() -> None:
    """A very long crash loop still yields the cap, not an OverflowError."""
    b = BackoffSpec(initial=1.0, multiplier=10.0, max=30.0, jitter=0.0)
    assert backoff_delay(10_000, b) == 30.0


def test_backoff_jitter_stays_within_fraction() -> None:
    """Jitter only takes up to `jitter` of the delay off and does vary it."""
    b = BackoffSpec(initial=4.0, multiplier=2.0, max=60.0, jitter=0.5)
    rng = random.Random(7)
    delays = [backoff_delay(1, b, rng) for _ in range(200)]
    assert all(4.0 <= d <= 8.0 for d in delays)
    assert len({round(d, 6) for d in delays}) > 100


def test_early_exit_backs_off_then_goes_fatal() -> None:
    """Exits before start_secs back off, and max_retries+1 of them in a row are FATAL."""
    spec = _spec(max_retries=2, start_secs=1.0, backoff=BackoffSpec(jitter=0.0))
    first = decide_after_exit(spec, 1, ran_for=0.1, retries=0)
    assert (first.action, first.delay, first.retries) == (Action.BACKOFF, 1.0, 1)
    assert "exited too quickly (exit code 1)" in first.message
    second = decide_after_exit(spec, 1, ran_for=0.1, retries=first.retries)
    assert (second.action, second.delay, second.retries) == (Action.BACKOFF, 2.0, 2)
    third = decide_after_exit(spec, 1, ran_for=0.1, retries=second.retries)
    assert third.action is Action.FATAL
    assert "3 times in a row" in third.message


def test_early_clean_exit_of_a_one_shot_is_exited() -> None:
    """A quick exit with an expected code is not retried unless restart is always."""
    assert decide_after_exit(_spec(), 0, ran_for=0.01, retries=0).action is Action.EXIT
    quick_always = decide_after_exit(_spec(restart="always"), 0, ran_for=0.01, retries=0)
    assert quick_always.action is Action.BACKOFF


@pytest.mark.parametrize(
    ("restart", "code", "action"),
    [
        ("always", 0, Action.RESTART),
        ("always", 3, Action.RESTART),
        ("on-failure", 0, Action.EXIT),
        ("on-failure", 3, Action.RESTART),
        ("on-failure", -9, Action.RESTART),
        ("never", 3, Action.EXIT),
    ],
)
def test_restart_policy_after_running(restart: str, code: int, action: Action) -> None:
    """After start_secs the restart policy and expected codes decide, retries reset."""
    decision = decide_after_exit(_spec(restart=restart), code, ran_for=5.0, retries=4)
    assert decision.action is action
    assert decision.retries == 0


def test_expected_codes_are_configurable() -> None:
    """An exit code listed in expected_exit_codes is a clean exit for on-failure."""
    spec = _spec(expected_exit_codes=(0, 3))
    assert decide_after_exit(spec, 3, ran_for=5.0, retries=0).action is Action.EXIT


def test_readopted_exit_is_unknown_and_counts_as_failure() -> None:
    """A re-adopted agent's exit code is unknown: on-failure restarts it and says so."""
    decision = decide_after_exit(_spec(), -1, ran_for=50.0, retries=0, adopted=True)
    assert decision.action is Action.RESTART
    assert "exit code unknown: agent was re-adopted" in decision.message


def test_signal_death_is_described() -> None:
    """Death by signal names the signal."""
    decision = decide_after_exit(_spec(restart="never"), -9, ran_for=5.0, retries=0)
    assert decision.message == "exited (killed by SIGKILL)"


def test_spawn_failure_is_a_failed_start_even_with_restart_never() -> None:
    """No process at all (exec failed) backs off and says why, whatever the policy."""
    decision = decide_after_exit(
        _spec(restart="never"), -1, ran_for=0.0, retries=0, spawn_error="no such file"
    )
    assert decision.action is Action.BACKOFF
    assert decision.message.startswith("cannot start: no such file; retry 1/5")


@pytest.mark.parametrize(
    ("code", "adopted", "last"),
    [
        (3, False, LastExit("exited", 3, "exited with code 3", 10.0)),
        (0, False, LastExit("exited", 0, "exited with code 0", 10.0)),
        (-9, False, LastExit("killed", -9, "killed by SIGKILL", 10.0)),
        (-77, False, LastExit("killed", -77, "killed by signal 77", 10.0)),
        (
            -1,
            True,
            LastExit(
                "unknown", -1, "exited; code unknown (re-adopted after a daemon restart)", 10.0
            ),
        ),
    ],
)
def test_the_last_exit_of_a_process_in_words(code: int, adopted: bool, last: LastExit) -> None:
    """A code reads "exited with code N", a signal "killed by SIGNAME"; a re-adopted one unknown."""
    assert exit_of_process(code, 10.0, adopted=adopted) == last


def test_a_watchdog_woken_past_the_slack_is_a_stall_of_the_daemon_not_the_agent() -> None:
    assert not woke_stalled(100.0, 100.0)
    assert not woke_stalled(100.0, 100.0 + STALL_SLACK)  # a busy loop, late but running
    assert woke_stalled(100.0, 100.0 + STALL_SLACK + 0.1)
