"""In-process news of committed target rows, for WatchJob (`Jobs.watch`).

Every target row this process commits (`JobUpdates`' commits, an operator's
cancel) is handed to the watchers of its job: each keeps the latest row per
node since it last looked, so a watcher holds at most one row per target of
its job however slow its client, and a watch reads the changed targets from
memory instead of re-reading every target of the job each poll. Rows another
replica commits are not seen here, so watches use this on SQLite (one
manager) only, and still re-read the whole job every few seconds as a safety
net.

The hub also keeps the rows of the jobs this process started (`started`, as
RunJob stored them), updated by every commit after it, so a watch's first
message need not read a job's targets back: in one manager, which commits
every change, they are the stored rows. A cancel makes the hub forget the
job (its rows are handed over after its commit, possibly after a later
commit's); a manager that did not start the job, or whose memory of it was
evicted (`max_rows`), reads the database.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Iterable, Iterator, Sequence

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

    def __init__(self, *, max_rows: int = 20_000) -> None:
        """`max_rows`: target rows kept at most (~0.5 KB each); a larger job is read."""
        self._watchers: dict[str, set[Watcher]] = {}
        self._jobs: collections.OrderedDict[str, dict[str, JobTargetRecord]] = (
            collections.OrderedDict()
        )
        self._held = 0
        self._max_rows = max_rows

    def started(self, job_id: str, rows: Sequence[JobTargetRecord]) -> None:
        """`job_id` was just stored with `rows` (call after its commit, before anything
        else can commit a row of it): keep them, the oldest jobs' beyond `max_rows`."""
        if len(rows) > self._max_rows:
            return
        self._jobs[job_id] = {r.node_id: r for r in rows}
        self._held += len(rows)
        while self._held > self._max_rows:
            _, evicted = self._jobs.popitem(last=False)
            self._held -= len(evicted)

    def forget(self, job_id: str) -> None:
        """Stop keeping `job_id`'s rows (a write the hub may hear of out of order)."""
        kept = self._jobs.pop(job_id, None)
        if kept is not None:
            self._held -= len(kept)

    def keeps(self, job_id: str) -> bool:
        """Whether the job's target rows are kept."""
        return job_id in self._jobs

    def rows(self, job_id: str) -> tuple[JobTargetRecord, ...] | None:
        """The job's target rows as committed so far, in its targets' order; None if
        they are not kept."""
        kept = self._jobs.get(job_id)
        return None if kept is None else tuple(kept.values())

    def committed(self, rows: Iterable[JobTargetRecord]) -> None:
        """Hand committed rows to the kept jobs and the watchers of their jobs (call after
        each commit, in commit order)."""
        if not self._watchers and not self._jobs:
            return
        for row in rows:
            kept = self._jobs.get(row.job_id)
            if kept is not None:
                kept[row.node_id] = row
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
