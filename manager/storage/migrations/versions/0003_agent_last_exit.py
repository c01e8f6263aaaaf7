"""Agents keep how their last process ended, and when their state was reported.

Adds `agent_states.last_exit_kind`, `last_exit_code`, `last_exit_reason`,
`last_exit_ms` and `reported_ms`. Existing rows get empty values: the next
sync of each node fills them (daemons report the last exit of every agent).

Revision ID: 0003_agent_last_exit
Revises: 0002_node_label_owners
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_agent_last_exit"
down_revision: str | None = "0002_node_label_owners"
branch_labels: str | None = None
depends_on: str | None = None

_COLUMNS = (
    ("last_exit_kind", sa.String(32), ""),
    ("last_exit_code", sa.BigInteger(), "0"),
    ("last_exit_reason", sa.Text(), ""),
    ("last_exit_ms", sa.BigInteger(), "0"),
    ("reported_ms", sa.BigInteger(), "0"),
)


def upgrade() -> None:
    with op.batch_alter_table("agent_states") as batch:
        for name, kind, default in _COLUMNS:
            batch.add_column(sa.Column(name, kind, nullable=False, server_default=default))


def downgrade() -> None:
    with op.batch_alter_table("agent_states") as batch:
        for name, _, _ in reversed(_COLUMNS):
            batch.drop_column(name)
