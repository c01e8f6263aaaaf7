"""Jobs: a command or steps run once on selected nodes, with per-target results and output.

Adds `jobs`, `job_targets`, `job_output` (chunk rows) and `nodes.jobs_disabled`
(false for every node registered before: their daemons predate jobs, and
say otherwise when they register again).

Revision ID: 0007_jobs
Revises: 0006_artifacts
Create Date: 2026-12-13
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_jobs"
down_revision: str | None = "0006_artifacts"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Not batch mode and a constant default: either would make Alembic rebuild
    # `nodes` on SQLite, and dropping the old table cascades to agent_states
    # (foreign keys are on) -- every agent state would be lost on upgrade.
    op.add_column(
        "nodes",
        sa.Column("jobs_disabled", sa.Boolean(), nullable=False, server_default="0"),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(300), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("ended_ms", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("rerun_of", sa.String(64), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("cancelled_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
    )
    op.create_index("ix_jobs_created_ms", "jobs", ["created_ms"])
    op.create_index("ix_jobs_ended_ms", "jobs", ["ended_ms"])
    op.create_table(
        "job_targets",
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("node_id", sa.String(253), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=False),
        sa.Column("started_ms", sa.BigInteger(), nullable=False),
        sa.Column("ended_ms", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("steps", sa.Text(), nullable=False),
        sa.Column("output_bytes", sa.BigInteger(), nullable=False),
        sa.Column("output_stored_bytes", sa.BigInteger(), nullable=False),
        sa.Column("truncated", sa.Boolean(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("next_attempt_ms", sa.BigInteger(), nullable=False),
        sa.Column("dispatched_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "node_id", name="pk_job_targets"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_job_targets_job_id_jobs", ondelete="CASCADE"
        ),
        sa.CheckConstraint("output_stored_bytes >= 0", name="ck_job_targets_output_stored_bytes"),
    )
    op.create_table(
        "job_output",
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("node_id", sa.String(253), nullable=False),
        sa.Column("pos", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "node_id", "pos", name="pk_job_output"),
        sa.ForeignKeyConstraint(
            ["job_id", "node_id"],
            ["job_targets.job_id", "job_targets.node_id"],
            name="fk_job_output_job_id_job_targets",
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("job_output")
    op.drop_table("job_targets")
    op.drop_table("jobs")
    # As 0002: ALTER TABLE ... DROP COLUMN, no rebuild (SQLite 3.35+).
    op.drop_column("nodes", "jobs_disabled")
