"""Enrollment: join tokens, the certificates issued to nodes, and the node deny list.

Adds `join_tokens`, `node_certificates`, `node_revocations` and
`nodes.cert_not_after_ms` (0, "unknown", for nodes registered before).

Revision ID: 0008_enrollment
Revises: 0007_jobs
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_enrollment"
down_revision: str | None = "0007_jobs"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Plain ADD COLUMN with a constant default, as 0007: no rebuild of `nodes`.
    op.add_column(
        "nodes",
        sa.Column("cert_not_after_ms", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.create_table(
        "join_tokens",
        sa.Column("id", sa.String(16), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("node_name", sa.String(63), nullable=False),
        sa.Column("name_prefix", sa.String(63), nullable=False),
        sa.Column("labels", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(300), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("expires_ms", sa.BigInteger(), nullable=False),
        sa.Column("uses_total", sa.Integer(), nullable=False),
        sa.Column("uses_left", sa.Integer(), nullable=False),
        sa.Column("revoked_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_join_tokens"),
        sa.CheckConstraint("uses_left >= 0", name="ck_join_tokens_uses_left"),
    )
    op.create_table(
        "node_certificates",
        sa.Column("serial", sa.String(40), nullable=False),
        sa.Column("node_id", sa.String(253), nullable=False),
        sa.Column("token_id", sa.String(16), nullable=False),
        sa.Column("issued_ms", sa.BigInteger(), nullable=False),
        sa.Column("not_before_ms", sa.BigInteger(), nullable=False),
        sa.Column("not_after_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("serial", name="pk_node_certificates"),
    )
    op.create_index(
        "ix_node_certificates_node_id_issued_ms", "node_certificates", ["node_id", "issued_ms"]
    )
    op.create_table(
        "node_revocations",
        sa.Column("node_id", sa.String(253), nullable=False),
        sa.Column("not_before_ms", sa.BigInteger(), nullable=False),
        sa.Column("revoked_ms", sa.BigInteger(), nullable=False),
        sa.Column("revoked_by", sa.String(300), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("node_id", name="pk_node_revocations"),
    )


def downgrade() -> None:
    op.drop_table("node_revocations")
    op.drop_index("ix_node_certificates_node_id_issued_ms", table_name="node_certificates")
    op.drop_table("node_certificates")
    op.drop_table("join_tokens")
    op.drop_column("nodes", "cert_not_after_ms")
