"""The fan-out window: run one call per target, at most N at once, stop at M failures.

`sliding_window` is the whole policy of an OperateAgents rollout and knows
nothing about gRPC: it takes targets and an async call, and yields one
`Outcome` per target as it finishes, in batches: each batch is everything
that finished since the caller last asked (so a caller busy sending the
previous batch gets the next ones together, never later), or, with
`batch_interval`, everything that finished within that long of the
batch's first outcome (fewer, fuller batches; a free slot is still
refilled at once).

- A sliding window, not batches: the next target is launched as soon as any
  running one finishes, so at most `max_concurrency` calls are ever in flight
  and a slow target does not hold the others back.
- Once `max_errors` calls have failed nothing new is launched; calls already
  in flight finish and are reported, every target not launched is SKIPPED.
- Deadlines belong to the call: the manager's pool bounds each one (waiting
  for a channel, every attempt, the pauses between), so a dead peer fails
  its own target and never hangs the rollout.
- Closing the iterator (the client went away) launches nothing more and
  cancels the calls in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from fleet.errors import FleetError

__all__ = ["Outcome", "OutcomeKind", "sliding_window"]

T = TypeVar("T")
R = TypeVar("R")

OutcomeKind = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True)
class Outcome(Generic[T, R]):
    """How one target of a fan-out ended."""

    target: T
    """The target, as given."""
    kind: OutcomeKind
    """ok, failed, or skipped (never launched because max_errors was reached)."""
    value: R | None = None
    """What the call returned (ok only)."""
    error: str = ""
    """Why it failed or was skipped."""
    duration: float = 0.0
    """Seconds the call took (0 for skipped)."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FleetError):
        return exc.message
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def sliding_window(
    targets: Sequence[T],
    call: Callable[[T], Coroutine[Any, Any, R]],
    *,
    max_concurrency: int,
    max_errors: int = 0,
    batch_interval: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncGenerator[list[Outcome[T, R]], None]:
    """Yield one Outcome per target in non-empty batches: finished ones as they
    finish (each batch: all that finished since the last), then the skipped.

    `max_concurrency` >= 1 calls run at once; `max_errors` 0 means no limit.
    A call raising an Exception is a failure (its message is kept). With
    `batch_interval` > 0 a batch is held until that many seconds after its
    first outcome (or until no call is left running) to gather more.
    """
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    if max_errors < 0:
        raise ValueError(f"max_errors must be >= 0, got {max_errors}")

    # The bookkeeping runs in each call's done callback, so a free slot is
    # refilled at once and the generator only wakes once per batch, not once
    # per finished call (hundreds of wake-ups in a large fan-out).
    loop = asyncio.get_running_loop()
    running: dict[asyncio.Task[R], tuple[T, float]] = {}
    outcomes: list[Outcome[T, R]] = []  # finished since the last batch
    first_at = 0.0  # loop time the oldest of them finished
    finished_one = asyncio.Event()
    none_running = asyncio.Event()  # set once nothing is running and nothing will start
    next_index = 0
    failures = 0
    closed = False

    def launch() -> None:
        nonlocal next_index
        while not closed and len(running) < max_concurrency and next_index < len(targets):
            if max_errors and failures >= max_errors:
                break
            target = targets[next_index]
            next_index += 1
            task = loop.create_task(call(target))
            running[task] = (target, clock())
            task.add_done_callback(finished)
        if not running:
            none_running.set()

    def finished(task: asyncio.Task[R]) -> None:
        nonlocal failures, first_at
        if closed:
            return
        target, started = running.pop(task)
        elapsed = clock() - started
        if not outcomes:
            first_at = loop.time()
        if task.cancelled():
            failures += 1
            outcomes.append(Outcome(target, "failed", error="cancelled", duration=elapsed))
        elif (exc := task.exception()) is None:
            outcomes.append(Outcome(target, "ok", task.result(), duration=elapsed))
        else:
            failures += 1
            outcomes.append(Outcome(target, "failed", error=_describe(exc), duration=elapsed))
        launch()  # refill the window before anyone sees the outcome
        finished_one.set()

    try:
        launch()
        while running or outcomes:
            if not outcomes:
                finished_one.clear()
                await finished_one.wait()
            if batch_interval > 0 and running:
                # Hold the batch until it is due or no call is left running.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(first_at + batch_interval):
                        await none_running.wait()
            batch, outcomes = outcomes, []
            yield batch
        if next_index < len(targets):
            reason = f"not attempted: {failures} target(s) failed (max_errors {max_errors})"
            yield [Outcome(target, "skipped", error=reason) for target in targets[next_index:]]
    finally:
        closed = True
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
