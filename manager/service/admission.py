"""The ceiling on new control streams per second (`[control] max_hellos_per_second`).

After a manager restart the whole fleet reconnects at once. Each hello is a
registration, a snapshot and the batches a daemon kept: admitted without a
ceiling they take the loop from the streams already open (their commands,
their batches, gRPC's keepalive answers). `HelloPacer` spaces hellos at most
`rate` a second after a burst of `burst`, by reservation (GCRA): each hello
reserves the next free slot and sleeps once until it, so a herd costs one
timer each, not a wake-up of every waiter per admission. A hello that would
wait longer than `max_wait` is refused instead (the daemon backs off and
comes back), so none waits past its own deadline for the welcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["HelloPacer"]


@dataclass
class HelloPacer:
    """Hello admission at `rate`/s after `burst` at once. Time is a parameter."""

    rate: float
    """Hellos admitted per second once the burst is spent."""
    burst: float
    """Hellos admitted at once."""
    max_wait: float
    """Longest a hello is made to wait; one that would wait longer is refused."""
    _tat: float = field(default=0.0, init=False)
    """When the next slot is free if none were spent in the burst (theoretical
    arrival time)."""

    def reserve(self, now: float) -> float | None:
        """Seconds this hello waits before it is admitted (its slot is taken), or
        None: it would wait more than `max_wait`, and nothing was taken."""
        tat = max(self._tat, now)
        wait = max(0.0, tat - now - (self.burst - 1) / self.rate)
        if wait > self.max_wait:
            return None
        self._tat = tat + 1.0 / self.rate
        return wait
