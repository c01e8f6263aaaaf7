"""NodeRepository against real SQLite and PostgreSQL databases."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from manager_harness import node_record
from sqlalchemy import event, insert

from fleet.errors import FailedPrecondition, NotFound
from manager.storage import Database, EventRepository, NodeRepository
from manager.storage.schema import nodes as nodes_table


async def _bulk_register(db: Database, node_ids: list[str], now_ms: int) -> None:
    """Insert many online nodes in one statement (setup only; upsert is tested above)."""
    rows = [
        {
            "node_id": nid,
            "hostname": nid,
            "ip": "10.0.0.1",
            "os": "linux",
            "arch": "x86_64",
            "labels": "{}",
            "daemon_version": "1",
            "agent_version": "1",
            "daemon_address": "h:1",
            "status": "online",
            "last_seen_ms": now_ms,
            "registered_at_ms": now_ms,
        }
        for nid in node_ids
    ]
    async with db.engine.begin() as conn:
        await conn.execute(insert(nodes_table), rows)


async def _kinds(db: Database) -> list[tuple[str, str]]:
    return [(e.kind, e.node_id) for e in await EventRepository(db).list_after(0)]


async def test_upsert_creates_then_is_idempotent(database: Database) -> None:
    """Registering twice creates one node, reports created only the first time."""
    nodes = NodeRepository(database)
    assert await nodes.upsert(node_record(), now_ms=1_000) is True
    assert await nodes.upsert(node_record(), now_ms=2_000) is False
    assert await nodes.count() == 1
    got = await nodes.get("node-1")
    assert got is not None
    assert (got.status, got.last_seen_ms, got.registered_at_ms) == ("online", 2_000, 1_000)
    assert await _kinds(database) == [("NODE_REGISTERED", "node-1")] * 2


async def test_upsert_updates_every_reported_field(database: Database) -> None:
    """Re-registering replaces hostname, ip, versions, labels and address."""
    nodes = NodeRepository(database)
    await nodes.upsert(node_record(), now_ms=1_000)
    changed = node_record(
        hostname="renamed",
        ip="fd00::7",
        os="freebsd",
        arch="arm64",
        labels={"zone": "b", "tier": "web"},
        daemon_version="2.0.0",
        agent_version="2.1.0",
        daemon_address="[fd00::7]:7443",
    )
    await nodes.upsert(changed, now_ms=5_000)
    got = await nodes.get("node-1")
    assert got == dataclasses.replace(
        changed, last_seen_ms=5_000, registered_at_ms=1_000, daemon_labels=changed.labels
    )


async def test_upsert_of_offline_node_brings_it_online_with_event(database: Database) -> None:
    """A node that was marked offline and registers again is online, with NODE_ONLINE."""
    nodes = NodeRepository(database)
    await nodes.upsert(node_record(), now_ms=1_000)
    assert await nodes.mark_offline(cutoff_ms=2_000, now_ms=2_000) == ["node-1"]
    await nodes.upsert(node_record(), now_ms=3_000)
    got = await nodes.get("node-1")
    assert got is not None
    assert got.status == "online"
    assert [k for k, _ in await _kinds(database)] == [
        "NODE_REGISTERED",
        "NODE_OFFLINE",
        "NODE_REGISTERED",
        "NODE_ONLINE",
    ]


async def test_upsert_many_mixes_new_known_and_offline_nodes(database: Database) -> None:
    """One batch: new nodes created, known ones updated, an offline one back online."""
    nodes = NodeRepository(database)
    await nodes.upsert(node_record("known"), now_ms=1_000)
    await nodes.upsert(node_record("down"), now_ms=1_000)
    assert await nodes.mark_offline(cutoff_ms=2_000, now_ms=2_000) == ["down", "known"]
    await nodes.upsert(node_record("known"), now_ms=2_500)
    batch = [
        (node_record("new-1"), 3_000),
        (node_record("known", hostname="renamed", labels={"zone": "b"}), 3_001),
        (node_record("down"), 3_002),
        (node_record("new-2"), 3_003),
    ]
    assert [(u.created, u.changed) for u in await nodes.upsert_many(batch)] == [
        (True, True),
        (False, True),  # its labels
        (False, True),  # back online
        (True, True),
    ]
    for node, ms in batch:
        got = await nodes.get(node.node_id)
        assert got is not None
        assert (got.status, got.last_seen_ms, got.hostname, got.labels) == (
            "online",
            ms,
            node.hostname,
            node.labels,
        )
    events = (await EventRepository(database).list_after(0))[-6:]
    assert [(e.kind, e.node_id, e.attributes.get("first")) for e in events] == [
        ("NODE_REGISTERED", "new-1", "true"),
        ("NODE_REGISTERED", "known", "false"),
        ("NODE_REGISTERED", "down", "false"),
        ("NODE_ONLINE", "down", None),
        ("NODE_REGISTERED", "new-2", "true"),
        ("NODE_LABELS_UPDATED", "known", None),  # zone a -> b from its daemon's config
    ]


async def test_upsert_many_refuses_a_node_twice_and_writes_nothing(database: Database) -> None:
    """The same id twice in one batch is a caller bug: ValueError, nothing stored."""
    nodes = NodeRepository(database)
    with pytest.raises(ValueError, match="twice"):
        await nodes.upsert_many([(node_record("a"), 1_000), (node_record("a"), 1_001)])
    assert await nodes.count() == 0


async def test_get_list_known_ids_count(database: Database) -> None:
    """Reads return what was registered; get of an unknown id is None."""
    nodes = NodeRepository(database)
    for i in (3, 1, 2):
        await nodes.upsert(node_record(f"n{i}"), now_ms=1_000 * i)
    assert [n.node_id for n in await nodes.list()] == ["n1", "n2", "n3"]
    assert await nodes.known_ids() == {"n1", "n2", "n3"}
    assert await nodes.get("nope") is None
    await nodes.mark_offline(cutoff_ms=2_500, now_ms=4_000)
    assert await nodes.count(status="offline") == 2
    assert await nodes.count(status="online") == 1


async def test_reach_is_what_list_says_of_liveness_address_and_jobs(database: Database) -> None:
    """The job driver's light read agrees with the full records, offline and
    jobs-disabled nodes included."""
    nodes = NodeRepository(database)
    await nodes.upsert(node_record("n1", daemon_address="h1:7443"), now_ms=1_000)
    await nodes.upsert(node_record("n2", jobs_disabled=True), now_ms=3_000)
    await nodes.mark_offline(cutoff_ms=2_000, now_ms=4_000)
    got = {r.node_id: r for r in await nodes.reach()}
    assert {
        n.node_id: (n.daemon_address, n.status, n.last_seen_ms, n.jobs_disabled)
        for n in await nodes.list()
    } == {
        r.node_id: (r.daemon_address, r.status, r.last_seen_ms, r.jobs_disabled)
        for r in got.values()
    }
    assert (got["n1"].status, got["n1"].daemon_address) == ("offline", "h1:7443")
    assert (got["n2"].status, got["n2"].jobs_disabled) == ("online", True)


async def test_touch_many_keeps_the_newest_last_seen(database: Database) -> None:
    """touch_many sets last_seen to max(old, new), ignoring unknown nodes."""
    nodes = NodeRepository(database)
    await nodes.upsert(node_record("a"), now_ms=1_000)
    await nodes.upsert(node_record("b"), now_ms=1_000)
    assert await nodes.touch_many({"a": 5_000, "b": 500, "ghost": 9_000}) == []
    a, b = await nodes.get("a"), await nodes.get("b")
    assert a is not None
    assert b is not None
    assert (a.last_seen_ms, b.last_seen_ms) == (5_000, 1_000)
    assert await nodes.known_ids() == {"a", "b"}
    assert await nodes.touch_many({}) == []


async def test_touch_many_revives_offline_nodes_with_events(database: Database) -> None:
    """Offline nodes that heartbeat become online and get one NODE_ONLINE each."""
    nodes = NodeRepository(database)
    for nid in ("a", "b", "c"):
        await nodes.upsert(node_record(nid), now_ms=1_000)
    assert await nodes.mark_offline(cutoff_ms=2_000, now_ms=2_000, exclude={"c"}) == ["a", "b"]
    assert await nodes.touch_many({"a": 3_000, "c": 3_000}) == ["a"]
    assert await nodes.count(status="online") == 2
    online = [nid for kind, nid in await _kinds(database) if kind == "NODE_ONLINE"]
    assert online == ["a"]
    # A second flush does not repeat the transition.
    assert await nodes.touch_many({"a": 4_000}) == []


async def test_mark_offline_respects_cutoff_and_exclude(database: Database) -> None:
    """Only online nodes last seen strictly before the cutoff, minus the excluded, go offline."""
    nodes = NodeRepository(database)
    await nodes.upsert(node_record("old"), now_ms=1_000)
    await nodes.upsert(node_record("edge"), now_ms=2_000)
    await nodes.upsert(node_record("fresh"), now_ms=3_000)
    await nodes.upsert(node_record("graced"), now_ms=1_000)
    gone = await nodes.mark_offline(cutoff_ms=2_000, now_ms=10_000, exclude=["graced"])
    assert gone == ["old"]
    offline_events = [
        e for e in await EventRepository(database).list_after(0) if e.kind == "NODE_OFFLINE"
    ]
    assert [(e.node_id, e.timestamp_ms) for e in offline_events] == [("old", 10_000)]
    # Already offline: not marked (nor evented) again.
    assert await nodes.mark_offline(cutoff_ms=2_000, now_ms=11_000) == ["graced"]
    assert await nodes.mark_offline(cutoff_ms=2_000, now_ms=12_000) == []


async def test_mark_offline_handles_more_nodes_than_one_statement(database: Database) -> None:
    """A sweep over more nodes than one IN list holds marks them all."""
    nodes = NodeRepository(database)
    await nodes.upsert(node_record("seed"), now_ms=1_000)
    await _bulk_register(database, [f"n{i:04d}" for i in range(600)], 1_000)  # IN lists: 500
    gone = await nodes.mark_offline(cutoff_ms=2_000, now_ms=3_000, exclude={"seed"})
    assert len(gone) == 600
    assert await nodes.count(status="online") == 1
    revived = await nodes.touch_many({f"n{i:04d}": 4_000 for i in range(600)})
    assert len(revived) == 600


async def _label_events(db: Database) -> list[tuple[str, str, str]]:
    events = await EventRepository(db).list_after(0, kinds=["NODE_LABELS_UPDATED"])
    return [(e.actor, e.attributes["from"], e.attributes["to"]) for e in events]


async def test_update_labels_sets_removes_and_records_event(database: Database) -> None:
    """Operator labels are set then removed; each change is an event naming the actor."""
    nodes = NodeRepository(database)
    await nodes.upsert(node_record(labels={"zone": "a"}), now_ms=1_000)
    before, got = await nodes.update_labels(
        "node-1", {"tier": "web", "old": "x"}, [], actor="operator/alice", now_ms=2_000
    )
    assert (before.labels, got.labels) == ({"zone": "a"}, {"old": "x", "tier": "web", "zone": "a"})
    _, got = await nodes.update_labels("node-1", {}, ["old"], actor="operator/alice", now_ms=2_500)
    stored = await nodes.get("node-1")
    assert stored is not None
    assert stored.labels == got.labels == {"tier": "web", "zone": "a"}
    assert (stored.daemon_labels, stored.operator_labels) == ({"zone": "a"}, {"tier": "web"})
    events = await EventRepository(database).list_after(0, kinds=["NODE_LABELS_UPDATED"])
    assert [(e.actor, e.timestamp_ms) for e in events] == [
        ("operator/alice", 2_000),
        ("operator/alice", 2_500),
    ]
    # No change (a key nobody set is ignored), no event.
    await nodes.update_labels("node-1", {"tier": "web"}, ["missing"], actor="a", now_ms=3_000)
    assert len(await _label_events(database)) == 2


async def test_operator_labels_survive_re_registration(database: Database) -> None:
    """The reported bug: a daemon registering again keeps the operator's labels."""
    nodes = NodeRepository(database)
    await nodes.upsert(node_record(labels={"env": "prod"}), now_ms=1_000)
    await nodes.update_labels("node-1", {"canary": "true"}, [], actor="operator/a", now_ms=2_000)
    await nodes.upsert(node_record(labels={"env": "prod"}), now_ms=3_000)  # restarted daemon
    got = await nodes.get("node-1")
    assert got is not None
    assert got.labels == {"canary": "true", "env": "prod"}
    assert got.operator_labels == {"canary": "true"}
    # Nothing changed the effective set: only the operator's event exists.
    assert [a for a, _, _ in await _label_events(database)] == ["operator/a"]


