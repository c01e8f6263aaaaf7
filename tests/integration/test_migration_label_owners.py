"""Migration 0002 splits existing node labels into the daemon's and the operators'.

Before it, a node kept only its effective labels; the owners are recovered
from the NODE_LABELS_UPDATED events (see the migration's docstring). Runs a
real database up to 0001, writes rows as the old code did, then upgrades.
"""

from __future__ import annotations

import importlib
import json

from alembic import command
from sqlalchemy import column, insert, table

from manager.storage import Database, NodeRepository
from manager.storage.db import _alembic_config
from manager.storage.schema import events

migration = importlib.import_module("manager.storage.migrations.versions.0002_node_label_owners")

# The nodes table as revision 0001 made it.
OLD_NODES = table(
    "nodes",
    *(
        column(name)
        for name in (
            "node_id", "hostname", "ip", "os", "arch", "labels", "daemon_version",
            "agent_version", "daemon_address", "status", "last_seen_ms", "registered_at_ms",
        )
    ),
)  # fmt: skip


def _node(node_id: str, labels: dict[str, str]) -> dict[str, object]:
    return {
        "node_id": node_id, "hostname": node_id, "ip": "10.0.0.1", "os": "linux",
        "arch": "x86_64", "labels": json.dumps(labels), "daemon_version": "1",
        "agent_version": "1", "daemon_address": "h:1", "status": "online",
        "last_seen_ms": 1, "registered_at_ms": 1,
    }  # fmt: skip


def _labels_event(
    node_id: str, actor: str, before: dict[str, str], after: dict[str, str]
) -> dict[str, object]:
    return {
        "ts_ms": 1, "kind": "NODE_LABELS_UPDATED", "node_id": node_id, "agent_id": "",
        "message": "labels changed", "actor": actor,
        "attributes": json.dumps({"from": json.dumps(before), "to": json.dumps(after)}),
    }  # fmt: skip


async def test_existing_rows_are_split_by_who_last_changed_each_label(database_url: str) -> None:
    """Operator-set labels that still hold become operator labels; the rest the daemon's."""
    db = await Database.open(database_url)
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(lambda c: command.upgrade(_alembic_config(c), "0001_initial"))
        async with db.engine.begin() as conn:
            await conn.execute(
                insert(OLD_NODES),
                [
                    _node("n1", {"env": "prod", "canary": "true", "tier": "db"}),
                    _node("n2", {"env": "prod"}),
                ],
            )
            await conn.execute(
                insert(events),
                [
                    # n1: alice set canary and tier=web; bob later changed tier to the
                    # value db -> still an operator label; env was never touched.
                    _labels_event("n1", "operator/alice", {"env": "prod"},
                                  {"env": "prod", "canary": "true", "tier": "web"}),
                    _labels_event("n1", "operator/bob",
                                  {"env": "prod", "canary": "true", "tier": "web"},
                                  {"env": "prod", "canary": "true", "tier": "db"}),
                    # n2: an operator label that a later registration wiped (the old bug).
                    _labels_event("n2", "operator/alice", {"env": "prod"},
                                  {"env": "prod", "canary": "true"}),
                ],
            )  # fmt: skip
        await db.migrate()
        repo = NodeRepository(db)
        n1, n2 = await repo.get("n1"), await repo.get("n2")
        assert n1 is not None
        assert n2 is not None
        assert n1.operator_labels == {"canary": "true", "tier": "db"}
        assert n1.daemon_labels == {"env": "prod"}
        assert n1.labels == {"canary": "true", "env": "prod", "tier": "db"}
        assert (n2.daemon_labels, n2.operator_labels) == ({"env": "prod"}, {})
    finally:
        await db.close()


def test_recovery_rule_on_plain_values() -> None:
    """A daemon's change after the operator's takes the key back; removals end ownership."""
    recover = migration.recover_operator_labels
    changes = [
        ("operator/a", {}, {"x": "1", "y": "2", "z": "3"}),
        ("node/n1", {"x": "1", "y": "2", "z": "3"}, {"x": "9", "y": "2", "z": "3"}),
        ("operator/a", {"x": "9", "y": "2", "z": "3"}, {"x": "9", "y": "2"}),
    ]
    assert recover({"x": "9", "y": "2"}, changes) == {"y": "2"}
    assert recover({"x": "9", "y": "changed-elsewhere"}, changes) == {}
