"""How much of a caller's deadline the manager's own calls to daemons may use."""

from __future__ import annotations

__all__ = ["ANSWER_MARGIN", "pool_budget"]

ANSWER_MARGIN = 0.25
"""Seconds of an operator's deadline kept for the manager's answer to reach them: the
pool's calls end this much sooner, so the operator reads the manager's words about a
slow daemon (and a fan-out's summary) instead of their own client's DEADLINE_EXCEEDED."""


def pool_budget(configured: float, remaining: float | None) -> float:
    """The pool's deadline for a call made for an operator whose own has `remaining`
    seconds left (None: none set): the configured one, or sooner, leaving the answer
    `ANSWER_MARGIN` (at most a tenth of what remains) to travel back."""
    if remaining is None:
        return configured
    margin = min(ANSWER_MARGIN, remaining / 10)
    return max(0.001, min(configured, remaining - margin))
