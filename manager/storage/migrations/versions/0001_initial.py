"""Initial schema: nodes, agent states, metrics (raw, rollups, dedupe keys), events, audit.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

# INTEGER PRIMARY KEY is SQLite's rowid alias; BIGINT (BIGSERIAL) elsewhere.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("node_id", sa.String(253), nullable=False),
        sa.Column("hostname", sa.String(253), nullable=False),
        sa.Column("ip", sa.String(64), nullable=False),
        sa.Column("os", sa.String(64), nullable=False),
        sa.Column("arch", sa.String(64), nullable=False),
        sa.Column("labels", sa.Text(), nullable=False),
        sa.Column("daemon_version", sa.String(64), nullable=False),
        sa.Column("agent_version", sa.String(64), nullable=False),
        sa.Column("daemon_address", sa.String(300), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("last_seen_ms", sa.BigInteger(), nullable=False),
        sa.Column("registered_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("node_id", name="pk_nodes"),
        sa.CheckConstraint("status IN ('online', 'offline')", name="ck_nodes_status"),
    )
    op.create_index("ix_nodes_status_last_seen_ms", "nodes", ["status", "last_seen_ms"])

    op.create_table(
        "agent_states",
        sa.Column("node_id", sa.String(253), nullable=False),
        sa.Column("agent_id", sa.String(253), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("pid", sa.BigInteger(), nullable=False),
        sa.Column("last_heartbeat_ms", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.String(128), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("start_time_ms", sa.BigInteger(), nullable=False),
        sa.Column("restart_count", sa.BigInteger(), nullable=False),
        sa.Column("exit_code", sa.BigInteger(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("labels", sa.Text(), nullable=False),
        sa.Column("health", sa.String(32), nullable=False),
        sa.Column("config_version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("node_id", "agent_id", name="pk_agent_states"),
        sa.ForeignKeyConstraint(
            ["node_id"],
            ["nodes.node_id"],
            name="fk_agent_states_node_id_nodes",
            ondelete="CASCADE",
        ),
        sa.CheckConstraint("pid >= 0", name="ck_agent_states_pid"),
        sa.CheckConstraint("restart_count >= 0", name="ck_agent_states_restart_count"),
        sa.CheckConstraint("config_version >= 0", name="ck_agent_states_config_version"),
    )

    op.create_table(
        "metric_samples",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("node_id", sa.String(253), nullable=False),
        sa.Column("agent_id", sa.String(253), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("ts_ms", sa.BigInteger(), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_metric_samples"),
    )
    op.create_index(
        "ix_metric_samples_node_id_type_ts_ms", "metric_samples", ["node_id", "type", "ts_ms"]
    )
    op.create_index("ix_metric_samples_ts_ms", "metric_samples", ["ts_ms"])

    op.create_table(
        "metric_rollups",
        sa.Column("node_id", sa.String(253), nullable=False),
        sa.Column("agent_id", sa.String(253), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("bucket_ms", sa.BigInteger(), nullable=False),
        sa.Column("min", sa.Double(), nullable=False),
        sa.Column("max", sa.Double(), nullable=False),
        sa.Column("sum", sa.Double(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "node_id", "type", "agent_id", "name", "bucket_ms", name="pk_metric_rollups"
        ),
    )
    op.create_index("ix_metric_rollups_bucket_ms", "metric_rollups", ["bucket_ms"])

    state = op.create_table(
        "metric_rollup_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("rolled_until_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_metric_rollup_state"),
    )
    op.bulk_insert(state, [{"id": 1, "rolled_until_ms": 0}])

    op.create_table(
        "metric_batches",
        sa.Column("node_id", sa.String(253), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("received_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("node_id", "sequence", name="pk_metric_batches"),
    )
    op.create_index("ix_metric_batches_received_ms", "metric_batches", ["received_ms"])

    op.create_table(
        "events",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("ts_ms", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("node_id", sa.String(253), nullable=False),
        sa.Column("agent_id", sa.String(253), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(300), nullable=False),
        sa.Column("attributes", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_events_node_id_id", "events", ["node_id", "id"])

    op.create_table(
        "operations_audit",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("ts_ms", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(300), nullable=False),
        sa.Column("action", sa.String(128), nullable=False),
        sa.Column("target", sa.String(300), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("outcome", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_operations_audit"),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    for table in (
        "operations_audit",
        "events",
        "metric_batches",
        "metric_rollup_state",
        "metric_rollups",
        "metric_samples",
        "agent_states",
        "nodes",
    ):
        op.drop_table(table)
