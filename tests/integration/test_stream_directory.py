"""The stream directory on a real database: batched records, repair, routes by replica liveness."""

from __future__ import annotations

import pytest
from manager_harness import FakeClock

from fleet.errors import FailedPrecondition
from manager.pool.config import ControlConfig
from manager.pool.routing import Route
from manager.pool.stream import ControlSession, ControlStreams
from manager.service.replicas import StreamDirectory
from manager.storage.db import Database
from manager.storage.replicas import ReplicaRepository


def directory(database: Database, clock: FakeClock) -> tuple[StreamDirectory, ControlStreams]:
    """Replica ma's directory over its own ControlStreams (hooked as the server does)."""
    holder: list[StreamDirectory] = []
    streams = ControlStreams(clock=clock, on_change=lambda n: holder[0].changed(n))
    d = StreamDirectory(
        ReplicaRepository(database),
        streams,
        replica_id="ma",
        address="127.0.0.1:7001",
        heartbeat=3600.0,  # the loops stay out of the way; the test calls flush/reconcile
        stale_after=10.0,
        reconcile=3600.0,
        clock=clock,
    )
    holder.append(d)
    return d, streams


def session(node_id: str) -> ControlSession:
    return ControlSession(node_id, ControlConfig())


async def test_streams_opened_and_closed_together_are_one_write(database: Database) -> None:
    """Three opens are one transaction; a close deletes only the record; nothing else writes."""
    clock = FakeClock()
    d, streams = directory(database, clock)
    repo = ReplicaRepository(database)
    await d.start()
    try:
        s1 = session("n1")
        for s in (s1, session("n2"), session("n3")):
            streams.attach(s)
        await d.flush()
        assert d.writes == 1
        assert await repo.streams_of("ma") == {"n1": 1, "n2": 1, "n3": 1}
        streams.detach(s1)
        await d.flush()
        await d.flush()  # nothing changed: no write
        assert d.writes == 2
        assert await repo.streams_of("ma") == {"n2": 1, "n3": 1}
    finally:
        await d.stop()
    assert await repo.streams_of("ma") == {}
    assert await repo.replicas() == []


async def test_reconcile_claims_a_lost_record_and_drops_a_stale_one(database: Database) -> None:
    """mb overwrote n2 then deleted its record (a race): ma claims it back; ma's orphan goes."""
    clock = FakeClock()
    d, streams = directory(database, clock)
    repo = ReplicaRepository(database)
    await d.start()
    try:
        streams.attach(session("n2"))
        await d.flush()
        # mb's delayed write lands after ours, then mb's stream ends: the record is gone.
        epoch = (await repo.record_streams("mb", ["n2"], {}, now_ms=clock.ms()))["n2"]
        await repo.record_streams("mb", [], {"n2": epoch}, now_ms=clock.ms())
        # And a record naming ma for a stream ma does not hold (a delete that failed).
        await repo.record_streams("ma", ["n9"], {}, now_ms=clock.ms())
        assert await d.reconcile() == (1, 1)
        assert set(await repo.streams_of("ma")) == {"n2"}
        assert await d.reconcile() == (0, 0)
    finally:
        await d.stop()


def where(route: Route | None) -> tuple[str, str] | None:
    """Which replica a route goes to, and its address (not the record's epoch or times)."""
    return None if route is None else (route.replica_id, route.address)


async def test_routes_follow_the_holding_replicas_liveness(database: Database) -> None:
    """A node on live mb routes there; once mb is silent past stale_after it does not."""
    clock = FakeClock()
    d, streams = directory(database, clock)
    repo = ReplicaRepository(database)
    await repo.register("mb", "127.0.0.1:7002", now_ms=clock.ms(), live_after_ms=0)
    await d.start()
    try:
        await repo.record_streams("mb", ["n5"], {}, now_ms=clock.ms())
        assert where(await d.route("n5")) == ("mb", "127.0.0.1:7002")
        assert await d.route("n6") is None  # nowhere
        clock.advance(9.0)
        assert where(await d.route("n5")) == ("mb", "127.0.0.1:7002")
        clock.advance(2.0)
        assert await d.route("n5") is None  # mb died: its record is ignored
        await repo.touch("mb", now_ms=clock.ms())
        assert where(await d.route("n5")) == ("mb", "127.0.0.1:7002")
        # Our own record never routes (the stream would be in our table).
        streams.attach(session("n7"))
        await d.flush()
        assert await d.route("n7") is None
    finally:
        await d.stop()


async def test_a_namesake_at_another_address_cannot_start(database: Database) -> None:
    """Two live replicas with one certificate name: the second start is refused, saying why."""
    clock = FakeClock()
    first, _ = directory(database, clock)
    await first.start()
    try:
        repo = ReplicaRepository(database)
        other = StreamDirectory(
            repo,
            ControlStreams(clock=clock),
            replica_id="ma",
            address="127.0.0.1:7999",
            heartbeat=3600.0,
            stale_after=10.0,
            reconcile=3600.0,
            clock=clock,
        )
        with pytest.raises(FailedPrecondition, match=r"'ma' is running at 127\.0\.0\.1:7001"):
            await other.start()
    finally:
        await first.stop()
