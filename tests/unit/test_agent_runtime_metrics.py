"""The SDK's metric buffer: when to flush, what to keep, what to drop (pure, no I/O)."""

from __future__ import annotations

import math

import pytest

from agent_runtime._metrics import MetricBuffer, Sample


def _s(i: int) -> Sample:
    return Sample.checked("t", {"v": float(i)}, 1_000 + i)


def test_flush_is_due_after_the_interval_or_a_full_batch() -> None:
    """A lone sample waits for the interval; a full batch goes at once."""
    buf = MetricBuffer(limit=10, batch_size=3, interval=5.0, now=100.0)
    assert not buf.due(100.0)
    buf.add(_s(1))
    assert not buf.due(104.9)
    assert buf.due(105.0)
    buf.add(_s(2))
    buf.add(_s(3))
    assert buf.due(100.1)


def test_take_returns_oldest_batch_and_restarts_the_interval() -> None:
    """take() hands out at most batch_size oldest samples and resets the flush clock."""
    buf = MetricBuffer(limit=10, batch_size=2, interval=5.0, now=0.0)
    for i in range(3):
        buf.add(_s(i))
    batch = buf.take(now=7.0)
    assert [s.values["v"] for s in batch] == [0.0, 1.0]
    assert len(buf) == 1
    assert not buf.due(11.9)
    assert buf.next_due(8.0) == pytest.approx(4.0)


def test_full_buffer_drops_the_oldest_and_counts() -> None:
    """Past the limit the oldest samples go, and the drop count says how many."""
    buf = MetricBuffer(limit=3, batch_size=1, interval=1.0, now=0.0)
    dropped = sum(buf.add(_s(i)) for i in range(5))
    assert dropped == 2
    assert buf.dropped == 2
    assert [s.values["v"] for s in buf.take(0.0)] == [2.0]


def test_unsent_batch_goes_back_to_the_front_within_the_limit() -> None:
    """A batch the daemon did not take is retried first; overflow drops its oldest part."""
    buf = MetricBuffer(limit=4, batch_size=3, interval=1.0, now=0.0)
    for i in range(4):
        buf.add(_s(i))
    batch = buf.take(0.0)  # 0, 1, 2
    buf.add(_s(4))
    buf.add(_s(5))  # buffer: 3, 4, 5 -> room for 1
    assert buf.put_back(batch) == 2
    assert [s.values["v"] for s in buf.take(0.0)] == [2.0, 3.0, 4.0]


@pytest.mark.parametrize(
    ("type_", "values", "message"),
    [
        ("Latency", {"v": 1.0}, "metric type 'Latency'"),
        ("probe", {}, "needs at least one value"),
        ("probe", {"bad name": 1.0}, "value name 'bad name'"),
        ("probe", {"v": math.nan}, "only finite values"),
        ("probe", {"v": math.inf}, "only finite values"),
    ],
)
def test_bad_samples_are_refused_with_the_reason(
    type_: str, values: dict[str, float], message: str
) -> None:
    """A bad metric name or value is a ValueError naming it, at the call site."""
    with pytest.raises(ValueError, match=message):
        Sample.checked(type_, values, 1)


def test_buffer_rejects_impossible_sizes() -> None:
    """A batch larger than the buffer is a configuration error."""
    with pytest.raises(ValueError, match="batch_size"):
        MetricBuffer(limit=2, batch_size=3, interval=1.0, now=0.0)