async def test_re_registration_replaces_only_the_daemons_labels_with_an_event(
    database: Database,
) -> None:
    """A daemon whose config changed: its part is replaced, the change is one event."""
    nodes = NodeRepository(database)
    await nodes.upsert(node_record(labels={"env": "prod", "zone": "a"}), now_ms=1_000)
    await nodes.update_labels("node-1", {"canary": "true"}, [], actor="operator/a", now_ms=2_000)
    await nodes.upsert(node_record(labels={"env": "prod", "rack": "r1"}), now_ms=3_000)
    got = await nodes.get("node-1")
    assert got is not None
    assert got.labels == {"canary": "true", "env": "prod", "rack": "r1"}
    assert got.daemon_labels == {"env": "prod", "rack": "r1"}
    events = await EventRepository(database).list_after(0, kinds=["NODE_LABELS_UPDATED"])
    assert events[-1].actor == "node/node-1"
    assert events[-1].message == (
        "labels of node-1 changed: +rack=r1, -zone (the daemon's configured labels changed)"
    )


async def test_an_operator_label_overrides_the_daemons_until_removed(database: Database) -> None:
    """Operator env=canary wins over the daemon's env=prod, across registrations;
    removing it brings the daemon's value back."""
    nodes = NodeRepository(database)
    await nodes.upsert(node_record(labels={"env": "prod"}), now_ms=1_000)
    await nodes.update_labels("node-1", {"env": "canary"}, [], actor="operator/a", now_ms=2_000)
    await nodes.upsert(node_record(labels={"env": "prod"}), now_ms=3_000)
    got = await nodes.get("node-1")
    assert got is not None
    assert got.labels == {"env": "canary"}
    _, back = await nodes.update_labels("node-1", {}, ["env"], actor="operator/a", now_ms=4_000)
    assert back.labels == {"env": "prod"}
    assert back.operator_labels == {}


