"""Manager replicas and where each node's control stream is.

Adds `manager_replicas` (each replica's id, address and last-seen) and
`control_streams` (node -> the replica holding its stream, with an epoch), so
a command for a node streaming to another replica can be routed there.

Revision ID: 0009_replicas
Revises: 0008_enrollment
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_replicas"
down_revision: str | None = "0008_enrollment"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "manager_replicas",
        sa.Column("replica_id", sa.String(253), nullable=False),
        sa.Column("address", sa.String(300), nullable=False),
        sa.Column("started_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_seen_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("replica_id", name="pk_manager_replicas"),
    )
    op.create_table(
        "control_streams",
        sa.Column("node_id", sa.String(253), nullable=False),
        sa.Column("replica_id", sa.String(253), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("opened_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("node_id", name="pk_control_streams"),
    )
    op.create_index("ix_control_streams_replica_id", "control_streams", ["replica_id"])


def downgrade() -> None:
    op.drop_index("ix_control_streams_replica_id", table_name="control_streams")
    op.drop_table("control_streams")
    op.drop_table("manager_replicas")
