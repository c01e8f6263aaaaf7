"""AgentStateRepository against real SQLite and PostgreSQL databases."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from fleet.errors import InvalidArgument, NotFound
from manager.storage import (
    AgentStateRecord,
    AgentStateRepository,
    Database,
    EventRepository,
    NodeRecord,
    NodeRepository,
)
from manager.storage.agents import replace_many


def _agent(
    agent_id: str, status: str = "RUNNING", node_id: str = "n1", **kw: object
) -> AgentStateRecord:
    return AgentStateRecord(
        node_id=node_id,
        agent_id=agent_id,
        status=status,
        pid=100,
        last_heartbeat_ms=1_000,
        type="worker",
        version="1.0",
        labels={"app": agent_id},
        health="HEALTHY",
        **kw,  # type: ignore[arg-type]
    )


async def _register(db: Database, *node_ids: str) -> None:
    for nid in node_ids:
        await NodeRepository(db).upsert(
            NodeRecord(nid, nid, "10.0.0.1", "linux", "x86_64", {}, "1", "1", "h:1"), now_ms=1
        )


async def _agent_events(db: Database) -> list[tuple[str, str, str, str]]:
    return [
        (e.agent_id, e.attributes["change"], e.attributes["from"], e.attributes["to"])
        for e in await EventRepository(db).list_after(0, kinds=["AGENT_STATE_CHANGED"])
    ]


async def test_replace_adds_changes_and_removes_with_one_event_each(database: Database) -> None:
    """Each added, changed or removed agent yields exactly one event; unchanged ones none."""
    await _register(database, "n1")
    agents = AgentStateRepository(database)
    assert await agents.replace("n1", [_agent("a"), _agent("b")], now_ms=10, actor="node/n1") == 2
    # Same report again, only the heartbeat moved: no change, no event.
    again = [dataclasses.replace(_agent("a"), last_heartbeat_ms=2_000), _agent("b")]
    assert await agents.replace("n1", again, now_ms=20, actor="node/n1") == 0
    assert (
        await agents.replace(
            "n1", [_agent("a", "EXITED", exit_code=1), _agent("c")], now_ms=30, actor="node/n1"
        )
        == 3
    )
    assert await _agent_events(database) == [
        ("a", "added", "", "RUNNING"),
        ("b", "added", "", "RUNNING"),
        ("a", "changed", "RUNNING", "EXITED"),
        ("b", "removed", "RUNNING", ""),
        ("c", "added", "", "RUNNING"),
    ]
    listed = await agents.list()
    assert [(s.agent_id, s.status, s.exit_code) for s in listed] == [
        ("a", "EXITED", 1),
        ("c", "RUNNING", 0),
    ]
    assert listed[1] == dataclasses.replace(_agent("c"), reported_ms=30)  # stored at the sync


async def test_replace_with_empty_list_removes_everything(database: Database) -> None:
    """An empty report removes the node's agents (one event each)."""
    await _register(database, "n1")
    agents = AgentStateRepository(database)
    await agents.replace("n1", [_agent("a"), _agent("b")], now_ms=1, actor="node/n1")
    assert await agents.replace("n1", [], now_ms=2, actor="node/n1") == 2
    assert await agents.list() == []


async def test_failure_midway_keeps_the_old_set(database: Database) -> None:
    """A record the schema rejects late in the list leaves the old states and no events."""
    await _register(database, "n1")
    agents = AgentStateRepository(database)
    await agents.replace("n1", [_agent("a")], now_ms=1, actor="node/n1")
    before_events = await EventRepository(database).latest_id()
    bad = [_agent("b"), _agent("c"), _agent("d", restart_count=-1)]
    with pytest.raises(InvalidArgument, match="restart_count"):
        await agents.replace("n1", bad, now_ms=2, actor="node/n1")
    assert await agents.list() == [dataclasses.replace(_agent("a"), reported_ms=1)]
    assert await EventRepository(database).latest_id() == before_events


async def test_replace_rejects_foreign_and_duplicate_records(database: Database) -> None:
    """A state of another node or a repeated agent id is InvalidArgument naming the field."""
    await _register(database, "n1", "n2")
    agents = AgentStateRepository(database)
    with pytest.raises(InvalidArgument, match=r"states\[1\]\.node_id"):
        await agents.replace("n1", [_agent("a"), _agent("b", node_id="n2")], now_ms=1, actor="x")
    with pytest.raises(InvalidArgument, match=r"states\[1\]\.agent_id"):
        await agents.replace("n1", [_agent("a"), _agent("a")], now_ms=1, actor="x")
    assert await agents.list() == []


async def test_replace_for_unknown_node_is_not_found(database: Database) -> None:
    """Agent states of a node that never registered raise NotFound and store nothing."""
    agents = AgentStateRepository(database)
    with pytest.raises(NotFound, match="ghost"):
        await agents.replace("ghost", [_agent("a", node_id="ghost")], now_ms=1, actor="x")
    assert await agents.list() == []


