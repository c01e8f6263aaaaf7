"""AgentStates (what SyncAgentStates stores) against real SQLite and PostgreSQL databases:
snapshots, the spec versions and update errors reported with them, their events, and
reports group-committed without losing a node's order."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Collection

import pytest

from fleet.errors import NotFound
from manager.service.agents import AgentStates
from manager.service.heartbeats import HeartbeatBuffer
from manager.service.liveness import LivenessPolicy
from manager.service.registry import NodeRegistry
from manager.storage import (
    AgentStateRecord,
    AgentStateRepository,
    Database,
    EventRepository,
    NodeRecord,
    NodeRepository,
)
from manager.storage.desired import DesiredStateRepository, DesiredTx
from manager.storage.records import NodeDesiredRecord, UpdateErrorRecord

_NOW = 1_700_000_000.0


def _agent(node_id: str, agent_id: str, status: str = "RUNNING", **kw: object) -> AgentStateRecord:
    return AgentStateRecord(
        node_id=node_id,
        agent_id=agent_id,
        status=status,
        pid=100,
        type="worker",
        version="1.0",
        labels={"app": agent_id},
        health="HEALTHY",
        **kw,  # type: ignore[arg-type]
    )


class _Changes:
    def __init__(self) -> None:
        self.reported: list[set[str]] = []
        self.states: list[set[str]] = []

    def on_change(self, nodes: Collection[str]) -> None:
        self.reported.append(set(nodes))

    def on_states(self, nodes: Collection[str]) -> None:
        self.states.append(set(nodes))


async def _service(db: Database, *node_ids: str) -> tuple[AgentStates, _Changes]:
    nodes = NodeRepository(db)
    for nid in node_ids:
        await nodes.upsert(
            NodeRecord(nid, nid, "10.0.0.1", "linux", "x86_64", {}, "1", "1", ""), now_ms=1
        )
    registry = NodeRegistry(
        nodes,
        HeartbeatBuffer(nodes),
        policy=LivenessPolicy(),
        max_clock_skew=300,
        clock=lambda: _NOW,
    )
    for nid in node_ids:  # known from here on without a read (which could reorder calls)
        assert await registry.is_known(nid)
    changes = _Changes()
    agents = AgentStates(
        registry,
        DesiredStateRepository(db),
        clock=lambda: _NOW,
        on_change=changes.on_change,
        on_states=changes.on_states,
    )
    return agents, changes


async def _desired(db: Database, node_id: str) -> NodeDesiredRecord | None:
    async def body(tx: DesiredTx) -> NodeDesiredRecord | None:
        return (await tx.node_desired([node_id])).get(node_id)

    return await DesiredStateRepository(db).run(body, write=False)


async def _events(db: Database) -> list[tuple[str, str, str, str]]:
    return [
        (e.kind, e.node_id, e.agent_id, e.message)
        for e in await EventRepository(db).list_after(
            0, kinds=["AGENT_STATE_CHANGED", "NODE_UPDATE_ERROR"]
        )
    ]


async def test_a_report_stores_the_snapshot_the_version_and_the_errors_with_their_events(
    database: Database,
) -> None:
    """Agents, spec version and update errors land together, each change with its event;
    a report that changes nothing writes no event and pokes nothing."""
    agents, changes = await _service(database, "n1")
    assert await agents.sync("n1", [_agent("n1", "a"), _agent("n1", "b")]) == 2
    assert await _desired(database, "n1") is None  # never managed: nothing to remember
    assert changes.states == [{"n1"}]
    assert changes.reported == []

    refused = [UpdateErrorRecord("web", 2, "no such artifact")]
    again = [_agent("n1", "a"), _agent("n1", "b")]
    assert await agents.sync("n1", again, spec_version=3, update_errors=refused) == 0
    row = await _desired(database, "n1")
    assert row is not None
    assert (row.reported_version, row.update_errors) == (3, tuple(refused))
    assert changes.reported == [{"n1"}]

    # The same again: nothing written, nobody poked.
    assert await agents.sync("n1", again, spec_version=3, update_errors=refused) == 0
    assert changes.reported == [{"n1"}]
    assert changes.states == [{"n1"}]

    crashed = [_agent("n1", "a", "BACKOFF", exit_code=3)]
    assert await agents.sync("n1", crashed, spec_version=3, update_errors=[]) == 2
    row = await _desired(database, "n1")
    assert row is not None
    assert row.update_errors == ()
    assert await _events(database) == [
        ("AGENT_STATE_CHANGED", "n1", "a", "a on n1 added: RUNNING"),
        ("AGENT_STATE_CHANGED", "n1", "b", "b on n1 added: RUNNING"),
        ("NODE_UPDATE_ERROR", "n1", "", "n1 cannot run what it was pushed: web: no such artifact"),
        ("AGENT_STATE_CHANGED", "n1", "a", "a on n1: RUNNING -> BACKOFF"),
        ("AGENT_STATE_CHANGED", "n1", "b", "b on n1 removed (was RUNNING)"),
        ("NODE_UPDATE_ERROR", "n1", "", "n1 runs everything it was pushed again"),
    ]
    stored = await AgentStateRepository(database).list()
    assert stored == [dataclasses.replace(crashed[0], reported_ms=int(_NOW * 1000))]


async def test_reports_of_many_nodes_share_commits_and_keep_each_nodes_order(
    database: Database,
) -> None:
    """Reports arriving together are written in fewer transactions than reports; a node
    that reported twice ends with its later report, its events in the order it sent them;
    an unknown node is NotFound and its neighbours are stored."""
    ids = [f"n{i}" for i in range(30)]
    agents, _ = await _service(database, *ids)
    first = [agents.sync(nid, [_agent(nid, "a")]) for nid in ids]
    then = agents.sync("n7", [_agent("n7", "a", "EXITED", exit_code=1)])
    ghost = agents.sync("ghost", [_agent("ghost", "a")])
    results = await asyncio.gather(*first, then, ghost, return_exceptions=True)
    assert results[:-1] == [1] * 31
    assert isinstance(results[-1], NotFound)
    assert agents.commits < 31
    listed = await AgentStateRepository(database).list()
    assert [(s.node_id, s.status) for s in listed] == sorted(
        (nid, "EXITED" if nid == "n7" else "RUNNING") for nid in ids
    )
    n7 = [e for e in await _events(database) if e[1] == "n7"]
    assert [m for _, _, _, m in n7] == ["a on n7 added: RUNNING", "a on n7: RUNNING -> EXITED"]


async def test_a_report_of_an_unknown_node_stores_nothing(database: Database) -> None:
    agents, changes = await _service(database, "n1")
    with pytest.raises(NotFound):
        await agents.sync("ghost", [_agent("ghost", "a")], spec_version=2)
    assert await AgentStateRepository(database).list() == []
    assert await _events(database) == []
    assert changes.reported == []
    assert changes.states == []
