"""The pool's connection state machine: the original design's table, and gRPC's mapping onto it."""

from __future__ import annotations

import itertools

import grpc
import pytest

from manager.pool.state import (
    TABLE,
    ConnectionState,
    ConnEvent,
    IllegalTransition,
    apply,
    events_for,
    transition,
)

S = ConnectionState
E = ConnEvent
C = grpc.ChannelConnectivity

ORIGINAL = [
    (S.IDLE, E.CONNECT, S.CONNECTING),
    (S.CONNECTING, E.CONNECTED, S.READY),
    (S.CONNECTING, E.FAILED, S.RECONNECTING),
    (S.RECONNECTING, E.RETRY, S.CONNECTING),
    (S.RECONNECTING, E.GIVE_UP, S.IDLE),
    (S.READY, E.CLOSE, S.IDLE),
]


@pytest.mark.parametrize(("state", "event", "after"), ORIGINAL)
def test_original_design_transitions(state: S, event: E, after: S) -> None:
    """Every arrow of the original design's diagram is in the table unchanged."""
    assert transition(state, event) is after


def test_close_from_any_state_is_idle() -> None:
    """Closing a channel in any state leaves the daemon IDLE."""
    assert {transition(s, E.CLOSE) for s in S} == {S.IDLE}


@pytest.mark.parametrize(
    ("state", "event"),
    [(s, e) for s, e in itertools.product(S, E) if (s, e) not in TABLE],
)
def test_events_that_cannot_happen_raise(state: S, event: E) -> None:
    """An event the table does not list raises, naming the event and the state."""
    with pytest.raises(IllegalTransition, match=f"{event.value!r} cannot happen in state"):
        transition(state, event)


def test_ready_cannot_be_reached_without_connecting() -> None:
    """IDLE never jumps to READY, and RECONNECTING goes through CONNECTING first."""
    with pytest.raises(IllegalTransition):
        transition(S.IDLE, E.CONNECTED)
    with pytest.raises(IllegalTransition):
        transition(S.RECONNECTING, E.CONNECTED)


EXPECTED = {
    C.IDLE: S.IDLE,
    C.CONNECTING: S.CONNECTING,
    C.READY: S.READY,
    C.TRANSIENT_FAILURE: S.RECONNECTING,
    C.SHUTDOWN: S.IDLE,
}


@pytest.mark.parametrize(("state", "connectivity"), list(itertools.product(S, C)))
def test_every_channel_report_leads_to_its_state(state: S, connectivity: C) -> None:
    """From any state, each connectivity maps to legal events ending in its matching state."""
    visited = apply(state, events_for(state, connectivity))
    assert (visited[-1] if visited else state) is EXPECTED[connectivity]


def test_missed_intermediate_states_are_filled_in() -> None:
    """States a watcher missed are filled in: IDLE seeing READY passes CONNECTING."""
    assert apply(S.IDLE, events_for(S.IDLE, C.READY)) == [S.CONNECTING, S.READY]
    assert apply(S.RECONNECTING, events_for(S.RECONNECTING, C.READY)) == [S.CONNECTING, S.READY]
    assert apply(S.IDLE, events_for(S.IDLE, C.TRANSIENT_FAILURE)) == [
        S.CONNECTING,
        S.RECONNECTING,
    ]


def test_dropped_ready_connection() -> None:
    """A READY connection that drops goes IDLE (gRPC's report) or RECONNECTING (failing)."""
    assert apply(S.READY, events_for(S.READY, C.IDLE)) == [S.IDLE]
    assert apply(S.READY, events_for(S.READY, C.TRANSIENT_FAILURE)) == [S.RECONNECTING]
