"""The cyclic GC's collections and their time in a benchmark's manager child."""

from __future__ import annotations

import gc
import time

__all__ = ["GcTimer"]


class GcTimer:
    """Counts collections and their seconds from `start` on (a `gc.callbacks` entry)."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self._started = 0.0

    def start(self) -> None:
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.count += 1
            self.seconds += time.perf_counter() - self._started
