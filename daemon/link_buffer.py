"""Plain data behind the manager link: the outage buffer and the sequence file.

No I/O except `SequenceFile`, which owns one small file in the state dir.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fleet.v1 import common_pb2

__all__ = ["MetricBatch", "MetricBuffer", "SequenceFile", "split_batches"]


@dataclass(frozen=True)
class MetricBatch:
    """One ReportMetrics call's worth of samples, numbered once."""

    sequence: int
    """Per-node batch number; a retry reuses it so the manager stores it once."""
    metrics: tuple[common_pb2.MetricData, ...]
    """The samples (host metrics have an empty agent_id)."""


class MetricBuffer:
    """Batches waiting for the manager, oldest first, at most `capacity`.

    When full, adding drops the oldest batch: recent data is worth more to an
    operator after an outage, and the bound keeps the daemon's memory flat
    however long the outage lasts. `dropped_batches` / `dropped_samples`
    count what was lost.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: deque[MetricBatch] = deque()
        self.dropped_batches = 0
        self.dropped_samples = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, batch: MetricBatch) -> MetricBatch | None:
        """Append `batch`; returns the batch dropped to make room, if any."""
        dropped = None
        if len(self._items) >= self.capacity:
            dropped = self._items.popleft()
            self.dropped_batches += 1
            self.dropped_samples += len(dropped.metrics)
        self._items.append(batch)
        return dropped

    def peek(self) -> MetricBatch | None:
        """The oldest batch (the next to send), without removing it."""
        return self._items[0] if self._items else None

    def pop(self, sequence: int) -> None:
        """Remove the oldest batch once the manager stored it (if it is still first)."""
        if self._items and self._items[0].sequence == sequence:
            self._items.popleft()

    def sequences(self) -> list[int]:
        """Sequence numbers waiting, in send order."""
        return [b.sequence for b in self._items]


def split_batches(
    metrics: Sequence[common_pb2.MetricData], max_samples: int
) -> list[list[common_pb2.MetricData]]:
    """`metrics` in order, cut into chunks of at most `max_samples` (none if empty)."""
    return [list(metrics[i : i + max_samples]) for i in range(0, len(metrics), max_samples)]


class SequenceFile:
    """The next metric-batch sequence number, kept in `path` across restarts.

    Written atomically (temp file, fsync, rename) before a number is used, so
    a daemon that crashes right after sending never reuses a number for
    different data. Starts at 1.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._next = int(path.read_text().strip() or "1")
        except FileNotFoundError:
            self._next = 1
        except ValueError:
            raise ValueError(
                f"{path}: not a sequence number; delete the file to start over"
            ) from None

    def peek(self) -> int:
        """The number the next `take` returns."""
        return self._next

    def take(self) -> int:
        """A new number, persisted as used before it is returned."""
        number = self._next
        _write_atomic(self.path, f"{number + 1}\n".encode())
        self._next = number + 1
        return number


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