async def test_removing_a_daemon_label_is_refused_and_changes_nothing(database: Database) -> None:
    """Only the host changes its config's labels: the whole request is refused."""
    nodes = NodeRepository(database)
    await nodes.upsert(node_record(labels={"env": "prod"}), now_ms=1_000)
    with pytest.raises(FailedPrecondition, match="'env' of node-1 comes from its daemon's config"):
        await nodes.update_labels("node-1", {"a": "b"}, ["env"], actor="operator/a", now_ms=2)
    got = await nodes.get("node-1")
    assert got is not None
    assert (got.labels, got.operator_labels) == ({"env": "prod"}, {})
    assert await _label_events(database) == []


async def test_update_labels_of_unknown_node_is_not_found(database: Database) -> None:
    """Labelling a node that never registered raises NotFound and writes nothing."""
    nodes = NodeRepository(database)
    with pytest.raises(NotFound, match="ghost"):
        await nodes.update_labels("ghost", {"a": "b"}, [], actor="operator/x", now_ms=1)
    assert await EventRepository(database).latest_id() == 0


async def test_touch_many_updates_last_seen_in_one_statement(database: Database) -> None:
    """The last-seen flush of 600 nodes is one executemany UPDATE, not one per node."""
    nodes = NodeRepository(database)
    await _bulk_register(database, [f"n{i:03d}" for i in range(600)], 1_000)
    statements: list[tuple[str, bool]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, ctx: Any, many: bool) -> None:
        statements.append((" ".join(statement.split()).upper(), many))

    event.listen(database.engine.sync_engine, "before_cursor_execute", record)
    try:
        await nodes.touch_many({f"n{i:03d}": 2_000 + i for i in range(600)})
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", record)
    updates = [(s, many) for s, many in statements if s.startswith("UPDATE NODES SET LAST_SEEN_MS")]
    assert len(updates) == 1
    assert updates[0][1] is True  # executemany
    n599 = await nodes.get("n599")
    assert n599 is not None
    assert n599.last_seen_ms == 2_599


