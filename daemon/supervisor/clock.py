"""Time as a parameter: the supervisor reads and waits on time only through a Clock.

`SystemClock` is the real one. `ManualClock` is for tests: time stands
still until `advance()` moves it, which wakes every sleeper whose deadline
has passed, so backoff and start_secs logic tests in milliseconds.

`now()` is the wall clock, for times that are stored or shown; a schedule
kept across waits (when to sample next) is kept on `monotonic()`, which a
step of the wall clock (NTP, `date -s`) does not move: one kept in wall
time stops for ten minutes when the clock is stepped ten minutes back.
`ManualClock.step()` is such a step.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    """Where the supervisor gets the time and how it waits."""

    def now(self) -> float:
        """Seconds since the Unix epoch (the wall clock: it can be stepped)."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary start that only time passing moves."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` (cancellable)."""
        ...


class SystemClock:
    """The wall clock and asyncio's sleep."""

    def now(self) -> float:
        """`time.time()`."""
        return time.time()

    def monotonic(self) -> float:
        """`time.monotonic()`."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """`asyncio.sleep(seconds)`."""
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """A clock that moves only when a test calls `advance`."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._mono = 1000.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        """The current manual time."""
        return self._now

    def monotonic(self) -> float:
        """The manual monotonic time: `advance` moves it, `step` does not."""
        return self._mono

    async def sleep(self, seconds: float) -> None:
        """Wait until `advance` has moved time `seconds` forward."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._mono + seconds, next(self._order), fut))
        await fut

    @property
    def sleepers(self) -> int:
        """How many sleeps are pending (to let a test wait until code is parked)."""
        return sum(1 for _, _, fut in self._sleepers if not fut.done())

    def advance(self, seconds: float) -> None:
        """Move time forward and wake the sleepers whose deadline passed."""
        self._now += seconds
        self._mono += seconds
        while self._sleepers and self._sleepers[0][0] <= self._mono:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    def step(self, seconds: float) -> None:
        """Step the wall clock by `seconds` (either way) while no time passes: nobody wakes."""
        self._now += seconds
