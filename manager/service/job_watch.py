"""In-process news of committed target rows, for WatchJob (`Jobs.watch`).

Every target row this process commits (`JobUpdates`' commits, an operator's
cancel) is handed to the watchers of its job: each keeps the latest row per
node since it last looked, so a watcher holds at most one row per target of
its job however slow its client, and a watch reads the changed targets from
memory instead of re-reading every target of the job each poll. Rows another
replica commits are not seen here, so watches use this on SQLite (one
manager) only, and still re-read the whole job every few seconds as a safety
net.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator

from manager.storage.jobs import JobTargetRecord

__all__ = ["WatchHub", "Watcher"]


class Watcher:
    """One watch of one job: the rows committed since `take`."""

    def __init__(self) -> None:
        self._pending: dict[str, JobTargetRecord] = {}
        self.news = asyncio.Event()
        """Set when a row arrived."""

    def add(self, row: JobTargetRecord) -> None:
        """Keep `row` (it replaces an older one of the same target)."""
        self._pending[row.node_id] = row
        self.news.set()

    def take(self) -> dict[str, JobTargetRecord]:
        """The rows kept so far, by node; forgets them."""
        out, self._pending = self._pending, {}
        self.news.clear()
        return out


class WatchHub:
    """The watchers of this process, by job (module docstring)."""

    def __init__(self) -> None:
        self._watchers: dict[str, set[Watcher]] = {}

    def committed(self, rows: Iterable[JobTargetRecord]) -> None:
        """Hand committed rows to the watchers of their jobs (call after the commit)."""
        if not self._watchers:
            return
        for row in rows:
            for w in self._watchers.get(row.job_id, ()):
                w.add(row)

    @contextlib.contextmanager
    def subscribe(self, job_id: str) -> Iterator[Watcher]:
        """A watcher of `job_id` for the duration of the block."""
        w = Watcher()
        self._watchers.setdefault(job_id, set()).add(w)
        try:
            yield w
        finally:
            watchers = self._watchers.get(job_id)
            if watchers is not None:
                watchers.discard(w)
                if not watchers:
                    del self._watchers[job_id]
