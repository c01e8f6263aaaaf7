"""Time as a parameter: the supervisor reads and waits on time only through a Clock.

`SystemClock` is the real one. `ManualClock` is for tests: time stands
still until `advance()` moves it, which wakes every sleeper whose deadline
has passed, so backoff and start_secs logic tests in milliseconds.
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
        """Seconds since the Unix epoch."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` (cancellable)."""
        ...


class SystemClock:
    """The wall clock and asyncio's sleep."""

    def now(self) -> float:
        """`time.time()`."""
        return time.time()

    async def sleep(self, seconds: float) -> None:
        """`asyncio.sleep(seconds)`."""
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """A clock that moves only when a test calls `advance`."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        """The current manual time."""
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Wait until `advance` has moved time `seconds` forward."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._order), fut))
        await fut

    @property
    def sleepers(self) -> int:
        """How many sleeps are pending (to let a test wait until code is parked)."""
        return sum(1 for _, _, fut in self._sleepers if not fut.done())

    def advance(self, seconds: float) -> None:
        """Move time forward and wake the sleepers whose deadline passed."""
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)
