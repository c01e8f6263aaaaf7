"""The custom-metric buffer: pure bookkeeping, no I/O.

`Agent.metric` appends here; the flusher takes a batch when `due(now)` says
so (every `interval` seconds, or as soon as `batch_size` samples wait) and
puts it back at the front if the daemon could not take it. The buffer is
bounded: when full, the oldest samples are dropped and counted, so an agent
that outlives a long daemon outage does not grow without limit.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["METRIC_NAME", "MetricBuffer", "Sample", "check_name"]

METRIC_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,62}")
"""Metric types and value names (the daemon refuses anything else)."""


def check_name(name: str, what: str) -> None:
    """ValueError naming `what` unless `name` is a valid metric name."""
    if not METRIC_NAME.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} is not a metric name "
            "(lowercase letter first, then lowercase letters, digits, '_', '.', '-'; at most 63)"
        )


@dataclass(frozen=True)
class Sample:
    """One custom metric sample waiting to be sent."""

    type: str
    """Metric type, e.g. "probe.web" (a metric name)."""
    timestamp_ms: int
    """When it was measured, Unix epoch milliseconds."""
    values: Mapping[str, float]
    """Named finite values, e.g. {"latency_ms": 12.3}."""

    @classmethod
    def checked(cls, type: str, values: Mapping[str, float], timestamp_ms: int) -> Sample:
        """A sample whose names and values were validated (ValueError otherwise)."""
        check_name(type, "metric type")
        if not values:
            raise ValueError(f"metric {type!r} needs at least one value")
        clean: dict[str, float] = {}
        for name, value in values.items():
            check_name(name, "value name")
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(f"metric {type}.{name} is {number}; only finite values are sent")
            clean[name] = number
        return cls(type=type, timestamp_ms=timestamp_ms, values=clean)


class MetricBuffer:
    """Bounded FIFO of samples with the "is a flush due" decision."""

    def __init__(self, *, limit: int, batch_size: int, interval: float, now: float) -> None:
        if batch_size < 1 or limit < batch_size:
            raise ValueError(f"need 1 <= batch_size ({batch_size}) <= limit ({limit})")
        if interval <= 0:
            raise ValueError(f"flush interval must be > 0, got {interval}")
        self._samples: deque[Sample] = deque()
        self.limit = limit
        self.batch_size = batch_size
        self.interval = interval
        self._last_flush = now
        self.dropped = 0
        """Samples dropped because the buffer was full (oldest first)."""

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, sample: Sample) -> int:
        """Append `sample`; returns how many old samples were dropped to make room."""
        dropped = 0
        while len(self._samples) >= self.limit:
            self._samples.popleft()
            dropped += 1
        self._samples.append(sample)
        self.dropped += dropped
        return dropped

    def due(self, now: float) -> bool:
        """True when a batch should go out: a full batch waits, or the interval passed."""
        if len(self._samples) >= self.batch_size:
            return True
        return bool(self._samples) and now - self._last_flush >= self.interval

    def next_due(self, now: float) -> float:
        """Seconds until the interval flush (the flusher's sleep)."""
        return max(0.0, self._last_flush + self.interval - now)

    def take(self, now: float) -> list[Sample]:
        """Remove and return up to `batch_size` of the oldest samples."""
        count = min(self.batch_size, len(self._samples))
        batch = [self._samples.popleft() for _ in range(count)]
        self._last_flush = now
        return batch

    def put_back(self, batch: Sequence[Sample]) -> int:
        """Return an unsent batch to the front, keeping the limit; returns samples dropped."""
        room = self.limit - len(self._samples)
        keep = list(batch)[-room:] if room > 0 else []
        self._samples.extendleft(reversed(keep))
        dropped = len(batch) - len(keep)
        self.dropped += dropped
        return dropped