async def test_list_by_node_and_counts_by_status(database: Database) -> None:
    """list filters by node ids; counts_by_status counts one node's agents per status."""
    await _register(database, "n1", "n2", "n3")
    agents = AgentStateRepository(database)
    await agents.replace(
        "n1", [_agent("a"), _agent("b", "FATAL"), _agent("c")], now_ms=1, actor="node/n1"
    )
    await agents.replace("n2", [_agent("x", node_id="n2")], now_ms=1, actor="node/n2")
    await agents.replace("n3", [_agent("y", node_id="n3")], now_ms=1, actor="node/n3")
    assert [(s.node_id, s.agent_id) for s in await agents.list(node_ids=["n3", "n1"])] == [
        ("n1", "a"),
        ("n1", "b"),
        ("n1", "c"),
        ("n3", "y"),
    ]
    assert await agents.list(node_ids=[]) == []
    assert await agents.counts_by_status("n1") == {"RUNNING": 2, "FATAL": 1}
    assert await agents.counts_by_status("nobody") == {}


async def _messages(db: Database) -> list[str]:
    events = await EventRepository(db).list_after(0, kinds=["AGENT_STATE_CHANGED"])
    return [e.message for e in events]


async def test_events_say_why_an_agent_restarted(database: Database) -> None:
    """A restart seen as RUNNING -> RUNNING (new pid) names the last exit's reason; a state
    change carries it too; the attributes hold the reason and the exit code."""
    await _register(database, "n1")
    agents = AgentStateRepository(database)
    await agents.replace("n1", [_agent("web", start_time_ms=1)], now_ms=1, actor="node/n1")
    killed = dataclasses.replace(
        _agent("web"),
        pid=200,
        start_time_ms=5,
        restart_count=1,
        exit_code=-9,
        last_exit_kind="killed",
        last_exit_code=-9,
        last_exit_reason="killed by SIGKILL",
        last_exit_ms=4,
    )
    await agents.replace("n1", [killed], now_ms=6, actor="node/n1")
    crashed = dataclasses.replace(
        killed,
        status="BACKOFF",
        pid=0,
        exit_code=3,
        last_exit_kind="exited",
        last_exit_code=3,
        last_exit_reason="exited with code 3",
        last_exit_ms=7,
    )
    await agents.replace("n1", [crashed], now_ms=8, actor="node/n1")
    assert await _messages(database) == [
        "web on n1 added: RUNNING",
        "web on n1 restarted (pid 100 -> 200): killed by SIGKILL",
        "web on n1: RUNNING -> BACKOFF: exited with code 3",
    ]
    events = await EventRepository(database).list_after(0, kinds=["AGENT_STATE_CHANGED"])
    assert events[1].attributes["reason"] == "killed by SIGKILL"
    assert events[1].attributes["exit_code"] == "-9"
    stored = (await agents.list())[0]
    assert (stored.last_exit_kind, stored.last_exit_code, stored.last_exit_reason) == (
        "exited",
        3,
        "exited with code 3",
    )


async def test_replace_many_writes_a_group_of_nodes_as_one_replace_each(
    database: Database,
) -> None:
    """A group of reports in one transaction: each registered node's set replaced with its
    own events (actor node/<id>), an unknown node answered None with nothing written."""
    await _register(database, "n1", "n2")
    agents = AgentStateRepository(database)
    await agents.replace("n2", [_agent("old", node_id="n2")], now_ms=5, actor="node/n2")

    async def body(conn: AsyncConnection) -> list[int | None]:
        return await replace_many(
            conn,
            [
                ("n2", [_agent("a", node_id="n2")]),
                ("ghost", [_agent("a", node_id="ghost")]),
                ("n1", [_agent("a"), _agent("b")]),
            ],
            now_ms=10,
        )

    assert await database.run(body) == [2, None, 2]
    listed = await agents.list()
    assert [(s.node_id, s.agent_id, s.reported_ms) for s in listed] == [
        ("n1", "a", 10),
        ("n1", "b", 10),
        ("n2", "a", 10),
    ]
    events = await EventRepository(database).list_after(0, kinds=["AGENT_STATE_CHANGED"])
    assert sorted((e.node_id, e.agent_id, e.actor) for e in events if e.timestamp_ms == 10) == [
        ("n1", "a", "node/n1"),
        ("n1", "b", "node/n1"),
        ("n2", "a", "node/n2"),
        ("n2", "old", "node/n2"),
    ]

    async def twice(conn: AsyncConnection) -> list[int | None]:
        return await replace_many(conn, [("n1", []), ("n1", [])], now_ms=20)

    with pytest.raises(ValueError, match="listed twice"):
        await database.run(twice)
    assert len(await agents.list(node_ids=["n1"])) == 2  # nothing written
