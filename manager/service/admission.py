"""Admission of new control streams: a rate ceiling, a bound on hellos in progress, and
a time to come back for each refused one.

After a manager restart the whole fleet reconnects at once. Each hello is a
registration, a snapshot and the batches a daemon kept: admitted without
bounds they take the loop from the streams already open, and hellos the
manager cannot finish within the daemon's wait for the welcome (30 s) are
work for nobody (the daemon gives up and comes back). `HelloPacer` decides,
as a pure function of the time it is given:

- the ceiling (`rate` a second after a burst of `burst`, GCRA): each hello
  reserves the next free slot and sleeps once until it; one whose slot is
  more than `max_wait` away is refused, and the slot is kept for it (by node
  id) for when it comes back, so a refused hello costs no second slot;
- the work in progress: a hello that would, at the rate hellos have been
  finishing over the last `window` seconds, wait more than `max_wait` behind
  the ones already in progress is refused before anything is done for it (at
  least `min_in_flight` are always let in, so the rate can be measured and
  grow);
- every refusal says when to come back (`Refused.retry_after`): its kept
  slot, or a place in a queue in time at the ceiling's rate, so the refused
  return spread out instead of after a blind backoff each, over their kept
  connection (one back before there is room is told a new time).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["MIN_RETRY", "HelloPacer", "Refused"]

MIN_RETRY = 0.2
"""The soonest a refused hello is told to come back, in seconds."""


@dataclass(frozen=True)
class Refused:
    """A hello not admitted now: come back in `retry_after` seconds."""

    retry_after: float
    why: Literal["rate", "busy"]
    """"rate": past the ceiling (its slot is kept); "busy": more in progress than
    finish within `max_wait`."""


@dataclass
class HelloPacer:
    """Hello admission. Time is a parameter; the caller reports each admitted
    hello's end (`done`)."""

    rate: float
    """Hellos admitted per second once the burst is spent."""
    burst: float
    """Hellos admitted at once."""
    max_wait: float
    """Longest a hello is made to wait (for its slot, or behind the hellos in
    progress); one that would wait longer is refused."""
    window: float = 2.0
    """Seconds over which the rate hellos finish at is measured."""
    min_in_flight: int = 32
    """Hellos always let in, whatever the measured rate (none measured yet at start)."""
    grace: float = 2.0
    """How long past its time a refused hello's slot is kept for it."""
    _tat: float = field(default=0.0, init=False)
    """When the next slot is free if none were spent in the burst (theoretical
    arrival time)."""
    _slots: dict[str, float] = field(default_factory=dict, init=False)
    """Slots kept for hellos refused at the ceiling, by node id."""
    _in_flight: int = field(default=0, init=False)
    _finished: deque[float] = field(default_factory=deque, init=False)
    """When the hellos of the last `window` seconds finished."""
    _first: float | None = field(default=None, init=False)
    """When the first hello was admitted."""
    _promised: list[float] = field(default_factory=list, init=False)
    """When the refused are due back (a heap); those past are dropped."""

    @property
    def in_flight(self) -> int:
        """Hellos admitted and not finished."""
        return self._in_flight

    def finish_rate(self, now: float) -> float:
        """Hellos finished per second over the last `window` seconds (or since the
        first admission, if that is less: a restarted manager's first second counts
        as a second, not as two)."""
        while self._finished and self._finished[0] <= now - self.window:
            self._finished.popleft()
        if self._first is None:
            return 0.0
        return len(self._finished) / min(self.window, max(now - self._first, MIN_RETRY))

    def admit(self, now: float, node: str = "") -> float | Refused:
        """Seconds this hello waits for its slot (then it is in progress until
        `done`), or Refused with when to come back."""
        if self._first is None:
            self._first = now
        while self._promised and self._promised[0] <= now:
            heapq.heappop(self._promised)
        if len(self._slots) > 4 * self.rate * (self.max_wait + self.grace) + 1000:
            self._slots = {k: t for k, t in self._slots.items() if t + self.grace >= now}
        finishing = self.finish_rate(now)
        if self._in_flight >= self.min_in_flight and (
            finishing <= 0 or (self._in_flight + 1) / finishing > self.max_wait
        ):
            self._slots.pop(node, None)  # its slot goes with the others' turn
            return self._refuse(now, "busy")
        slot = self._slots.pop(node, None) if node else None
        if slot is not None and slot + self.grace >= now:
            if slot - now > self.max_wait:  # came back early: keep its slot
                self._slots[node] = slot
                return self._refuse(now, "rate", at=slot)
            self._in_flight += 1
            return max(0.0, slot - now)
        tat = max(self._tat, now)
        wait = max(0.0, tat - now - (self.burst - 1) / self.rate)
        if wait > self.max_wait and not node:  # nobody to keep a slot for: none taken
            return self._refuse(now, "rate", at=now + wait)
        self._tat = tat + 1.0 / self.rate
        if wait > self.max_wait:
            self._slots[node] = now + wait
            return self._refuse(now, "rate", at=now + wait)
        self._in_flight += 1
        return wait

    def done(self, now: float) -> None:
        """An admitted hello ended (welcomed, refused by the registration, or gone)."""
        self._in_flight = max(0, self._in_flight - 1)
        self._finished.append(now)

    def _refuse(self, now: float, why: Literal["rate", "busy"], at: float = 0.0) -> Refused:
        # A hello past the ceiling comes back for its kept slot. The busy are queued at
        # the ceiling's rate behind those in progress and those already told a time (up
        # to what finishes in half of `max_wait`: room enough). Not at the rate measured:
        # that is lowest just after a restart, when most are refused, and hints drawn
        # from it kept nodes away long after the manager had sped up (a 3,000-node run:
        # 82 s, told up to 12 s for 40 in progress); one back too early is told again.
        ahead = self._in_flight + len(self._promised)
        back = at if why == "rate" else now + max(MIN_RETRY, ahead / self.rate - self.max_wait / 2)
        heapq.heappush(self._promised, back)
        return Refused(retry_after=back - now, why=why)
