"""When this daemon process last stopped running: SIGSTOP, swapped out, its VM paused.

A tick every second on the monotonic clock, which keeps counting while the
process does not run: a tick that wakes more than `STALL_SLACK` late says the
process was not running meanwhile. It is logged once (what the daemon watches
went unwatched), and the manager link words a control stream the manager gave
up on during the stall as what it was: this daemon not answering, not the
network (`ManagerLink`'s reconnect line).

One per daemon process (`daemon.server`), not per link: a simulation of many
links in one process ticks once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from daemon.supervisor.policy import STALL_SLACK

__all__ = ["Stalls"]

log = logging.getLogger(__name__)


class Stalls:
    """The last stall of this process, told by a late tick (see the module docstring).

    `observe` and `stalled` are plain functions of the monotonic times given; `run` is
    the ticker that feeds them."""

    def __init__(
        self, *, every: float = 1.0, slack: float = STALL_SLACK, now: float | None = None
    ) -> None:
        self.every = every
        self.slack = slack
        # When the last tick woke; from construction, so a link asking before the ticker's
        # first step does not read the process's whole uptime as a stall.
        self._tick = time.monotonic() if now is None else now
        self._last: tuple[float, float] | None = None  # (when it ended, how long it was)

    def observe(self, now: float) -> float | None:
        """A tick woke at `now`; the stall it ends, in seconds, or None if it was on time."""
        gap = self._gap(now)
        self._tick = now
        if gap is None:
            return None
        self._last = (now, gap)
        return gap

    def stalled(self, now: float, within: float) -> float | None:
        """How long this process was not running, if a stall ended in the last `within` s
        or is ending now (the ticker has not woken yet since the process runs again)."""
        gap = self._gap(now)
        if gap is not None:
            return gap
        if self._last is not None and now - self._last[0] <= within:
            return self._last[1]
        return None

    def _gap(self, now: float) -> float | None:
        # The time since the last tick, when the next one is more than `slack` late.
        since = now - self._tick
        return since if since - self.every > self.slack else None

    async def run(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        """Tick until cancelled; log each stall once."""
        self._tick = monotonic()
        while True:
            await asyncio.sleep(self.every)
            stalled = self.observe(monotonic())
            if stalled is not None:
                log.warning(
                    "this daemon was not running for %.1f s (stopped by a signal, swapped out"
                    " or its VM paused): its agents, jobs and manager link went unwatched",
                    stalled,
                )
