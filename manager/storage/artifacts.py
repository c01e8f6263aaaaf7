"""Artifact storage: (name, version) -> verified content, in chunk rows every replica reads.

An upload writes its chunks into a *staging* blob (`artifact_blobs.digest`
NULL, `declared` = what the client claims), one transaction per chunk. Only
`finish_upload`, given the digest the service computed over every received
byte, makes it visible: in one transaction it sets the blob's digest (or,
when the same content is stored already, drops the staging copy and shares
the stored blob), inserts the `artifacts` row and writes the audit entry and
the ARTIFACT_PUSHED event. Anything short of that leaves only a staging
blob, which `discard_upload` (right away) or `expire_uploads` (after a crash)
deletes with its chunks.

On PostgreSQL every transaction that makes artifacts visible or deletes them
first takes the transaction-scoped advisory lock "fleet-artifacts", so two
replicas finishing the same (name, version) or the same content, or a
delete racing a finish that shares its blob, run one after the other (SQLite
has one writer anyway). The unique digest and the foreign key from
`artifacts.digest` are the backstop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from fleet.errors import AlreadyExists, FailedPrecondition, NotFound, Resource
from manager.storage.audit import insert_audit
from manager.storage.db import Database, advisory_key
from manager.storage.events import event_row, insert_events
from manager.storage.records import ArtifactRecord
from manager.storage.schema import artifact_blobs, artifact_chunks, artifacts

__all__ = ["ArtifactRepository", "Blob", "Change", "UploadGone", "version_taken"]

_LOCK = advisory_key("fleet-artifacts")


class UploadGone(FailedPrecondition):
    """The staging blob of an upload is gone (removed as stale): push again."""


@dataclass(frozen=True)
class Blob:
    """Stored content."""

    id: int
    """Row id (chunks hang off it)."""
    digest: str
    """``sha256:<hex>``."""
    size: int
    """Bytes."""
    chunk_size: int
    """Bytes per chunk row (all but the last are full)."""


@dataclass(frozen=True)
class Change:
    """The audit entry and event an artifact change writes with it."""

    actor: str
    """Who ("operator/alice")."""
    message: str
    """The event's one line."""
    detail: Mapping[str, str]
    """The audit entry's detail and the event's attributes."""
    now_ms: int
    """When."""


def version_taken(stored: ArtifactRecord, digest: str) -> AlreadyExists:
    """The refusal of a push of `stored`'s name and version with other content."""
    return AlreadyExists(
        f"artifact {stored.name} {stored.version} is stored with digest {stored.digest};"
        f" this upload is {digest}. Versions are immutable: push it as a new version",
        resource=Resource("artifact", f"{stored.name}:{stored.version}"),
    )


def _record(row: Any) -> ArtifactRecord:
    return ArtifactRecord(
        name=row.name,
        version=row.version,
        digest=row.digest,
        size=row.size,
        created_ms=row.created_ms,
        actor=row.actor,
    )


async def _serialize(conn: AsyncConnection) -> None:
    if conn.dialect.name == "postgresql":
        await conn.execute(select(func.pg_advisory_xact_lock(_LOCK)))


async def _write_change(
    conn: AsyncConnection, kind: str, action: str, rec: ArtifactRecord, change: Change
) -> None:
    audit_id = await insert_audit(
        conn,
        actor=change.actor,
        action=action,
        target=f"{rec.name}:{rec.version}",
        detail=change.detail,
        outcome="ok",
        now_ms=change.now_ms,
    )
    attributes = {**change.detail, "audit_id": str(audit_id)}
    row = event_row(
        kind,
        now_ms=change.now_ms,
        message=change.message,
        actor=change.actor,
        attributes=attributes,
    )
    await insert_events(conn, [row])


