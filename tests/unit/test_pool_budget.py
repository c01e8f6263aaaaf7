"""How long the pool may take for an operator's call: the answer must beat their deadline."""

from __future__ import annotations

import pytest

from manager.servicers.deadline import ANSWER_MARGIN, pool_budget


@pytest.mark.parametrize(
    ("configured", "remaining", "budget"),
    [
        (30.0, None, 30.0),  # no deadline of theirs: ours
        (30.0, 60.0, 30.0),  # ours ends first anyway
        (30.0, 10.0, 10.0 - ANSWER_MARGIN),  # theirs, less the margin
        (30.0, 1.0, 0.9),  # a short deadline keeps a tenth, not the whole margin
        (30.0, 0.0, 0.001),  # already past: the pool gives up at once
    ],
)
def test_the_pool_ends_before_the_operator_does(
    configured: float, remaining: float | None, budget: float
) -> None:
    assert pool_budget(configured, remaining) == pytest.approx(budget)
