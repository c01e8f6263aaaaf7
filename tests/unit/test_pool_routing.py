"""Which way a command goes (stream, relay, dial) and when a stream record counts."""

from __future__ import annotations

import pytest

from manager.pool.routing import Route, Via, choose_transport, usable_route

MB = Route("mb", "10.0.0.12:7443")
STALE_MS = 10_000


class ManualClock:
    """Epoch milliseconds that move only when told."""

    def __init__(self, now_ms: int = 1_800_000_000_000) -> None:
        self.now_ms = now_ms

    def advance(self, seconds: float) -> None:
        self.now_ms += int(seconds * 1000)


def judge(
    clock: ManualClock,
    *,
    replica: str = "mb",
    seen_ms: int,
    address: str = MB.address,
    unreachable_seen_ms: int | None = None,
) -> Route | None:
    """`usable_route` of a record naming `replica` (seen at `seen_ms`, epoch 3), judged by ma."""
    return usable_route(
        replica_id=replica,
        replica_address=address,
        replica_last_seen_ms=seen_ms,
        self_id="ma",
        now_ms=clock.now_ms,
        stale_after_ms=STALE_MS,
        epoch=3,
        unreachable_seen_ms=unreachable_seen_ms,
    )


def mb(seen_ms: int) -> Route:
    """The route to mb that `judge` gives for a record seen at `seen_ms`."""
    return Route("mb", MB.address, epoch=3, replica_seen_ms=seen_ms)


@pytest.mark.parametrize(
    ("local", "route", "address", "via"),
    [
        (True, MB, "10.0.0.7:7444", Via.STREAM),  # the stream here wins over everything
        (True, None, "", Via.STREAM),
        (False, MB, "10.0.0.7:7444", Via.RELAY),  # a stream elsewhere beats dialling
        (False, MB, "", Via.RELAY),  # a portless node on another replica
        (False, None, "10.0.0.7:7444", Via.DIAL),  # the original design
        (False, None, "", Via.NOWHERE),
    ],
)
def test_choose_transport_prefers_stream_then_relay_then_dial(
    local: bool, route: Route | None, address: str, via: Via
) -> None:
    """Stream here, else the replica holding the stream, else the daemon's address, else none."""
    assert choose_transport(local_stream=local, route=route, address=address) is via


def test_a_record_of_a_live_peer_is_a_route() -> None:
    """A record naming a peer that refreshed its row recently routes to that peer."""
    clock = ManualClock()
    seen = clock.now_ms - 2_000
    assert judge(clock, seen_ms=seen) == mb(seen)


def test_a_record_goes_stale_with_its_replica() -> None:
    """As the clock moves past stale_after without a refresh, the record stops counting."""
    clock = ManualClock()
    seen = clock.now_ms
    clock.advance(STALE_MS / 1000)
    assert judge(clock, seen_ms=seen) == mb(seen)  # exactly at the limit: still live
    clock.advance(0.001)
    assert judge(clock, seen_ms=seen) is None
    refreshed = clock.now_ms
    assert judge(clock, seen_ms=refreshed) == mb(refreshed)  # it refreshed its row: live again


def test_a_last_seen_ahead_of_our_clock_counts_as_fresh() -> None:
    """Clock skew between replicas (their last-seen in our future) does not drop a route."""
    clock = ManualClock()
    ahead = clock.now_ms + 3_000
    assert judge(clock, seen_ms=ahead) == mb(ahead)


def test_a_record_naming_this_replica_is_ignored() -> None:
    """A record of our own is stale by definition: an open stream would be in our table."""
    clock = ManualClock()
    assert judge(clock, replica="ma", seen_ms=clock.now_ms) is None


def test_a_record_whose_replica_left_is_ignored() -> None:
    """No replica row (it stopped and removed it): no address, no route."""
    clock = ManualClock()
    assert judge(clock, seen_ms=0, address="") is None


def test_a_replica_that_could_not_be_reached_is_skipped_until_it_refreshes_its_row() -> None:
    """Unreachable when its row said T: no route while the row still says T (long before
    it would go stale), a route again once the replica refreshed it."""
    clock = ManualClock()
    failed_at = clock.now_ms - 1_000
    assert judge(clock, seen_ms=failed_at, unreachable_seen_ms=failed_at) is None
    clock.advance(STALE_MS / 2000)
    assert judge(clock, seen_ms=failed_at, unreachable_seen_ms=failed_at) is None
    assert judge(clock, seen_ms=failed_at + 1, unreachable_seen_ms=failed_at) == mb(failed_at + 1)


def test_routes_from_the_same_record_are_recognised() -> None:
    """Same replica and epoch: the same record (however fresh its row); a newer stream
    of the node (a higher epoch) or another replica is another one."""
    failed = Route("mb", MB.address, epoch=3, replica_seen_ms=100)
    assert failed.same_record(Route("mb", MB.address, epoch=3, replica_seen_ms=900))
    assert not failed.same_record(Route("mb", MB.address, epoch=4, replica_seen_ms=900))
    assert not failed.same_record(Route("mc", "10.0.0.13:7443", epoch=3))
    assert not failed.same_record(None)
