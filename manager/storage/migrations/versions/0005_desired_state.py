"""Desired state: definitions and their revisions, assignments, node versions, rollouts.

Also adds to `agent_states` the definition revision an agent runs and its
health detail (`health_message`, `health_since_ms`), which rollouts judge by.

Revision ID: 0005_desired_state
Revises: 0004_agent_reported_backfill
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_desired_state"
down_revision: str | None = "0004_agent_reported_backfill"
branch_labels: str | None = None
depends_on: str | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("agent_states") as batch:
        batch.add_column(sa.Column("revision", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("health_message", sa.Text(), nullable=False, server_default=""))
        batch.add_column(
            sa.Column("health_since_ms", sa.BigInteger(), nullable=False, server_default="0")
        )
    op.create_table(
        "definitions",
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("stable_revision", sa.BigInteger(), nullable=False),
        sa.Column("deleted_ms", sa.BigInteger(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_definitions"),
    )
    op.create_table(
        "definition_revisions",
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(300), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("name", "revision", name="pk_definition_revisions"),
    )
    op.create_table(
        "assignments",
        sa.Column("node_id", sa.String(253), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("since_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("node_id", "name", name="pk_assignments"),
        sa.ForeignKeyConstraint(
            ["node_id"],
            ["nodes.node_id"],
            name="fk_assignments_node_id_nodes",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_assignments_name", "assignments", ["name"])
    op.create_table(
        "node_desired",
        sa.Column("node_id", sa.String(253), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("delivered_version", sa.BigInteger(), nullable=False),
        sa.Column("reported_version", sa.BigInteger(), nullable=False),
        sa.Column("push_error", sa.Text(), nullable=False),
        sa.Column("push_attempts", sa.Integer(), nullable=False),
        sa.Column("next_push_ms", sa.BigInteger(), nullable=False),
        sa.Column("update_errors", sa.Text(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("node_id", name="pk_node_desired"),
        sa.ForeignKeyConstraint(
            ["node_id"],
            ["nodes.node_id"],
            name="fk_node_desired_node_id_nodes",
            ondelete="CASCADE",
        ),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("target", sa.BigInteger(), nullable=False),
        sa.Column("previous", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("record", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(300), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.Column("ended_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_rollouts"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_rollouts_name_id", "rollouts", ["name", "id"])
    op.create_index("ix_rollouts_ended_ms", "rollouts", ["ended_ms"])
    op.create_table(
        "rollout_nodes",
        sa.Column("rollout_id", BigId, nullable=False),
        sa.Column("node_id", sa.String(253), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("batch", sa.Integer(), nullable=False),
        sa.Column("since_ms", sa.BigInteger(), nullable=False),
        sa.Column("offline", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("rollout_id", "node_id", name="pk_rollout_nodes"),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name="fk_rollout_nodes_rollout_id_rollouts",
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    for table in ("rollout_nodes", "rollouts", "node_desired", "assignments"):
        op.drop_table(table)
    op.drop_table("definition_revisions")
    op.drop_table("definitions")
    with op.batch_alter_table("agent_states") as batch:
        for column in ("health_since_ms", "health_message", "revision"):
            batch.drop_column(column)
