"""The manager link's outage buffer and persisted sequence numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.link_buffer import MetricBatch, MetricBuffer, SequenceFile, split_batches
from fleet.v1 import common_pb2


def _batch(seq: int, n: int = 2) -> MetricBatch:
    return MetricBatch(
        seq,
        tuple(
            common_pb2.MetricData(type="cpu", timestamp=seq, values={"v": 1.0}) for _ in range(n)
        ),
    )


def test_buffer_keeps_order_and_drops_oldest_when_full() -> None:
    """A full buffer drops its oldest batch first and counts batches and samples lost."""
    buf = MetricBuffer(3)
    for seq in range(1, 6):
        buf.add(_batch(seq, n=seq))
    assert buf.sequences() == [3, 4, 5]
    assert buf.dropped_batches == 2
    assert buf.dropped_samples == 1 + 2


def test_buffer_pop_only_removes_the_acknowledged_head() -> None:
    """A late acknowledgement for a batch that is no longer first removes nothing."""
    buf = MetricBuffer(2)
    buf.add(_batch(1))
    buf.add(_batch(2))
    buf.pop(2)
    assert buf.sequences() == [1, 2]
    buf.pop(1)
    assert buf.sequences() == [2]
    head = buf.peek()
    assert head is not None
    assert head.sequence == 2


def test_buffer_refuses_a_zero_capacity() -> None:
    """A buffer must hold at least one batch."""
    with pytest.raises(ValueError, match="capacity"):
        MetricBuffer(0)


def test_split_batches_respects_the_sample_limit_in_order() -> None:
    """Samples are cut into chunks of at most the limit, order preserved, none when empty."""
    metrics = [common_pb2.MetricData(type="cpu", timestamp=i) for i in range(7)]
    chunks = split_batches(metrics, 3)
    assert [[m.timestamp for m in c] for c in chunks] == [[0, 1, 2], [3, 4, 5], [6]]
    assert split_batches([], 3) == []


def test_sequence_keeps_increasing_across_restarts(tmp_path: Path) -> None:
    """A new SequenceFile on the same path continues after the last number handed out."""
    path = tmp_path / "metrics-sequence"
    first = SequenceFile(path)
    assert [first.take(), first.take(), first.take()] == [1, 2, 3]
    again = SequenceFile(path)
    assert again.take() == 4
    assert path.stat().st_mode & 0o777 == 0o600


def test_sequence_file_with_garbage_names_the_file(tmp_path: Path) -> None:
    """A corrupted sequence file is refused with a message naming it."""
    path = tmp_path / "metrics-sequence"
    path.write_text("not a number")
    with pytest.raises(ValueError, match="metrics-sequence"):
        SequenceFile(path)