class ArtifactRepository:
    """Stores, lists, serves and deletes artifacts."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # --- reads ----------------------------------------------------------------

    async def get(self, name: str, version: str) -> ArtifactRecord | None:
        """The artifact `name` `version`, None if it is not stored."""

        async def body(conn: AsyncConnection) -> ArtifactRecord | None:
            row = (
                await conn.execute(
                    select(artifacts).where(
                        artifacts.c.name == name, artifacts.c.version == version
                    )
                )
            ).first()
            return None if row is None else _record(row)

        return await self._db.run(body, write=False)

    async def list_artifacts(self, name: str = "") -> list[ArtifactRecord]:
        """Every artifact (or only `name`'s versions), by name, then oldest first."""
        query = select(artifacts).order_by(
            artifacts.c.name, artifacts.c.created_ms, artifacts.c.version
        )
        if name:
            query = query.where(artifacts.c.name == name)

        async def body(conn: AsyncConnection) -> list[ArtifactRecord]:
            return [_record(row) for row in await conn.execute(query)]

        return await self._db.run(body, write=False)

    async def by_digest(self, digest: str) -> list[ArtifactRecord]:
        """The artifacts whose content is `digest`."""

        async def body(conn: AsyncConnection) -> list[ArtifactRecord]:
            query = select(artifacts).where(artifacts.c.digest == digest)
            return [_record(row) for row in await conn.execute(query)]

        return await self._db.run(body, write=False)

    async def blob(self, digest: str) -> Blob | None:
        """The complete, verified content `digest`; None if it is not stored."""

        async def body(conn: AsyncConnection) -> Blob | None:
            b = artifact_blobs.c
            row = (
                await conn.execute(
                    select(b.id, b.digest, b.size, b.chunk_size).where(b.digest == digest)
                )
            ).first()
            return None if row is None else Blob(row.id, row.digest, row.size, row.chunk_size)

        return await self._db.run(body, write=False)

    async def read_chunk(self, blob_id: int, index: int) -> bytes | None:
        """Chunk `index` of a blob; None if the blob (or that chunk) is gone."""

        async def body(conn: AsyncConnection) -> bytes | None:
            c = artifact_chunks.c
            data = await conn.scalar(select(c.data).where(c.blob_id == blob_id, c.idx == index))
            return None if data is None else bytes(data)

        return await self._db.run(body, write=False)

    # --- uploads ----------------------------------------------------------------

    async def start_upload(self, *, declared: str, size: int, chunk_size: int, now_ms: int) -> int:
        """A new staging blob for an upload of `size` bytes claiming `declared`; its id."""
        row = {
            "digest": None,
            "declared": declared,
            "size": size,
            "chunk_size": chunk_size,
            "created_ms": now_ms,
            "updated_ms": now_ms,
        }

        async def body(conn: AsyncConnection) -> int:
            result = await conn.execute(
                insert(artifact_blobs).values(row).returning(artifact_blobs.c.id)
            )
            return int(result.scalar_one())

        return await self._db.run(body)

    async def write_chunk(self, blob_id: int, index: int, data: bytes, *, now_ms: int) -> None:
        """Store chunk `index` of a staging blob; UploadGone if the blob was removed."""

        async def body(conn: AsyncConnection) -> None:
            b = artifact_blobs.c
            touched = await conn.execute(
                update(artifact_blobs)
                .where(b.id == blob_id, b.digest.is_(None))
                .values(updated_ms=now_ms)
            )
            if touched.rowcount != 1:
                raise UploadGone(
                    "this upload was idle so long that its staged bytes were removed; push again"
                )
            await conn.execute(
                insert(artifact_chunks).values(blob_id=blob_id, idx=index, data=data)
            )

        await self._db.run(body)

    async def discard_upload(self, blob_id: int) -> None:
        """Delete a staging blob and its chunks (a no-op once it was finished or removed)."""

        async def body(conn: AsyncConnection) -> None:
            b = artifact_blobs.c
            await conn.execute(delete(artifact_blobs).where(b.id == blob_id, b.digest.is_(None)))

        await self._db.run(body)

    async def expire_uploads(self, *, idle_before_ms: int) -> int:
        """Delete staging blobs idle since before `idle_before_ms` (crashed uploads); how many."""

        async def body(conn: AsyncConnection) -> int:
            b = artifact_blobs.c
            result = await conn.execute(
                delete(artifact_blobs).where(b.digest.is_(None), b.updated_ms < idle_before_ms)
            )
            return int(result.rowcount or 0)

        return await self._db.run(body)

    async def finish_upload(
        self,
        staging_id: int | None,
        record: ArtifactRecord,
        change: Change,
    ) -> tuple[ArtifactRecord, bool]:
        """Make `record` visible with the staged bytes (already verified to be its digest).

        Returns (the stored artifact, existed). `existed`: the same name,
        version and digest were stored already, nothing changed. The same
        name and version with another digest is AlreadyExists naming both
        (versions are immutable). Content stored already under another name
        is shared and the staging copy dropped; `staging_id` None asks for
        exactly that (FailedPrecondition if it was deleted meanwhile). The
        caller discards the staging blob when this raises.
        """

        async def body(conn: AsyncConnection) -> tuple[ArtifactRecord, bool]:
            await _serialize(conn)
            a, b = artifacts.c, artifact_blobs.c
            row = (
                await conn.execute(
                    select(artifacts).where(a.name == record.name, a.version == record.version)
                )
            ).first()
            if row is not None:
                stored = _record(row)
                if stored.digest != record.digest:
                    raise version_taken(stored, record.digest)
                if staging_id is not None:
                    await conn.execute(delete(artifact_blobs).where(b.id == staging_id))
                return stored, True
            shared = await conn.scalar(select(b.id).where(b.digest == record.digest))
            if shared is not None:
                if staging_id is not None:
                    await conn.execute(delete(artifact_blobs).where(b.id == staging_id))
            elif staging_id is None:
                raise FailedPrecondition(
                    f"the content {record.digest} was deleted while this upload ran; push again"
                )
            else:
                done = await conn.execute(
                    update(artifact_blobs)
                    .where(b.id == staging_id, b.digest.is_(None))
                    .values(digest=record.digest, updated_ms=change.now_ms)
                )
                if done.rowcount != 1:
                    raise UploadGone(
                        "this upload was idle so long that its staged bytes were removed;"
                        " push again"
                    )
            await conn.execute(
                insert(artifacts).values(
                    name=record.name,
                    version=record.version,
                    digest=record.digest,
                    size=record.size,
                    created_ms=record.created_ms,
                    actor=record.actor,
                )
            )
            await _write_change(conn, "ARTIFACT_PUSHED", "artifacts.push", record, change)
            return record, False

        return await self._db.run(body)

    # --- delete -------------------------------------------------------------------

    async def delete(self, name: str, version: str, change: Change) -> ArtifactRecord:
        """Delete one artifact, and its content unless another artifact shares it.

        NotFound if it is not stored. Writes the audit entry and the
        ARTIFACT_DELETED event in the same transaction.
        """

        async def body(conn: AsyncConnection) -> ArtifactRecord:
            await _serialize(conn)
            a, b = artifacts.c, artifact_blobs.c
            row = (
                await conn.execute(select(artifacts).where(a.name == name, a.version == version))
            ).first()
            if row is None:
                raise NotFound(
                    f"artifact {name} {version} is not stored",
                    resource=Resource("artifact", f"{name}:{version}"),
                )
            gone = _record(row)
            await conn.execute(delete(artifacts).where(a.name == name, a.version == version))
            others = await conn.scalar(
                select(func.count()).select_from(artifacts).where(a.digest == gone.digest)
            )
            if not others:
                await conn.execute(delete(artifact_blobs).where(b.digest == gone.digest))
            await _write_change(conn, "ARTIFACT_DELETED", "artifacts.delete", gone, change)
            return gone

        return await self._db.run(body)
