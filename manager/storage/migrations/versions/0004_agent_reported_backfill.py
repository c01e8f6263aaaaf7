"""Agent states stored before 0003 get the time their daemon was last heard from.

0003 added `agent_states.reported_ms` with 0 for existing rows, expecting the
next sync of each node to fill it. A node that is offline at the upgrade never
syncs again until it returns, so its agents were listed as stale "as of never"
(and `fleetctl agents show` took the 0 for a live answer). Their node's
`last_seen_ms` is the right time: a daemon syncs on every change of an agent,
so what it last reported was still true when it was last heard from.

Only rows still at 0 change; rows a daemon has synced since 0003 keep their
time. Data only: the downgrade has nothing to undo.

Revision ID: 0004_agent_reported_backfill
Revises: 0003_agent_last_exit
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_agent_reported_backfill"
down_revision: str | None = "0003_agent_last_exit"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    agent_states = sa.table("agent_states", sa.column("node_id"), sa.column("reported_ms"))
    nodes = sa.table("nodes", sa.column("node_id"), sa.column("last_seen_ms"))
    last_seen = (
        sa.select(nodes.c.last_seen_ms)
        .where(nodes.c.node_id == agent_states.c.node_id)
        .scalar_subquery()
    )
    op.execute(
        agent_states.update().where(agent_states.c.reported_ms == 0).values(reported_ms=last_seen)
    )


def downgrade() -> None:
    pass
