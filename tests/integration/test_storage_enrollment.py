"""EnrollmentRepository and RemovalRepository against real SQLite and PostgreSQL databases."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from manager_harness import node_record
from sqlalchemy import func, insert, select

from fleet.errors import FailedPrecondition, NotFound
from manager.storage import AgentStateRecord, AgentStateRepository, Database, NodeRepository
from manager.storage.enrollment import (
    EnrollmentRepository,
    IssuedCertificate,
    JoinTokenRecord,
    NodeExists,
    TokenSpent,
)
from manager.storage.removal import RemovalRepository
from manager.storage.schema import assignments, events, node_desired, operations_audit

NOW = 1_800_000_000_000


def token(token_id: str = "tok00001", **changes: object) -> JoinTokenRecord:
    """A usable one-use any-name token."""
    base = JoinTokenRecord(
        id=token_id,
        secret_hash="0" * 64,
        node_name="",
        name_prefix="",
        labels={"env": "prod"},
        description="",
        created_by="operator/alice",
        created_ms=NOW,
        expires_ms=NOW + 3_600_000,
        uses_total=1,
        uses_left=1,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def cert(node_id: str, serial: str, token_id: str = "tok00001", at: int = NOW) -> IssuedCertificate:
    """A certificate issued at `at`, valid a week."""
    return IssuedCertificate(serial, node_id, token_id, at, at - 300_000, at + 7 * 86_400_000)


async def test_issue_spends_a_use_and_makes_an_unregistered_node(database: Database) -> None:
    """A new node's row is offline, never registered, with the token's labels as operator
    labels; its daemon's first registration counts as its first."""
    repo = EnrollmentRepository(database)
    await repo.create_token(token())
    await repo.issue(cert("web-1", "a1"), labels={"env": "prod"}, new_node_only=True, peer="ip")
    stored = await repo.get_token("tok00001")
    assert stored is not None
    assert stored.uses_left == 0
    assert stored.enrolled_nodes == ("web-1",)
    node = await NodeRepository(database).get("web-1")
    assert node is not None
    assert (node.status, node.registered_at_ms, node.last_seen_ms) == ("offline", 0, 0)
    assert node.operator_labels == node.labels == {"env": "prod"}
    assert node.cert_not_after_ms == NOW + 7 * 86_400_000
    created = await NodeRepository(database).upsert(
        node_record("web-1", labels={"zone": "a"}), now_ms=NOW + 5
    )
    assert created is True, "the first registration of an enrolled node"
    node = await NodeRepository(database).get("web-1")
    assert node is not None
    assert (node.status, node.registered_at_ms) == ("online", NOW + 5)
    assert node.labels == {"env": "prod", "zone": "a"}
    assert node.cert_not_after_ms == NOW + 7 * 86_400_000, "0 from a registration keeps it"


async def test_issue_refuses_a_spent_token_and_changes_nothing(database: Database) -> None:
    """Used up, revoked or expired at issue time: TokenSpent, and nothing is written."""
    repo = EnrollmentRepository(database)
    await repo.create_token(token("used0000", uses_left=0))
    await repo.create_token(token("revoked0", revoked_ms=NOW))
    await repo.create_token(token("expired0", expires_ms=NOW))
    for tid in ("used0000", "revoked0", "expired0", "unknown0"):
        with pytest.raises(TokenSpent):
            await repo.issue(cert("n1", tid, tid), labels={}, new_node_only=True, peer="ip")
    assert await NodeRepository(database).get("n1") is None
    assert await repo.certificates("n1") == []


async def test_concurrent_issues_spend_the_last_use_once(database: Database) -> None:
    """Two issues racing for a one-use token: exactly one succeeds."""
    repo = EnrollmentRepository(database)
    for round_ in range(5):
        tid = f"race{round_:04d}"
        await repo.create_token(token(tid))
        results = await asyncio.gather(
            *(
                repo.issue(cert(f"{n}{round_}", f"{tid}{n}", tid), labels={}, new_node_only=True,
                           peer="ip")
                for n in ("a", "b")
            ),
            return_exceptions=True,
        )  # fmt: skip
        assert sorted(type(r).__name__ for r in results) == ["NoneType", "TokenSpent"]
        stored = await repo.get_token(tid)
        assert stored is not None
        assert stored.uses_left == 0
        assert len(stored.enrolled_nodes) == 1


