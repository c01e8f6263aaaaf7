"""The agent lifecycle table: legal paths work, everything else raises."""

from __future__ import annotations

import asyncio

import pytest

from daemon.supervisor.states import (
    TRANSITIONS,
    AgentStatus,
    Event,
    IllegalTransition,
    ManualClock,
    transition,
)

S = AgentStatus
E = Event


def _walk(state: AgentStatus, *events: Event) -> AgentStatus:
    for event in events:
        state = transition(state, event)
    return state


def test_start_reaches_running_only_via_started() -> None:
    """A spawned agent is STARTING until it has stayed up start_secs."""
    assert transition(S.STOPPED, E.SPAWN) is S.STARTING
    assert _walk(S.STOPPED, E.SPAWN, E.STARTED) is S.RUNNING


def test_crash_loop_path_ends_fatal() -> None:
    """Early exits go to BACKOFF, retries to STARTING, giving up to FATAL."""
    state = _walk(S.STOPPED, E.SPAWN, E.EXITED_EARLY, E.SPAWN, E.EXITED_EARLY)
    assert state is S.BACKOFF
    assert transition(state, E.GIVE_UP) is S.FATAL
    assert transition(S.FATAL, E.SPAWN) is S.STARTING


def test_stop_paths() -> None:
    """Stopping a process goes through STOPPING; with no process straight to STOPPED."""
    assert _walk(S.RUNNING, E.STOP, E.STOPPED) is S.STOPPED
    assert _walk(S.STARTING, E.STOP, E.STOPPED) is S.STOPPED
    for idle in (S.BACKOFF, S.EXITED, S.FATAL, S.STOPPED):
        assert transition(idle, E.STOP) is S.STOPPED


def test_running_exit_and_restart() -> None:
    """A RUNNING agent that exits is EXITED and may be spawned again."""
    assert _walk(S.RUNNING, E.EXITED, E.SPAWN) is S.STARTING


def test_adopt_and_lost() -> None:
    """Re-adopted agents are RUNNING; any state can become UNKNOWN."""
    assert transition(S.STOPPED, E.ADOPT) is S.RUNNING
    for state in S:
        assert transition(state, E.LOST) is S.UNKNOWN


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (S.STOPPED, E.STARTED),
        (S.RUNNING, E.SPAWN),
        (S.STARTING, E.SPAWN),
        (S.RUNNING, E.EXITED_EARLY),
        (S.STOPPING, E.SPAWN),
        (S.STOPPED, E.GIVE_UP),
        (S.RUNNING, E.ADOPT),
        (S.STOPPING, E.STOP),
    ],
)
def test_illegal_transitions_raise(state: AgentStatus, event: Event) -> None:
    """Events that make no sense in a state raise IllegalTransition naming both."""
    with pytest.raises(IllegalTransition, match=f"{event.value} in state {state.value}"):
        transition(state, event)


def test_every_state_is_reachable_and_every_event_used() -> None:
    """The table has no dead states or unused events."""
    assert set(TRANSITIONS.values()) == set(S)
    assert {event for _, event in TRANSITIONS} == set(E)


async def test_manual_clock_wakes_sleepers_in_order() -> None:
    """ManualClock.sleep returns only once advance() passes the deadline."""
    clock = ManualClock(start=100.0)
    woke: list[float] = []

    async def sleeper(seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(clock.now())

    tasks = [asyncio.create_task(sleeper(s)) for s in (5.0, 1.0)]
    await asyncio.sleep(0)
    assert clock.sleepers == 2
    clock.advance(0.5)
    await asyncio.sleep(0)
    assert woke == []
    clock.advance(0.5)
    await asyncio.sleep(0)
    assert woke == [101.0]
    clock.advance(10)
    await asyncio.gather(*tasks)
    assert woke == [101.0, 111.0]
