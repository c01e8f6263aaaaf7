"""Artifacts: files and archives operators push, stored in chunks for every replica.

Adds `artifact_blobs` (one per content; a staging upload until its digest is
set), `artifact_chunks` (the bytes) and `artifacts` ((name, version) ->
digest). New tables only: no existing row changes.

Revision ID: 0006_artifacts
Revises: 0005_desired_state
Create Date: 2026-12-12
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_artifacts"
down_revision: str | None = "0005_desired_state"
branch_labels: str | None = None
depends_on: str | None = None

# INTEGER PRIMARY KEY is SQLite's rowid alias; BIGINT (BIGSERIAL) elsewhere.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "artifact_blobs",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("digest", sa.String(71), nullable=True),
        sa.Column("declared", sa.String(71), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("chunk_size", sa.Integer(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_artifact_blobs"),
        sa.UniqueConstraint("digest", name="uq_artifact_blobs_digest"),
        sa.CheckConstraint("size >= 0", name="ck_artifact_blobs_size"),
        sa.CheckConstraint("chunk_size > 0", name="ck_artifact_blobs_chunk_size"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_artifact_blobs_updated_ms", "artifact_blobs", ["updated_ms"])

    op.create_table(
        "artifact_chunks",
        sa.Column("blob_id", sa.BigInteger(), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("blob_id", "idx", name="pk_artifact_chunks"),
        sa.ForeignKeyConstraint(
            ["blob_id"],
            ["artifact_blobs.id"],
            name="fk_artifact_chunks_blob_id_artifact_blobs",
            ondelete="CASCADE",
        ),
    )

    op.create_table(
        "artifacts",
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("digest", sa.String(71), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(300), nullable=False),
        sa.PrimaryKeyConstraint("name", "version", name="pk_artifacts"),
        sa.ForeignKeyConstraint(
            ["digest"], ["artifact_blobs.digest"], name="fk_artifacts_digest_artifact_blobs"
        ),
    )
    op.create_index("ix_artifacts_digest", "artifacts", ["digest"])


def downgrade() -> None:
    op.drop_table("artifacts")
    op.drop_table("artifact_chunks")
    op.drop_table("artifact_blobs")
