"""Agents keep why their output is being lost (their log filesystem is full).

Adds `agent_states.log_problem`. Existing rows get "" (no problem known): the
next sync of each node says it again if there is one.

Revision ID: 0010_agent_log_problem
Revises: 0009_replicas
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_agent_log_problem"
down_revision: str | None = "0009_replicas"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("agent_states") as batch:
        batch.add_column(sa.Column("log_problem", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("agent_states") as batch:
        batch.drop_column("log_problem")
