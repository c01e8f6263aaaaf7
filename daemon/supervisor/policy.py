"""Pure restart decisions: what happens after an agent's process exits.

- Exited before `start_secs` (a failed start): BACKOFF with an exponential,
  jittered delay; after `max_retries` such exits in a row, FATAL. Exception:
  an early exit with an expected code when restart is not "always" is a
  program that simply finished quickly, so it is EXITED, not retried.
- Exited after `start_secs` (it had reached RUNNING, so the retry count
  starts over): the restart policy decides. "always" restarts, "on-failure"
  restarts unless the exit code is expected, "never" leaves it EXITED.

An exit code of -N means "killed by signal N"; -1 also stands for an
unknown code (a re-adopted agent is not our child, so it cannot be reaped).
Neither is ever an expected code.

Heartbeat health (`heartbeat_deadline`, `restarts_when_unhealthy`): an agent
with ``health.kind = "heartbeat"`` must heartbeat within ``health.timeout``
of its last heartbeat, counted from no earlier than when this daemon began
watching its process (its start, or its re-adoption after a daemon restart:
agents cannot heartbeat while the daemon is down). Past the deadline it is
UNHEALTHY; "always" and "on-failure" then restart it (a hung process is a
failure), "never" leaves it running and only reports it. Probe checks (http,
tcp, command; decided in `daemon.supervisor.health`) restart only with
``restart_when_unhealthy``, and never with restart = "never".
"""

from __future__ import annotations

import enum
import math
import random
import signal
from dataclasses import dataclass
from typing import Literal

from daemon.supervisor.spec import AgentSpec, BackoffSpec

__all__ = [
    "READOPT_GRACE",
    "STALL_SLACK",
    "Action",
    "Decision",
    "ExitKind",
    "LastExit",
    "backoff_delay",
    "decide_after_exit",
    "describe_exit",
    "exit_of_process",
    "heartbeat_deadline",
    "restarts_when_unhealthy",
    "woke_stalled",
]

READOPT_GRACE = 15.0
"""Seconds a re-adopted agent gets at least to heartbeat again after a daemon restart.

The SDK reconnects with a full-jitter backoff capped at 10 s, so its first
heartbeat to a new daemon can come that late; a short health timeout must
not turn every daemon restart into a restart of its agents."""


STALL_SLACK = 5.0
"""Seconds past a heartbeat deadline the watchdog may wake before it takes the lateness for a
stall of the daemon itself (SIGSTOP, swapped out, a paused VM) rather than of the agent."""


def woke_stalled(deadline: float, now: float) -> bool:
    """Whether a watchdog that meant to wake at `deadline` woke so late (at `now`) that the
    daemon itself was not running meanwhile: no heartbeat could reach it, so the agent's
    silence says nothing (it gets READOPT_GRACE to be heard, as after a daemon restart)."""
    return now - deadline > STALL_SLACK


class Action(enum.Enum):
    """What the supervisor does next."""

    BACKOFF = "backoff"
    """Wait `Decision.delay`, then start again."""
    RESTART = "restart"
    """Start again now (via EXITED)."""
    EXIT = "exit"
    """Stay EXITED."""
    FATAL = "fatal"
    """Give up: FATAL until an operator starts it."""


@dataclass(frozen=True)
class Decision:
    """The outcome of `decide_after_exit`."""

    action: Action
    """What to do next."""
    delay: float
    """Seconds to wait before the next start (BACKOFF only, else 0)."""
    retries: int
    """Early exits in a row after this one (0 once the agent had reached RUNNING)."""
    message: str
    """One line for the agent's snapshot, e.g. "exited too quickly (exit code 1)"."""


def backoff_delay(attempt: int, spec: BackoffSpec, rng: random.Random | None = None) -> float:
    """Delay before retry `attempt` (0-based): initial*multiplier**attempt, capped, jittered.

    Jitter takes a random fraction (up to `spec.jitter`) off the delay, so the
    result lies in [d*(1-jitter), d] with d = min(max, initial*multiplier**attempt).
    """
    try:
        raw = spec.initial * spec.multiplier ** max(0, attempt)
    except OverflowError:
        raw = math.inf
    base = min(spec.max, raw)
    if spec.jitter <= 0 or base <= 0:
        return base
    r = (rng or random).random()
    return base * (1.0 - spec.jitter * r)


