"""Node labels have two owners: the daemon's config and operators.

Adds `nodes.daemon_labels` and `nodes.operator_labels` beside `labels` (the
effective set). Existing rows only have the effective set, so the owners are
recovered from the event log: a key whose latest change was a
NODE_LABELS_UPDATED by an `operator/...` actor, and whose value still is what
that operator set, is an operator label; every other key is the daemon's.
(Before this revision a re-registration replaced all labels, so an operator
label that survived to now was set after the node's last registration.)

Revision ID: 0002_node_label_owners
Revises: 0001_initial
Create Date: 2026-12-05
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0002_node_label_owners"
down_revision: str | None = "0001_initial"
branch_labels: str | None = None
depends_on: str | None = None


def recover_operator_labels(
    current: dict[str, str], changes: list[tuple[str, dict[str, str], dict[str, str]]]
) -> dict[str, str]:
    """The operator part of `current`, from (actor, from, to) label changes in event order."""
    last_change: dict[str, tuple[str, str | None]] = {}  # key -> (actor, value it was set to)
    for actor, before, after in changes:
        for key in before.keys() | after.keys():
            if before.get(key) != after.get(key):
                last_change[key] = (actor, after.get(key))
    return {
        key: value
        for key, (actor, value) in last_change.items()
        if actor.startswith("operator/") and value is not None and current.get(key) == value
    }


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("daemon_labels", sa.Text(), nullable=False, server_default="{}"))
        batch.add_column(
            sa.Column("operator_labels", sa.Text(), nullable=False, server_default="{}")
        )
    bind = op.get_bind()
    nodes = sa.table(
        "nodes",
        sa.column("node_id", sa.String),
        sa.column("labels", sa.Text),
        sa.column("daemon_labels", sa.Text),
        sa.column("operator_labels", sa.Text),
    )
    events = sa.table(
        "events",
        sa.column("id", sa.BigInteger),
        sa.column("kind", sa.String),
        sa.column("node_id", sa.String),
        sa.column("actor", sa.String),
        sa.column("attributes", sa.Text),
    )
    changes: dict[str, list[tuple[str, dict[str, str], dict[str, str]]]] = {}
    rows = bind.execute(
        sa.select(events.c.node_id, events.c.actor, events.c.attributes)
        .where(events.c.kind == "NODE_LABELS_UPDATED")
        .order_by(events.c.id)
    )
    for node_id, actor, attributes in rows:
        attrs = json.loads(attributes or "{}")
        before = json.loads(attrs.get("from") or "{}")
        after = json.loads(attrs.get("to") or "{}")
        changes.setdefault(node_id, []).append((actor, before, after))
    for node_id, labels in bind.execute(sa.select(nodes.c.node_id, nodes.c.labels)).all():
        current = json.loads(labels or "{}")
        operator = recover_operator_labels(current, changes.get(node_id, []))
        daemon = {k: v for k, v in current.items() if k not in operator}
        bind.execute(
            nodes.update()
            .where(nodes.c.node_id == node_id)
            .values(
                daemon_labels=json.dumps(daemon, sort_keys=True),
                operator_labels=json.dumps(operator, sort_keys=True),
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("operator_labels")
        batch.drop_column("daemon_labels")
