"""Nodes keep how far their clock is off the manager's (`fleetctl nodes show`).

Adds `nodes.clock_offset_ms`, NULL for existing rows (unknown): each node's next
registration measures it.

Revision ID: 0011_node_clock_offset
Revises: 0010_agent_log_problem
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_node_clock_offset"
down_revision: str | None = "0010_agent_log_problem"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Plain ADD/DROP COLUMN, as 0007 and 0008: a batch rebuild of `nodes` on SQLite would
    # drop the table its agent states cascade from.
    op.add_column("nodes", sa.Column("clock_offset_ms", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("nodes", "clock_offset_ms")
