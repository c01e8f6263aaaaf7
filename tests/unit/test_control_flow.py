"""Pure decisions of the control channel: credit accounting and liveness from the stream."""

from __future__ import annotations

import pytest

from manager.pool.credit import CreditWindow
from manager.service.liveness import StreamVerdict, stream_verdict


def test_credit_starts_with_the_window_and_refuses_beyond_it() -> None:
    """The daemon may send `window` messages before any grant; one more is refused."""
    w = CreditWindow(4)
    assert all(w.receive() for _ in range(4))
    assert not w.receive()
    assert w.buffered == 4


def test_credit_is_topped_up_when_half_the_window_is_taken() -> None:
    """No grant while more than half is outstanding; then back to a full window."""
    w = CreditWindow(4)
    for _ in range(4):
        w.receive()
    assert w.consume() == 0  # 3 outstanding > 2
    assert w.consume() == 2  # 2 outstanding: grant back to 4
    assert w.granted == 6
    assert w.receive()
    assert w.receive()
    assert not w.receive()


def test_a_slow_consumer_never_has_more_than_the_window_buffered() -> None:
    """Whatever the interleaving, buffered <= window and the daemon is never starved."""
    w = CreditWindow(8)
    for step in range(1000):
        while w.receive():  # the daemon sends all it may
            pass
        assert w.buffered <= 8
        assert w.buffered > 0  # it was never left without credit while the caller reads
        w.consume()
        assert step < 1000


def test_consuming_more_than_received_is_a_bug() -> None:
    """Taking a message that never arrived raises."""
    with pytest.raises(ValueError, match="not received"):
        CreditWindow(2).consume()


def test_window_must_be_positive() -> None:
    """A zero window would stall every streaming command."""
    with pytest.raises(ValueError, match=">= 1"):
        CreditWindow(0)


@pytest.mark.parametrize(
    ("connected", "broken_at", "now", "expected"),
    [
        (True, None, 1000.0, StreamVerdict.CONNECTED),
        (True, 1.0, 1000.0, StreamVerdict.CONNECTED),  # reconnected after a break
        (False, 100.0, 100.0, StreamVerdict.GRACE),
        (False, 100.0, 129.9, StreamVerdict.GRACE),
        (False, 100.0, 130.0, StreamVerdict.OFFLINE),  # exactly the grace later
        (False, None, 100.0, StreamVerdict.OFFLINE),  # never had a stream here
    ],
)
def test_stream_verdict_on_a_manual_clock(
    connected: bool, broken_at: float | None, now: float, expected: StreamVerdict
) -> None:
    """Online while open and for the grace (30 s) after a break, then offline."""
    assert stream_verdict(connected=connected, broken_at=broken_at, now=now, grace=30.0) is expected


@pytest.mark.parametrize(
    ("broken_at", "now", "expected"),
    [
        (100.0, 140.0, StreamVerdict.GRACE),  # past its 30 s, inside the failover grace
        (100.0, 399.9, StreamVerdict.GRACE),
        (100.0, 400.0, StreamVerdict.OFFLINE),  # the failover grace is over
        (390.0, 419.9, StreamVerdict.GRACE),  # broke near its end: its own 30 s still count
        (390.0, 420.0, StreamVerdict.OFFLINE),
    ],
)
def test_no_stream_goes_offline_within_the_failover_grace(
    broken_at: float, now: float, expected: StreamVerdict
) -> None:
    """A manager started at 100 s with a 300 s failover grace (quiet until 400 s): a stream
    that breaks while the fleet reconnects through the herd is not a dead node."""
    verdict = stream_verdict(
        connected=False, broken_at=broken_at, now=now, grace=30.0, quiet_until=400.0
    )
    assert verdict is expected