async def test_new_node_only_refuses_existing_and_revoked_names(database: Database) -> None:
    """A prefix/any-name token meeting a node record or a revocation: NodeExists, no use
    spent; a node-name token re-enrolls and merges its labels into the operator labels."""
    repo = EnrollmentRepository(database)
    removals = RemovalRepository(database)
    nodes = NodeRepository(database)
    await nodes.upsert(node_record("n1", labels={"zone": "a"}), now_ms=NOW)
    await removals.revoke_node("gone", cutoff_ms=NOW, now_ms=NOW, actor="operator/a", reason="")
    await repo.create_token(token(uses_total=3, uses_left=3))
    for name in ("n1", "gone"):
        with pytest.raises(NodeExists):
            await repo.issue(cert(name, name), labels={}, new_node_only=True, peer="ip")
    stored = await repo.get_token("tok00001")
    assert stored is not None
    assert stored.uses_left == 3
    await repo.issue(cert("n1", "s1"), labels={"rack": "4"}, new_node_only=False, peer="ip")
    node = await nodes.get("n1")
    assert node is not None
    assert node.labels == {"zone": "a", "rack": "4"}
    assert node.operator_labels == {"rack": "4"}
    assert node.status == "online", "re-enrolling an existing node leaves its liveness alone"


async def test_still_revoked_until_a_certificate_after_the_cutoff(database: Database) -> None:
    """A revoked node shows as revoked until it is issued a certificate at or after its
    cutoff; the deny list itself keeps the entry."""
    repo = EnrollmentRepository(database)
    removals = RemovalRepository(database)
    await repo.create_token(token(node_name="n1"))
    await removals.revoke_node(
        "n1", cutoff_ms=NOW + 1000, now_ms=NOW, actor="operator/a", reason="x"
    )
    assert await removals.still_revoked() == {"n1": NOW}
    assert await removals.revocations() == {"n1": NOW + 1000}
    fresh = dataclasses.replace(cert("n1", "s2", at=NOW + 2000), not_before_ms=NOW + 1000)
    await repo.issue(fresh, labels={}, new_node_only=False, peer="ip")
    assert await removals.still_revoked() == {}
    assert await removals.revocations() == {"n1": NOW + 1000}


async def test_revoke_marks_an_online_node_offline(database: Database) -> None:
    """Revoking an online node marks it offline; the revocation replaces an earlier one."""
    removals = RemovalRepository(database)
    await NodeRepository(database).upsert(node_record("n1"), now_ms=NOW)
    node, offline = await removals.revoke_node(
        "n1", cutoff_ms=NOW + 1000, now_ms=NOW, actor="operator/a", reason="stolen"
    )
    assert node is not None
    assert node.status == "online"
    assert offline is True
    _, offline = await removals.revoke_node(
        "n1", cutoff_ms=NOW + 9000, now_ms=NOW + 8000, actor="operator/b", reason=""
    )
    assert offline is False
    assert await removals.revocations() == {"n1": NOW + 9000}
    entry = await removals.revocation("n1")
    assert entry is not None
    assert entry.revoked_by == "operator/b"


