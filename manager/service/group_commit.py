"""When `JobUpdates`' committer commits what is queued (pure).

Committing as soon as the previous commit is done made a 500-target job's
StartJob answers, which arrive a few a millisecond while the driver still has
calls in flight, into 28-46 commits of a dozen answers each, every one paying
its hop to the database thread and its BEGIN/COMMIT. The committer instead
gathers a batch: it commits when the queue reaches `GroupCommitPolicy.batch`
items, when something is queued that must not wait (`urgent`: a caller's
answer hangs on it), or once `GroupCommitPolicy.wait` passed since the first
item was queued. Nothing is answered before its commit either way; the wait
only delays answers nobody blocks on beyond it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GroupCommitPolicy", "commit_delay"]


@dataclass(frozen=True)
class GroupCommitPolicy:
    """How long the committer gathers a batch."""

    batch: int = 64
    """Commit at once when this many items are queued."""
    wait: float = 0.002
    """Seconds the first queued item waits at most for others to join it."""


def commit_delay(
    queued: int, urgent: bool, first_queued: float, now: float, policy: GroupCommitPolicy
) -> float | None:
    """Seconds to wait before committing the queue: 0.0 commits now, None waits for an
    item (the queue is empty). `urgent`: an item a caller must not wait for is queued;
    `first_queued`: when the oldest queued item came, on the clock of `now`."""
    if queued <= 0:
        return None
    if urgent or queued >= policy.batch:
        return 0.0
    return max(0.0, first_queued + policy.wait - now)
