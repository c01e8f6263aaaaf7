"""An agent's lifecycle as one pure table (h11's style, supervisord's states).

::

    STOPPED/EXITED/FATAL/BACKOFF ──SPAWN──▶ STARTING
    STARTING ──STARTED (stayed up start_secs)──▶ RUNNING
    STARTING ──EXITED_EARLY / SPAWN_FAILED──▶ BACKOFF ──GIVE_UP──▶ FATAL
    STARTING ──EXITED──▶ EXITED      (a one-shot that finished cleanly, not retried)
    RUNNING ──EXITED──▶ EXITED       (the restart policy may SPAWN it again)
    STARTING/RUNNING ──STOP──▶ STOPPING ──STOPPED──▶ STOPPED
    BACKOFF/EXITED/FATAL/STOPPED ──STOP──▶ STOPPED   (nothing to signal)
    STOPPED/UNKNOWN ──ADOPT──▶ RUNNING   (a live agent found after a daemon restart)
    any ──LOST──▶ UNKNOWN               (we can no longer tell; a bug or a broken pidfd)

`transition` does no I/O and keeps no time; callers pass the clock's time
to whatever records the change. An event that is not in the table for the
current state raises `IllegalTransition` instead of being ignored.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from daemon.supervisor.clock import Clock, ManualClock, SystemClock

__all__ = [
    "ACTIVE",
    "TRANSITIONS",
    "AgentStatus",
    "Clock",
    "Event",
    "IllegalTransition",
    "ManualClock",
    "SystemClock",
    "transition",
]


class AgentStatus(enum.Enum):
    """Where an agent is in its lifecycle (supervisord's vocabulary)."""

    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"
    UNKNOWN = "UNKNOWN"


class Event(enum.Enum):
    """Something that happened to an agent, or was asked of it."""

    SPAWN = "spawn"
    """A process was started (by an operator, autostart, a retry or a restart)."""
    STARTED = "started"
    """The process stayed up start_secs."""
    EXITED_EARLY = "exited_early"
    """The process exited before start_secs."""
    SPAWN_FAILED = "spawn_failed"
    """The process could not be started at all (exec failed, no such user...)."""
    EXITED = "exited"
    """The process exited on its own and the policy does not retry it as a failed start."""
    GIVE_UP = "give_up"
    """Too many early exits in a row: stop retrying."""
    STOP = "stop"
    """An operator (or removal, or a spec change) asked it to stop."""
    STOPPED = "stopped"
    """The process group is gone after a stop."""
    ADOPT = "adopt"
    """A live agent from before a daemon restart was re-adopted."""
    LOST = "lost"
    """The agent's process can no longer be watched."""


S = AgentStatus
E = Event

TRANSITIONS: Mapping[tuple[AgentStatus, Event], AgentStatus] = {
    (S.STOPPED, E.SPAWN): S.STARTING,
    (S.EXITED, E.SPAWN): S.STARTING,
    (S.FATAL, E.SPAWN): S.STARTING,
    (S.BACKOFF, E.SPAWN): S.STARTING,
    (S.UNKNOWN, E.SPAWN): S.STARTING,
    (S.STARTING, E.STARTED): S.RUNNING,
    (S.STARTING, E.EXITED_EARLY): S.BACKOFF,
    (S.STARTING, E.SPAWN_FAILED): S.BACKOFF,
    (S.RUNNING, E.EXITED): S.EXITED,
    (S.STARTING, E.EXITED): S.EXITED,
    (S.BACKOFF, E.GIVE_UP): S.FATAL,
    (S.STARTING, E.STOP): S.STOPPING,
    (S.RUNNING, E.STOP): S.STOPPING,
    (S.UNKNOWN, E.STOP): S.STOPPING,
    (S.BACKOFF, E.STOP): S.STOPPED,
    (S.EXITED, E.STOP): S.STOPPED,
    (S.FATAL, E.STOP): S.STOPPED,
    (S.STOPPED, E.STOP): S.STOPPED,
    (S.STOPPING, E.STOPPED): S.STOPPED,
    (S.STOPPED, E.ADOPT): S.RUNNING,
    (S.UNKNOWN, E.ADOPT): S.RUNNING,
    **{(state, E.LOST): S.UNKNOWN for state in S},
}
"""(state, event) -> next state. Anything missing is illegal."""

ACTIVE = frozenset({S.STARTING, S.RUNNING, S.STOPPING, S.UNKNOWN})
"""States in which a process of the agent may exist."""


class IllegalTransition(RuntimeError):
    """`event` is not allowed in `state`: a bug in the caller, not bad input.

    The supervisor never lets one reach an operator; tests assert on it.
    """

    def __init__(self, state: AgentStatus, event: Event) -> None:
        super().__init__(f"illegal transition: {event.value} in state {state.value}")
        self.state = state
        self.event = event


def transition(state: AgentStatus, event: Event) -> AgentStatus:
    """The state after `event` in `state`; `IllegalTransition` if not allowed."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise IllegalTransition(state, event) from None