async def test_touch_many_locks_in_node_order(database: Database) -> None:
    """The flush updates (and so row-locks) in node-id order, as registration locks
    rows, whatever order the heartbeats came in."""
    nodes = NodeRepository(database)
    ids = [f"n{i:04d}" for i in range(1_200)]
    await _bulk_register(database, ids, 1_000)
    updates: list[list[str]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, ctx: Any, many: bool) -> None:
        if " ".join(statement.split()).upper().startswith("UPDATE NODES SET LAST_SEEN_MS"):
            updates.append([p["nid"] if isinstance(p, dict) else p[-1] for p in params])

    event.listen(database.engine.sync_engine, "before_cursor_execute", record)
    try:
        await nodes.touch_many(dict.fromkeys(reversed(ids), 3_000))
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", record)
    assert updates == [ids]


async def test_reregistering_600_nodes_is_one_update_even_with_new_labels(
    database: Database,
) -> None:
    """A registration storm stays a handful of statements when some daemons bring new labels."""
    nodes = NodeRepository(database)
    ids = [f"n{i:03d}" for i in range(600)]
    await nodes.upsert_many([(node_record(n, labels={"env": "prod"}), 1_000) for n in ids])
    await nodes.update_labels("n000", {"canary": "true"}, [], actor="operator/a", now_ms=1_500)
    batch = [(node_record(n, labels={"env": "prod"}), 2_000) for n in ids]
    batch[0] = (node_record("n000", labels={"env": "qa"}), 2_000)
    batch[1] = (node_record("n001", labels={"env": "qa"}), 2_000)
    statements: list[tuple[str, bool]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, ctx: Any, many: bool) -> None:
        statements.append((" ".join(statement.split()).upper(), many))

    event.listen(database.engine.sync_engine, "before_cursor_execute", record)
    try:
        outcomes = await nodes.upsert_many(batch)
        assert [u.created for u in outcomes] == [False] * 600
        assert [u.changed for u in outcomes] == [True, True] + [False] * 598
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", record)
    assert [many for s, many in statements if s.startswith("UPDATE NODES")] == [True]
    assert len(statements) <= 8  # two locking reads (IN lists of 500), the update, events
    n000, n001 = await nodes.get("n000"), await nodes.get("n001")
    assert n000 is not None
    assert n001 is not None
    assert (n000.labels, n001.labels) == ({"canary": "true", "env": "qa"}, {"env": "qa"})
    label_events = await EventRepository(database).list_after(0, kinds=["NODE_LABELS_UPDATED"])
    assert [e.node_id for e in label_events] == ["n000", "n000", "n001"]


