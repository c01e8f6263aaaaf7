"""Retry with exponential backoff: a pure delay policy and a tenacity driver.

`Backoff.delay` is the policy as a pure function (attempt number in, seconds
out), so callers that schedule their own retries (the supervisor's restart
policy, reconnect loops) and their tests share one definition. `retrying`
applies the same policy to an async block::

    async for attempt in retrying(Backoff(), retry_if=is_unavailable, deadline=30):
        with attempt:
            await stub.Heartbeat(request)

The last error is re-raised as-is when attempts or the deadline run out.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import grpc
import tenacity

from fleet.errors import Unavailable

__all__ = ["Backoff", "is_unavailable", "retrying"]


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff, optionally with full jitter (AWS "Full Jitter")."""

    initial: float = 0.1
    """Ceiling of the first delay, in seconds."""
    multiplier: float = 2.0
    """Factor the ceiling grows by per attempt (>= 1)."""
    maximum: float = 30.0
    """Cap on any delay, in seconds."""
    jitter: Literal["full", "none"] = "full"
    """"full": uniform in [0, ceiling]; "none": exactly the ceiling."""

    def __post_init__(self) -> None:
        if self.initial < 0:
            raise ValueError(f"initial must be >= 0, got {self.initial}")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if self.maximum < self.initial:
            raise ValueError(f"maximum ({self.maximum}) must be >= initial ({self.initial})")

    def ceiling(self, attempt: int) -> float:
        """The largest delay after failed attempt number `attempt` (0-based)."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        try:
            grown = self.initial * self.multiplier**attempt
        except OverflowError:  # float ** huge attempt: far past the cap anyway
            return self.maximum
        return min(self.maximum, grown)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt `attempt` (0-based).

        Pure given `rng`: with full jitter the delay is
        uniform(0, min(maximum, initial * multiplier**attempt)).
        """
        ceiling = self.ceiling(attempt)
        if self.jitter == "none":
            return ceiling
        uniform = rng.uniform if rng is not None else random.uniform
        return uniform(0.0, ceiling)


def retrying(
    backoff: Backoff,
    *,
    retry_if: Callable[[BaseException], bool],
    max_attempts: int | None = None,
    deadline: float | None = None,
) -> tenacity.AsyncRetrying:
    """An `async for` retry loop that waits per `backoff` between attempts.

    Retries only errors for which `retry_if` is true; stops after
    `max_attempts` attempts in total, or before a wait would end past
    `deadline` seconds from the first attempt; then re-raises the last error.
    """
    if max_attempts is not None and max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    wait: tenacity.wait.wait_base
    # tenacity's wait_(random_)exponential compute Backoff.delay's formula
    # (they subtract 1 from their 1-based attempt_number themselves).
    if backoff.jitter == "full":
        wait = tenacity.wait_random_exponential(
            multiplier=backoff.initial, max=backoff.maximum, exp_base=backoff.multiplier
        )
    else:
        wait = tenacity.wait_exponential(
            multiplier=backoff.initial, max=backoff.maximum, exp_base=backoff.multiplier
        )
    stop: tenacity.stop.stop_base = tenacity.stop_never
    if max_attempts is not None:
        stop = stop | tenacity.stop_after_attempt(max_attempts)
    if deadline is not None:
        stop = stop | tenacity.stop_before_delay(deadline)
    return tenacity.AsyncRetrying(
        wait=wait,
        stop=stop,
        retry=tenacity.retry_if_exception(retry_if),
        reraise=True,
    )


def is_unavailable(exc: BaseException) -> bool:
    """True for a peer that cannot be reached now: gRPC UNAVAILABLE or fleet Unavailable."""
    if isinstance(exc, Unavailable):
        return True
    if isinstance(exc, grpc.RpcError):
        code = getattr(exc, "code", None)
        return callable(code) and code() == grpc.StatusCode.UNAVAILABLE
    return False
