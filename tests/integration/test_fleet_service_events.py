"""WatchEvents: replay, follow, resume; and how the feed wakes (local commit vs re-read)."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from pathlib import Path
from typing import Any

import grpc
from fleet_harness import PROD, fleet_env, operate, selector
from manager_harness import rpc_error

from fleet.v1 import fleet_pb2
from manager.service.event_feed import EventFeed
from manager.storage import Database, EventRepository

OPERATION = fleet_pb2.EVENT_KIND_OPERATION
REGISTERED = fleet_pb2.EVENT_KIND_NODE_REGISTERED


async def test_events_stream_shows_operations_and_resumes(pki: Any, tmp_path: Path) -> None:
    """A follower sees a rollout's OPERATION events live; a new watch resumes after an id."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("n1", "n2", labels=PROD)
        call = env.stub.WatchEvents(
            fleet_pb2.FleetServiceWatchEventsRequest(kinds=[OPERATION], follow=True)
        )
        stream = call.__aiter__()
        _, summary = await operate(env.stub, selector=selector("env=prod"), agent_id="web")
        async with asyncio.timeout(10):
            started = (await anext(stream)).event
            finished = (await anext(stream)).event
        call.cancel()
        assert started.actor == finished.actor == "operator/alice"
        assert started.attributes["outcome"] == "started"
        assert finished.attributes["outcome"] == "ok"
        assert finished.attributes["ok"] == "2"
        assert finished.attributes["operation_id"] == summary.operation_id
        assert "restart of agent web" in finished.message
        assert finished.id > started.id

        resumed = env.stub.WatchEvents(
            fleet_pb2.FleetServiceWatchEventsRequest(from_event_id=started.id)
        )
        ids = [m.event.id async for m in resumed]
        assert ids[0] == finished.id
        assert all(i > started.id for i in ids)

        per_node = env.stub.WatchEvents(fleet_pb2.FleetServiceWatchEventsRequest(node_id="n2"))
        events = [m.event async for m in per_node]
        assert fleet_pb2.EVENT_KIND_NODE_REGISTERED in [e.kind for e in events]
        assert {e.node_id for e in events} == {"n2"}


async def _ids(stub: Any, **fields: Any) -> tuple[list[int], list[bool]]:
    """The NODE_REGISTERED ids a finished watch sent, and each one's older_events_left_out."""
    request = fleet_pb2.FleetServiceWatchEventsRequest(kinds=[REGISTERED], **fields)
    call = stub.WatchEvents(request)
    items = [m async for m in call]
    return [m.event.id for m in items], [m.older_events_left_out for m in items]


async def test_watch_with_tail_sends_the_newest_and_says_older_were_left_out(
    pki: Any, tmp_path: Path
) -> None:
    """tail=N sends the last N matching events and flags the first when older ones exist."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("n1", "n2", "n3", "n4", labels=PROD)
        everything, flags = await _ids(env.stub)  # no tail: everything, as old clients get
        assert len(everything) == 4
        assert flags == [False] * 4
        assert await _ids(env.stub, tail=2) == (everything[2:], [True, False])
        assert await _ids(env.stub, tail=4) == (everything, [False] * 4)
        assert await _ids(env.stub, tail=9) == (everything, [False] * 4)
        assert await _ids(env.stub, tail=1, from_event_id=everything[0]) == (
            everything[3:],
            [True],
        )
        assert await _ids(env.stub, tail=1, node_id="n2") == ([everything[1]], [False])
        assert await _ids(env.stub, tail=0) == ([], [])


async def test_followed_watch_with_tail_zero_starts_from_now(pki: Any, tmp_path: Path) -> None:
    """tail=0 with follow replays nothing and then sends what happens next."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("n1", "n2", labels=PROD)
        call = env.stub.WatchEvents(fleet_pb2.FleetServiceWatchEventsRequest(follow=True, tail=0))
        stream = call.__aiter__()
        nxt = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.3)
        assert not nxt.done(), "nothing from the past may be replayed"
        await env.add_nodes("n3", labels=PROD)
        async with asyncio.timeout(10):
            first = await nxt
        call.cancel()
        assert (first.event.kind, first.event.node_id) == (REGISTERED, "n3")
        assert not first.older_events_left_out


async def test_bad_watch_requests_are_invalid_argument(pki: Any, tmp_path: Path) -> None:
    """A negative position, an unspecified kind or a bad node id is INVALID_ARGUMENT naming it."""
    async with fleet_env(pki, tmp_path) as env:
        for req, field in [
            (fleet_pb2.FleetServiceWatchEventsRequest(from_event_id=-1), "from_event_id"),
            (fleet_pb2.FleetServiceWatchEventsRequest(kinds=[0]), "kinds[0]"),
            (fleet_pb2.FleetServiceWatchEventsRequest(node_id="Not A Node!"), "node_id"),
            (fleet_pb2.FleetServiceWatchEventsRequest(tail=-1), "tail: must be >= 0"),
        ]:

            async def first(r: Any = req) -> None:
                async for _ in env.stub.WatchEvents(r):
                    break

            err = await rpc_error(first())
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in (err.details() or "")


async def test_local_commit_wakes_a_follower_without_polling(database_url: str) -> None:
    """With re-reads an hour apart, an event this process commits still arrives at once."""
    db = await Database.open(database_url)
    try:
        await db.migrate()
        events = EventRepository(db)
        feed = EventFeed(events, poll_interval=3600)
        remove = feed.install(db.engine)
        try:
            async with aclosing(feed.watch(0, follow=True)) as watch:
                nxt = asyncio.ensure_future(anext(watch))
                await asyncio.sleep(0.1)  # the watcher is now waiting
                assert not nxt.done()
                await events.append("OPERATION", message="hello", now_ms=1)
                async with asyncio.timeout(2):
                    record = await nxt
            assert record.message == "hello"
        finally:
            remove()
    finally:
        await db.close()


async def test_other_replicas_events_arrive_by_re_reading(database_url: str) -> None:
    """An event written through another connection pool (a replica) arrives at the next re-read."""
    url = database_url
    db, other = await Database.open(url), None
    try:
        await db.migrate()
        other = await Database.open(url)
        feed = EventFeed(EventRepository(db), poll_interval=0.2)
        remove = feed.install(db.engine)  # watches only this pool's commits
        try:
            async with aclosing(feed.watch(0, follow=True)) as watch:
                nxt = asyncio.ensure_future(anext(watch))
                await asyncio.sleep(0.05)
                await EventRepository(other).append("NODE_ONLINE", node_id="n9", now_ms=1)
                async with asyncio.timeout(3):
                    record = await nxt
            assert (record.kind, record.node_id) == ("NODE_ONLINE", "n9")
        finally:
            remove()
    finally:
        if other is not None:
            await other.close()
        await db.close()