async def test_concurrent_first_registrations_create_onenode_record(database: Database) -> None:
    """Five simultaneous first registrations of one node: one creates, the rest update."""
    nodes = NodeRepository(database)
    created = await asyncio.gather(
        *(nodes.upsert(node_record(), now_ms=1_000 + i) for i in range(5))
    )
    assert sorted(created) == [False, False, False, False, True]
    assert await nodes.count() == 1


async def test_upsert_many_says_which_registrations_changed_what_the_drivers_read(
    database: Database,
) -> None:
    """`changed` (convergence and the job driver are poked for it): effective labels,
    daemon address, jobs_disabled, back from offline; not a reconnect as it was, nor
    fields neither reads (hostname, versions), nor a daemon label an operator's hides."""
    nodes = NodeRepository(database)
    ids = ["same", "renamed", "labels", "hidden", "address", "jobs", "down"]
    await nodes.upsert_many([(node_record(n), 1_000) for n in ids])
    await nodes.update_labels("hidden", {"zone": "x"}, [], actor="operator/t", now_ms=1_500)
    await nodes.mark_offline(cutoff_ms=1_001, now_ms=2_000, only=["down"])
    outcomes = await nodes.upsert_many(
        [
            (node_record("same"), 3_000),
            (node_record("renamed", hostname="other", daemon_version="2.0.0"), 3_000),
            (node_record("labels", labels={"zone": "b"}), 3_000),
            (node_record("hidden", labels={"zone": "b"}), 3_000),
            (node_record("address", daemon_address="10.0.0.9:7443"), 3_000),
            (node_record("jobs", jobs_disabled=True), 3_000),
            (node_record("down"), 3_000),
        ]
    )
    assert {n: u.changed for n, u in zip(ids, outcomes, strict=True)} == {
        "same": False,
        "renamed": False,
        "labels": True,
        "hidden": False,
        "address": True,
        "jobs": True,
        "down": True,
    }
    assert not any(u.created for u in outcomes)
