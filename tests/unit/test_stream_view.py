"""What `nodes show` says of a node's control stream and last heartbeat: pure functions of
plain values."""

from __future__ import annotations

import pytest

from manager.pool.routing import Route
from manager.service.fleet import StreamState, StreamView, last_heard_ms, stream_view

M2 = Route(replica_id="m2", address="10.0.0.2:7443", epoch=3, replica_seen_ms=1_000)


@pytest.mark.parametrize(
    ("opened_at", "broken_at", "route", "asked", "expected"),
    [
        # Open here: nothing else matters.
        (100.0, None, None, False, StreamView(StreamState.CONNECTED, since=100.0)),
        (100.0, 90.0, M2, True, StreamView(StreamState.CONNECTED, since=100.0)),
        # Broke here, reconnected to another replica: the directory wins.
        (None, 90.0, M2, True, StreamView(StreamState.ELSEWHERE, replica="m2")),
        # Broke here and nowhere else: lost until the grace ends.
        (None, 90.0, None, True, StreamView(StreamState.LOST, since=90.0, offline_at=120.0)),
        (None, 90.0, None, False, StreamView(StreamState.LOST, since=90.0, offline_at=120.0)),
        # No stream: known only when this replica knows every stream or asked the directory.
        (None, None, None, True, StreamView(StreamState.NONE)),
        (None, None, None, False, StreamView(StreamState.UNKNOWN)),
    ],
)
def test_stream_view(
    opened_at: float | None,
    broken_at: float | None,
    route: Route | None,
    asked: bool,
    expected: StreamView,
) -> None:
    got = stream_view(
        opened_at=opened_at, broken_at=broken_at, grace=30.0, route=route, asked_directory=asked
    )
    assert got == expected


def test_a_lost_stream_goes_offline_no_sooner_than_the_failover_grace_ends() -> None:
    """`nodes show` says when the node goes offline as the liveness decides it."""
    got = stream_view(
        opened_at=None,
        broken_at=90.0,
        grace=30.0,
        route=None,
        asked_directory=True,
        quiet_until=400.0,
    )
    assert got == StreamView(StreamState.LOST, since=90.0, offline_at=400.0)


@pytest.mark.parametrize(
    ("last_seen_ms", "stream", "expected"),
    [
        # Lost: the grace kept last-seen fresh, but the node was last heard when it broke.
        (500_000, StreamView(StreamState.LOST, since=90.0, offline_at=120.0), 90_000),
        # Recorded before the break (a refresh had not run yet): that stands.
        (80_000, StreamView(StreamState.LOST, since=90.0, offline_at=120.0), 80_000),
        # Anything else: the stored last-seen is what was heard.
        (500_000, StreamView(StreamState.CONNECTED, since=90.0), 500_000),
        (500_000, StreamView(StreamState.ELSEWHERE, replica="m2"), 500_000),
        (500_000, StreamView(StreamState.NONE), 500_000),
        (500_000, StreamView(StreamState.UNKNOWN), 500_000),
    ],
)
def test_last_heard_of_a_lost_stream_is_when_it_broke(
    last_seen_ms: int, stream: StreamView, expected: int
) -> None:
    assert last_heard_ms(last_seen_ms, stream) == expected
