"""EventRepository against real SQLite and PostgreSQL databases."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from fleet.errors import InvalidArgument
from manager.storage import Database, EventRepository
from manager.storage.db import advisory_key


async def test_ids_are_monotonic_and_round_trip(database: Database) -> None:
    """Appended events come back in order with increasing ids and every field intact."""
    events = EventRepository(database)
    assert await events.latest_id() == 0
    first = await events.append("OPERATION", actor="operator/a", message="m1", now_ms=10)
    second = await events.append(
        "AGENT_STATE_CHANGED",
        node_id="n1",
        agent_id="web",
        message="web exited",
        actor="node/n1",
        attributes={"from": "RUNNING", "to": "EXITED"},
        now_ms=20,
    )
    assert 0 < first < second == await events.latest_id()
    got = await events.list_after(first)
    assert len(got) == 1
    e = got[0]
    assert (e.id, e.timestamp_ms, e.kind, e.node_id, e.agent_id, e.message, e.actor) == (
        second,
        20,
        "AGENT_STATE_CHANGED",
        "n1",
        "web",
        "web exited",
        "node/n1",
    )
    assert e.attributes == {"from": "RUNNING", "to": "EXITED"}


async def test_list_after_filters_by_kind_node_and_limit(database: Database) -> None:
    """list_after applies kinds, node_id and limit together, oldest first."""
    events = EventRepository(database)
    for i in range(6):
        await events.append(
            "NODE_ONLINE" if i % 2 else "NODE_OFFLINE", node_id=f"n{i % 3}", now_ms=i
        )
    all_ids = [e.id for e in await events.list_after(0)]
    assert all_ids == sorted(all_ids)
    assert len(all_ids) == 6
    assert [e.id for e in await events.list_after(0, limit=2)] == all_ids[:2]
    online = await events.list_after(0, kinds=["NODE_ONLINE"])
    assert [e.timestamp_ms for e in online] == [1, 3, 5]
    n1 = await events.list_after(0, node_id="n1")
    assert [e.timestamp_ms for e in n1] == [1, 4]
    both = await events.list_after(all_ids[1], kinds={"NODE_ONLINE"}, node_id="n0")
    assert [e.timestamp_ms for e in both] == [3]


async def test_id_before_last_finds_where_the_last_n_matching_events_begin(
    database: Database,
) -> None:
    """list_after(id_before_last(n)) is exactly the last n matching events; None if fewer."""
    events = EventRepository(database)
    for i in range(6):
        await events.append(
            "NODE_ONLINE" if i % 2 else "NODE_OFFLINE", node_id=f"n{i % 3}", now_ms=i
        )
    ids = [e.id for e in await events.list_after(0)]
    assert await events.id_before_last(2) == ids[3]
    assert [e.id for e in await events.list_after(ids[3])] == ids[4:]
    assert await events.id_before_last(0) == ids[5]
    assert await events.id_before_last(6) is None
    assert await events.id_before_last(2, after_id=ids[3]) is None
    online = await events.id_before_last(1, kinds=["NODE_ONLINE"])
    assert [e.timestamp_ms for e in await events.list_after(online, kinds=["NODE_ONLINE"])] == [5]
    n1 = await events.id_before_last(1, node_id="n1")
    assert [e.timestamp_ms for e in await events.list_after(n1, node_id="n1")] == [4]
    with pytest.raises(InvalidArgument, match="count"):
        await events.id_before_last(-1)


async def test_unknown_kind_is_rejected_and_writes_nothing(database: Database) -> None:
    """An unknown event kind is InvalidArgument naming the kind; nothing is appended."""
    events = EventRepository(database)
    with pytest.raises(InvalidArgument, match="NODE_EXPLODED"):
        await events.append("NODE_EXPLODED", now_ms=1)
    with pytest.raises(InvalidArgument, match="kinds"):
        await events.list_after(0, kinds=["BOGUS"])
    with pytest.raises(InvalidArgument, match="limit"):
        await events.list_after(0, limit=0)
    assert await events.latest_id() == 0


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_postgres_event_ids_become_visible_in_order(
    database: Database, database_url: str
) -> None:
    """While an earlier event's transaction is open, a later append waits: no id is skipped."""
    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(False)
    conn = await asyncpg.connect(dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        # What every event-writing transaction does first (manager.storage.events).
        await conn.execute("SELECT pg_advisory_xact_lock($1)", advisory_key("fleet-events"))
        slow_id = await conn.fetchval(
            "INSERT INTO events (ts_ms, kind, node_id, agent_id, message, actor, attributes) "
            "VALUES (1, 'OPERATION', '', '', 'slow', '', '{}') RETURNING id"
        )
        events = EventRepository(database)
        fast = asyncio.create_task(events.append("OPERATION", message="fast", now_ms=2))
        await asyncio.sleep(0.5)
        assert not fast.done()
        assert await events.list_after(0) == []
        await tx.commit()
    finally:
        await conn.close()
    fast_id = await fast
    assert fast_id > slow_id
    assert [e.message for e in await events.list_after(0)] == ["slow", "fast"]
