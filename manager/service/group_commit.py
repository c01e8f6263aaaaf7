"""When `JobUpdates`' committer commits what is queued (pure).

Committing as soon as the previous commit is done made a 500-target job's
StartJob answers, which arrive a few a millisecond while the driver still has
calls in flight, into 28-46 commits of a dozen answers each, every one paying
its hop to the database thread and its BEGIN/COMMIT. The committer instead
gathers a batch: it commits when the queue reaches `GroupCommitPolicy.batch`
items, when something is queued that must not wait (`urgent`: a caller's
answer hangs on it), or once the oldest queued item waited its bound. Nothing
is answered before its commit either way; the wait only delays answers nobody
blocks on beyond it.

Two bounds: a StartJob answer that carried its target's end freed its window
slot when it came (the driver's memory has the end), so it waits up to
`GroupCommitPolicy.wait` (10 ms: a 500-target job's answers in fewer, larger
commits); an item whose caller holds something until its commit (an answer
without the end keeps its window slot, a failed call its retry) waits up to
`GroupCommitPolicy.holding_wait` (2 ms), and takes the rest along.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GroupCommitPolicy", "commit_delay"]


@dataclass(frozen=True)
class GroupCommitPolicy:
    """How long the committer gathers a batch."""

    batch: int = 64
    """Commit at once when this many items are queued."""
    wait: float = 0.010
    """Seconds the first queued item waits at most for others to join it."""
    holding_wait: float = 0.002
    """The same for an item whose caller holds something (a window slot) until its
    commit: the batch is committed once the first such item waited this long."""


def commit_delay(
    queued: int,
    urgent: bool,
    first_queued: float,
    now: float,
    policy: GroupCommitPolicy,
    first_holding: float | None = None,
) -> float | None:
    """Seconds to wait before committing the queue: 0.0 commits now, None waits for an
    item (the queue is empty). `urgent`: an item a caller must not wait for is queued;
    `first_queued`: when the oldest queued item came, on the clock of `now`;
    `first_holding`: when the oldest queued item that holds something came (None: none
    is queued)."""
    if queued <= 0:
        return None
    if urgent or queued >= policy.batch:
        return 0.0
    due = first_queued + policy.wait
    if first_holding is not None:
        due = min(due, first_holding + policy.holding_wait)
    return max(0.0, due - now)