ExitKind = Literal[
    "exited", "killed", "unhealthy", "operator", "updated", "daemon", "start_failed", "unknown"
]
"""Why an agent's last process ended (see `LastExit`)."""


@dataclass(frozen=True)
class LastExit:
    """How and when the agent's last process ended: kept until the next exit, so
    "why did it restart?" has an answer while the new process runs."""

    kind: ExitKind
    """exited (on its own, with a code), killed (by a signal nobody here sent),
    unhealthy (stopped by the health check), operator (an operator stopped or
    restarted it), updated (stopped for a new spec or its removal), daemon
    (stopped with the daemon), start_failed (no process at all), unknown (a
    re-adopted process: not our child, its exit code cannot be read)."""
    code: int
    """The exit code, -N for signal N, -1 when unknown or there was no process."""
    reason: str
    """One line: "exited with code 3", "killed by SIGKILL", "killed by the health
    check after 12.0 s without a heartbeat", "stopped by an operator", "start
    failed: ..."."""
    at: float
    """When (epoch seconds)."""


def exit_of_process(code: int, at: float, *, adopted: bool = False) -> LastExit:
    """The LastExit of a process that ended on its own."""
    if adopted:
        return LastExit(
            "unknown", -1, "exited; code unknown (re-adopted after a daemon restart)", at
        )
    if code < 0:
        return LastExit("killed", code, describe_exit(code), at)
    return LastExit("exited", code, f"exited with code {code}", at)


def describe_exit(exit_code: int, *, adopted: bool = False) -> str:
    """ "exit code 3", "killed by SIGKILL", or the re-adopted unknown case."""
    if adopted:
        return "exit code unknown: agent was re-adopted"
    if exit_code < 0:
        try:
            return f"killed by {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"killed by signal {-exit_code}"
    return f"exit code {exit_code}"


def decide_after_exit(
    spec: AgentSpec,
    exit_code: int,
    ran_for: float,
    retries: int,
    rng: random.Random | None = None,
    *,
    adopted: bool = False,
    spawn_error: str = "",
) -> Decision:
    """Decide what follows an exit after `ran_for` seconds with `retries` early exits before it.

    `spawn_error` set means there was no process at all (exec failed): always a failed start.
    """
    how = describe_exit(exit_code, adopted=adopted)
    expected = exit_code >= 0 and not adopted and exit_code in spec.expected_exit_codes
    if spawn_error:
        expected, ran_for = False, 0.0
    if ran_for < spec.start_secs or spawn_error:
        if expected and spec.restart != "always":
            return Decision(Action.EXIT, 0.0, 0, f"exited ({how})")
        failures = retries + 1
        what = f"cannot start: {spawn_error}" if spawn_error else f"exited too quickly ({how})"
        if failures > spec.max_retries:
            return Decision(
                Action.FATAL, 0.0, failures, f"{what}; {failures} times in a row; gave up"
            )
        delay = backoff_delay(retries, spec.backoff, rng)
        return Decision(
            Action.BACKOFF,
            delay,
            failures,
            f"{what}; retry {failures}/{spec.max_retries} in {delay:.2f}s",
        )
    if spec.restart == "always" or (spec.restart == "on-failure" and not expected):
        return Decision(Action.RESTART, 0.0, 0, f"exited ({how}); restarted")
    return Decision(Action.EXIT, 0.0, 0, f"exited ({how})")


def heartbeat_deadline(
    *, last_heartbeat: float, watched_since: float, timeout: float, grace: float = 0.0
) -> float:
    """When an agent without a further heartbeat becomes unhealthy (epoch seconds).

    `watched_since` is when the daemon began watching the process (start or
    re-adoption); heartbeats from before it do not count. Until the first
    heartbeat since then, the agent has at least `grace` seconds.
    """
    if last_heartbeat >= watched_since:
        return last_heartbeat + timeout
    return watched_since + max(timeout, grace)


def restarts_when_unhealthy(spec: AgentSpec) -> bool:
    """True if an agent that turned unhealthy is restarted.

    Never with restart = "never"; else always for a missed heartbeat (a hung
    process is a failure), and for a failed probe when the check says
    ``restart_when_unhealthy`` (a failing dependency may not be the agent's fault).
    """
    if spec.restart == "never":
        return False
    return spec.health.kind == "heartbeat" or spec.health.restart_when_unhealthy
