"""Reconnect policy of the SDK: backoff bounds and how much of an outage is logged."""

from __future__ import annotations

import random

from agent_runtime import AgentOptions
from agent_runtime._agent import worth_logging


def test_long_outages_log_a_readable_number_of_retries() -> None:
    """The first five reconnect attempts are logged, then every tenth."""
    logged = [n for n in range(1, 101) if worth_logging(n)]
    assert logged[:6] == [1, 2, 3, 4, 5, 10]
    assert len(logged) == 5 + 10


def test_default_reconnect_backoff_is_full_jitter_capped_at_ten_seconds() -> None:
    """Reconnect delays are spread over [0, ceiling] and never exceed 10 s."""
    backoff = AgentOptions().reconnect
    rng = random.Random(7)
    delays = [backoff.delay(n, rng) for n in range(40)]
    assert max(delays) <= 10.0
    assert min(delays[10:]) < 5.0  # full jitter: late attempts are not all at the cap
    assert backoff.delay(0, rng) <= 0.2
