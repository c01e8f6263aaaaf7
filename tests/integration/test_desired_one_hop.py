"""DesiredStateRepository.run_in_one_hop: on SQLite a desired-state transaction in one
hop to aiosqlite's thread (`SqliteDesiredTx`, plain sqlite3), reading and writing what
`DesiredTx` (SQLAlchemy) does; on PostgreSQL it is `run`."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from manager.storage import (
    AgentStateRecord,
    AuditRepository,
    Database,
    EventRepository,
    NodeRecord,
    NodeRepository,
)
from manager.storage.desired import DesiredStateRepository, DesiredTx
from manager.storage.records import (
    AssignmentRecord,
    DefinitionRecord,
    NodeDesiredRecord,
    RevisionRecord,
    RolloutNodeRecord,
    RolloutRecord,
    UpdateErrorRecord,
)

NODES = ("n1", "n2", "n3")


def _agent(node_id: str, agent_id: str, revision: int, status: str = "RUNNING") -> AgentStateRecord:
    return AgentStateRecord(
        node_id=node_id,
        agent_id=agent_id,
        status=status,
        pid=7,
        labels={"app": agent_id} if node_id != "n3" else {},
        health="HEALTHY",
        revision=revision,
        start_time_ms=5,
        health_message="ok",
        health_since_ms=6,
        reported_ms=1,
    )


async def _seed(db: Database) -> tuple[DesiredStateRepository, int]:
    nodes = NodeRepository(db)
    for n in NODES:
        await nodes.upsert(
            NodeRecord(n, n, "10.0.0.1", "linux", "x86_64", {}, "1", "1", ""), now_ms=1
        )
    repo = DesiredStateRepository(db)

    async def body(tx: DesiredTx) -> int:
        for name, rev in (("web", 2), ("db", 1)):
            await tx.put_definition(DefinitionRecord(name, rev, rev - 1 or 1, 0, 10, 20))
            for r in range(1, rev + 1):
                await tx.add_revision(RevisionRecord(name, r, f'{{"r": {r}}}', "h", "op", "m", 30))
        await tx.set_assignments(
            [AssignmentRecord(n, "web", 1, 40) for n in NODES]
            + [AssignmentRecord("n1", "db", 1, 41)]
        )
        await tx.put_node_desired(
            [
                # n1's version 3 did not reach it (its push failed); n3's push failed
                # too, but its daemon reports running version 2 (the answer was lost).
                NodeDesiredRecord("n1", 3, "c1", 2, 2, "refused", 1, 0, (), 50),
                NodeDesiredRecord(
                    "n2", 4, "c2", 4, 4, "down", 2, 99, (UpdateErrorRecord("web", 2, "no"),), 51
                ),
                NodeDesiredRecord("n3", 2, "c3", 1, 2, "timeout", 1, 0, (), 52),
            ]
        )
        rid = await tx.add_rollout(
            RolloutRecord(0, "web", 2, 1, "RUNNING", "{}", "op", "m", 60, 61)
        )
        await tx.add_rollout(
            RolloutRecord(0, "db", 1, 0, "SUCCESSFUL", "{}", "op", "m", 62, 63, 64)
        )
        await tx.put_rollout_nodes(
            [RolloutNodeRecord(rid, n, "UPDATING", 1, 70, n == "n2", "") for n in NODES[:2]]
        )
        await tx.replace_agents(
            [(n, [_agent(n, "web", 1), _agent(n, "db", 1, "STOPPED")]) for n in NODES], now_ms=80
        )
        return rid

    return repo, await repo.run(body)


async def _reads(tx: DesiredTx, rid: int) -> dict[str, object]:
    return {
        "definitions": await tx.definitions(),
        "definitions named": await tx.definitions(["web", "nope"], for_update=True),
        "revisions": await tx.revisions_of({("web", 1), ("web", 2), ("db", 1), ("db", 9)}),
        "assignments": await tx.assignments(),
        "assignments by name": await tx.assignments(names=["db"]),
        "assignments by node": await tx.assignments(node_ids=["n1", "n3", "nope"]),
        "assignments by both": await tx.assignments(names=["web"], node_ids=["n1"]),
        "agents": await tx.agent_states(),
        "agents of nodes": await tx.agent_states(node_ids=["n2", "n3"], agent_id="web"),
        "judged": await tx.judged_agents(["n1", "n3", "nope"], "web"),
        "node rows": await tx.node_desired(),
        "node rows by id": await tx.node_desired(["n2", "n3"]),
        "observed rows": await tx.observed_rows(["n1", "n2", "n3", "nope"]),
        "rollouts": await tx.rollouts(),
        "live rollouts": await tx.rollouts(live=True, limit=5),
        "rollouts of db": await tx.rollouts(name="db", limit=1),
        "rollout": await tx.rollout(rid, for_update=True),
        "no rollout": await tx.rollout(rid + 100),
        "rollout nodes": await tx.rollout_nodes(rid),
        "nodes": await tx.all_nodes(),
        "nodes by id": await tx.nodes(["n3", "n1", "nope"]),
        "revision": await tx.revision("web", 2),
        "no revision": await tx.revision("web", 9),
        "online ids": await tx.online_ids(),
        "agent briefs": await tx.agent_briefs(["n1", "n3", "nope"], "web"),
    }


async def test_one_hop_reads_what_the_sqlalchemy_tx_reads(database: Database) -> None:
    """Every read of a one-hop transaction returns the records DesiredTx returns."""
    repo, rid = await _seed(database)
    await NodeRepository(database).mark_offline(cutoff_ms=10**15, now_ms=2, only=["n2"])
    expected = await repo.run(lambda tx: _reads(tx, rid), write=False)
    got = await repo.run_in_one_hop(lambda tx: _reads(tx, rid))
    assert got == expected
    assert await repo.run_in_one_hop(lambda tx: _reads(tx, rid), write=False) == expected
    assert expected["judged"]
    assert expected["agents of nodes"]
    assert expected["rollout nodes"]
    assert [n.node_id for n in expected["nodes"]] == list(NODES)  # type: ignore[attr-defined]
    assert expected["revision"] is not None
    assert expected["online ids"] == {"n1", "n3"}
    assert set(expected["agent briefs"]) == {"n1", "n3"}  # type: ignore[arg-type]
    # Only the rows with update errors (n2) or a push error on a set neither delivered nor
    # reported (n1), with the columns a rollout observes.
    assert expected["observed rows"] == {
        "n1": NodeDesiredRecord(
            "n1", 3, delivered_version=2, reported_version=2, push_error="refused"
        ),
        "n2": NodeDesiredRecord(
            "n2", 4, delivered_version=4, reported_version=4, push_error="down",
            update_errors=(UpdateErrorRecord("web", 2, "no"),),
        ),
    }  # fmt: skip


async def test_one_hop_writes_what_the_sqlalchemy_tx_reads_back(database: Database) -> None:
    """The writes of a one-hop transaction (and its queued events) are stored as
    DesiredTx's would be, in one commit."""
    repo, rid = await _seed(database)
    events = EventRepository(database)
    before = await events.list_after(0, limit=1000)
    rollout = await repo.run(lambda tx: tx.rollout(rid))
    assert rollout is not None
    moved = dataclasses.replace(rollout, state="SUCCESSFUL", record='{"x": 1}', ended_ms=90)
    rows = [
        NodeDesiredRecord("n3", 1, "c3", 0, 0, "", 0, 0, (UpdateErrorRecord("db", 1, "x"),), 91),
        NodeDesiredRecord("n1", 5, "c5", 5, 5, "", 0, 0, (), 92),
    ]

    async def body(tx: DesiredTx) -> list[int | None]:
        await tx.put_definition(DefinitionRecord("web", 2, 2, 0, 10, 93))
        await tx.set_assignments([AssignmentRecord("n2", "web", 2, 94)])
        await tx.delete_assignments([("n1", "db")])
        await tx.put_node_desired(rows)
        await tx.update_rollout(moved)
        await tx.put_rollout_nodes([RolloutNodeRecord(rid, "n1", "DONE", 1, 95, False, "ok")])
        await tx.add_revision(RevisionRecord("web", 3, '{"r": 3}', "h3", "op", "m3", 98, True))
        added.append(
            await tx.add_rollout(RolloutRecord(0, "web", 3, 2, "RUNNING", "{}", "op", "m", 99, 99))
        )
        tx.event("ROLLOUT_BATCH", now_ms=96, actor="manager", message="batch 1 done")
        tx.audit(
            actor="operator/a",
            action="definitions.apply",
            target="x" * 400,
            detail={"revisions": "web@3"},
            outcome="ok",
            now_ms=99,
        )
        return await tx.replace_agents([("n1", [_agent("n1", "web", 2)]), ("gone", [])], now_ms=97)

    added: list[int] = []
    audits_before = await AuditRepository(database).list_recent(limit=100)
    assert await repo.run_in_one_hop(body) == [2, None]  # web changed, db removed
    assert added
    assert added[0] > rid
    assert await repo.run(lambda tx: tx.rollout(added[0])) == RolloutRecord(
        added[0], "web", 3, 2, "RUNNING", "{}", "op", "m", 99, 99
    )
    assert await repo.run(lambda tx: tx.revision("web", 3)) == RevisionRecord(
        "web", 3, '{"r": 3}', "h3", "op", "m3", 98, True
    )
    audits = [
        a for a in await AuditRepository(database).list_recent(limit=100) if a not in audits_before
    ]
    assert [(a.actor, a.action, len(a.target), a.detail, a.outcome) for a in audits] == [
        ("operator/a", "definitions.apply", 300, {"revisions": "web@3"}, "ok")
    ]
    after = await repo.run(lambda tx: _reads(tx, rid), write=False)
    assert after["definitions"]["web"].stable_revision == 2  # type: ignore[index]
    assert after["assignments"] == [
        AssignmentRecord("n1", "web", 1, 40),
        AssignmentRecord("n2", "web", 2, 94),
        AssignmentRecord("n3", "web", 1, 40),
    ]
    assert after["node rows by id"]["n3"] == rows[0]  # type: ignore[index]
    assert (await repo.run(lambda tx: tx.node_desired(["n1"]))) == {"n1": rows[1]}
    assert after["rollout"] == moved
    assert after["rollout nodes"]["n1"] == RolloutNodeRecord(  # type: ignore[index]
        rid, "n1", "DONE", 1, 95, False, "ok"
    )
    n1 = await repo.run(lambda tx: tx.agent_states(node_ids=["n1"]))
    assert n1 == [dataclasses.replace(_agent("n1", "web", 2), reported_ms=97)]
    new = [e for e in await events.list_after(0, limit=1000) if e not in before]
    assert [(e.kind, e.node_id, e.agent_id) for e in new] == [  # in the order queued
        ("ROLLOUT_BATCH", "", ""),
        ("AGENT_STATE_CHANGED", "n1", "db"),
        ("AGENT_STATE_CHANGED", "n1", "web"),
    ]


async def test_a_one_hop_body_that_fails_or_waits_writes_nothing(database: Database) -> None:
    """A body that raises rolls back; on SQLite, one that suspends (waits for anything
    but its tx) is refused, and nothing it wrote stays."""
    repo, _ = await _seed(database)

    async def raises(tx: DesiredTx) -> None:
        await tx.set_assignments([AssignmentRecord("n2", "db", 1, 1)])
        raise KeyError("stop")

    async def waits(tx: DesiredTx) -> None:
        await tx.set_assignments([AssignmentRecord("n2", "db", 1, 1)])
        await asyncio.sleep(0)

    with pytest.raises(KeyError):
        await repo.run_in_one_hop(raises)
    if database.dialect == "sqlite":
        with pytest.raises(RuntimeError, match="waited"):
            await repo.run_in_one_hop(waits)
    assert await repo.run(lambda tx: tx.assignments(names=["db"])) == [
        AssignmentRecord("n1", "db", 1, 41)
    ]