async def test_a_heartbeat_does_not_bring_a_revoked_node_back_online(database: Database) -> None:
    """A last-seen written after the revocation (one recorded before it, or in its stream's
    grace) leaves the node offline; once issued a certificate after the cutoff, the next
    heartbeat brings it back as any offline node."""
    repo, removals, nodes = (
        EnrollmentRepository(database),
        RemovalRepository(database),
        NodeRepository(database),
    )
    await nodes.upsert(node_record("n1"), now_ms=NOW)
    await nodes.upsert(node_record("n2"), now_ms=NOW)
    await removals.revoke_node("n1", cutoff_ms=NOW + 1000, now_ms=NOW, actor="o/a", reason="")
    await removals.revoke_node("n2", cutoff_ms=NOW + 1000, now_ms=NOW, actor="o/a", reason="")
    assert await nodes.touch_many({"n1": NOW + 500, "n2": NOW + 500}) == []
    for name in ("n1", "n2"):
        node = await nodes.get(name)
        assert node is not None
        assert (node.status, node.last_seen_ms) == ("offline", NOW + 500)

    await repo.create_token(token(node_name="n1"))
    fresh = dataclasses.replace(cert("n1", "s2", at=NOW + 2000), not_before_ms=NOW + 1000)
    await repo.issue(fresh, labels={}, new_node_only=False, peer="ip")
    assert await nodes.touch_many({"n1": NOW + 3000, "n2": NOW + 3000}) == ["n1"]
    back = await nodes.get("n1")
    assert back is not None
    assert back.status == "online"


async def test_delete_removes_the_node_and_what_cascades(database: Database) -> None:
    """Deleting removes the row with its agent states, assignments and desired state;
    events, audit and certificates stay. Online needs force; unknown is NotFound."""
    repo = EnrollmentRepository(database)
    removals = RemovalRepository(database)
    nodes = NodeRepository(database)
    await nodes.upsert(node_record("n1"), now_ms=NOW)
    await AgentStateRepository(database).replace(
        "n1", [AgentStateRecord("n1", "web", "RUNNING")], now_ms=NOW, actor="node/n1"
    )
    async with database.engine.begin() as conn:
        await conn.execute(
            insert(assignments), [{"node_id": "n1", "name": "web", "revision": 1, "since_ms": 0}]
        )
        await conn.execute(
            insert(node_desired),
            [
                {
                    "node_id": "n1",
                    "version": 1,
                    "content_hash": "",
                    "delivered_version": 0,
                    "reported_version": 0,
                    "push_error": "",
                    "push_attempts": 0,
                    "next_push_ms": 0,
                    "update_errors": "[]",
                    "updated_ms": 0,
                }
            ],
        )
    await repo.create_token(token(node_name="n1"))
    await repo.issue(cert("n1", "c1"), labels={}, new_node_only=False, peer="ip")
    with pytest.raises(
        FailedPrecondition,
        match="n1 is online; stop its daemon first, or force the deletion",
    ):
        await removals.delete_node("n1", force=False, actor="operator/a", now_ms=NOW)
    deleted = await removals.delete_node("n1", force=True, actor="operator/a", now_ms=NOW)
    assert deleted.node_id == "n1"
    assert await nodes.get("n1") is None
    assert await AgentStateRepository(database).list(node_ids=["n1"]) == []
    async with database.engine.connect() as conn:
        for table in (assignments, node_desired):
            count = await conn.scalar(select(func.count()).select_from(table))
            assert count == 0, table.name
        assert await conn.scalar(select(func.count()).select_from(events)) > 0
        actions = (await conn.execute(select(operations_audit.c.action))).scalars().all()
    assert "node.deleted" in actions
    assert [c.serial for c in await repo.certificates("n1")] == ["c1"]
    with pytest.raises(NotFound):
        await removals.delete_node("n1", force=True, actor="operator/a", now_ms=NOW)


async def test_revoking_a_token_is_idempotent(database: Database) -> None:
    """The second revoke keeps the first's time and writes no second audit entry."""
    repo = EnrollmentRepository(database)
    await repo.create_token(token())
    first = await repo.revoke_token("tok00001", actor="operator/a", now_ms=NOW + 1)
    second = await repo.revoke_token("tok00001", actor="operator/a", now_ms=NOW + 2)
    assert first.revoked_ms == second.revoked_ms == NOW + 1
    async with database.engine.connect() as conn:
        actions = (await conn.execute(select(operations_audit.c.action))).scalars().all()
    assert actions == ["token.created", "token.revoked"]
    with pytest.raises(NotFound):
        await repo.revoke_token("nope0000", actor="operator/a", now_ms=NOW)
    assert [t.id for t in await repo.list_tokens(usable_at_ms=NOW)] == []
    assert [t.id for t in await repo.list_tokens()] == ["tok00001"]
