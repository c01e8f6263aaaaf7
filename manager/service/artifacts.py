"""Artifacts: what operators push, list and delete, and what daemons download.

An upload is all or nothing. The service hashes every byte it receives
while the repository stages them in chunk rows; only when the stream has
ended with exactly the declared size and the SHA-256 of the received bytes
is the declared digest does one transaction make the artifact visible
(`ArtifactRepository.finish_upload`). A mismatch, a short or long stream, a
client that goes away, a manager that stops: the staged chunks are deleted
and nothing was stored (a crash leaves them to the janitor,
`manager.service.sweeper.ArtifactJanitor`). Versions are immutable: the
same (name, version) again with the same digest is "existed, nothing
changed", with another digest ALREADY_EXISTS naming both.

Two decisions belong to the desired-state part of the manager and are
injected: which node may download which content (`ArtifactAccess`: "a node
downloads only the artifacts of the definitions assigned to it") and which
definitions use an artifact (`ArtifactReferences`: a referenced artifact
cannot be deleted). The manager injects the definitions' rules
(`manager.service.definitions.ArtifactUse`); a store built without them
lets no node download (`NoNodeMayDownload`) and sees no references
(`NoReferences`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from fleet.artifacts import (
    CHUNK_SIZE,
    DIGEST_PREFIX,
    format_size,
    validate_digest,
    validate_name,
    validate_version,
)
from fleet.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Resource,
)
from fleet.v1 import common_pb2
from manager.storage.artifacts import ArtifactRepository, Change, version_taken
from manager.storage.records import ArtifactRecord

__all__ = [
    "ArtifactAccess",
    "ArtifactReferences",
    "ArtifactView",
    "Artifacts",
    "NoNodeMayDownload",
    "NoReferences",
    "Piece",
    "Upload",
]

log = logging.getLogger(__name__)


class ArtifactAccess(Protocol):
    """Decides whether a node may download some content."""

    async def may_download(self, node_id: str, digest: str) -> bool:
        """True if a definition assigned to `node_id` uses the artifact `digest`."""
        ...


class NoNodeMayDownload:
    """The `ArtifactAccess` of a store used without definitions: no node may download."""

    async def may_download(self, node_id: str, digest: str) -> bool:
        """Always False."""
        return False


class ArtifactReferences(Protocol):
    """Says which definitions use an artifact."""

    async def references(self, name: str, version: str) -> list[str]:
        """The definitions ("web@4") whose current or stable revision uses it."""
        ...


class NoReferences:
    """The `ArtifactReferences` of a store used without definitions: nothing references."""

    async def references(self, name: str, version: str) -> list[str]:
        """Always empty."""
        return []


@dataclass(frozen=True)
class Upload:
    """The first message of a push: what the client says it sends."""

    name: str
    """Artifact name."""
    version: str
    """Artifact version."""
    digest: str
    """``sha256:<hex>`` the client computed over the whole file."""
    size: int
    """Bytes the client will send."""


@dataclass(frozen=True)
class ArtifactView:
    """A stored artifact and the definitions that use it."""

    record: ArtifactRecord
    """The artifact."""
    referenced_by: list[str]
    """Definitions whose current or stable revision uses it."""


@dataclass(frozen=True)
class Piece:
    """One message of a download."""

    offset: int
    """Offset of data's first byte."""
    data: bytes
    """At most CHUNK_SIZE bytes."""
    size: int
    """The artifact's whole size."""


def _short(digest: str) -> str:
    return digest[: len(DIGEST_PREFIX) + 12]


class Artifacts:
    """Pushes, lists, serves and deletes artifacts."""

    def __init__(
        self,
        repo: ArtifactRepository,
        *,
        max_bytes: int,
        clock: Callable[[], float],
        access: ArtifactAccess | None = None,
        references: ArtifactReferences | None = None,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        self._repo = repo
        self._max_bytes = max_bytes
        self._clock = clock
        self._access: ArtifactAccess = access or NoNodeMayDownload()
        self._refs: ArtifactReferences = references or NoReferences()
        self._chunk_size = chunk_size
        self._cleanups: set[asyncio.Task[None]] = set()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def check_upload(self, upload: Upload) -> None:
        """InvalidArgument naming the field unless `upload` can be stored."""
        validate_name(upload.name, field="upload.name")
        validate_version(upload.version, field="upload.version")
        validate_digest(upload.digest, field="upload.digest")
        if upload.size < 0:
            raise InvalidArgument(f"must be >= 0, got {upload.size}", field="upload.size_bytes")
        if upload.size > self._max_bytes:
            raise InvalidArgument(
                f"{format_size(upload.size)} is over this manager's limit of"
                f" {format_size(self._max_bytes)} per artifact ([artifacts] max_bytes)",
                field="upload.size_bytes",
            )

    async def push(
        self, upload: Upload, chunks: AsyncIterator[bytes], *, actor: str
    ) -> tuple[ArtifactView, bool]:
        """Store what `chunks` delivers as `upload`; (the artifact, existed).

        InvalidArgument for a bad header, a stream longer or shorter than
        declared, or bytes whose digest is not the declared one; AlreadyExists
        for the same version with other content. Nothing is stored unless
        this returns. With `existed`, nothing changed (the rest of the stream
        is not read).
        """
        self.check_upload(upload)
        stored = await self._repo.get(upload.name, upload.version)
        if stored is not None:
            if stored.digest != upload.digest:
                raise version_taken(stored, upload.digest)  # before a byte is transferred
            return await self._view(stored), True
        shared = await self._repo.blob(upload.digest)
        staging = None
        if shared is None:
            staging = await self._repo.start_upload(
                declared=upload.digest,
                size=upload.size,
                chunk_size=self._chunk_size,
                now_ms=self._now_ms(),
            )
        try:
            await self._receive(upload, chunks, staging)
            record, existed = await self._repo.finish_upload(
                staging, self._record(upload, actor), self._pushed(upload, actor)
            )
        except BaseException:
            if staging is not None:
                await self._discard(staging)
            raise
        return await self._view(record), existed

    async def _receive(
        self, upload: Upload, chunks: AsyncIterator[bytes], staging: int | None
    ) -> None:
        """Hash (and stage, unless the content is shared) every byte; check size and digest."""
        digest = hashlib.sha256()
        received = 0
        index = 0
        pending = bytearray()
        async for data in chunks:
            if len(data) > CHUNK_SIZE:
                raise InvalidArgument(
                    f"at most {CHUNK_SIZE} bytes per message, got {len(data)}", field="chunk"
                )
            received += len(data)
            if received > upload.size:
                raise InvalidArgument(
                    f"received more bytes than the declared {upload.size}; nothing was stored",
                    field="upload.size_bytes",
                )
            digest.update(data)
            if staging is None:
                continue
            pending += data
            while len(pending) >= self._chunk_size:
                await self._store(staging, index, bytes(pending[: self._chunk_size]))
                del pending[: self._chunk_size]
                index += 1
        if received < upload.size:
            raise InvalidArgument(
                f"the upload ended after {received} of the declared {upload.size} bytes;"
                " nothing was stored",
                field="upload.size_bytes",
            )
        if staging is not None and pending:
            await self._store(staging, index, bytes(pending))
        actual = DIGEST_PREFIX + digest.hexdigest()
        if actual != upload.digest:
            raise InvalidArgument(
                f"digest mismatch: the {received} bytes received hash to {actual}, the upload"
                f" declared {upload.digest}; nothing was stored",
                field="upload.digest",
            )

    async def _store(self, staging: int, index: int, data: bytes) -> None:
        await self._repo.write_chunk(staging, index, data, now_ms=self._now_ms())

    async def _discard(self, staging: int) -> None:
        """Delete the staged chunks, even while the push is being cancelled."""
        task = asyncio.create_task(self._discard_now(staging))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        with contextlib.suppress(Exception):  # logged by _discard_now
            await asyncio.shield(task)

    async def _discard_now(self, staging: int) -> None:
        try:
            await self._repo.discard_upload(staging)
        except Exception as exc:
            log.warning(
                "could not delete the staged chunks of a failed upload (%s); the janitor"
                " removes them later",
                exc,
            )

    def _record(self, upload: Upload, actor: str) -> ArtifactRecord:
        return ArtifactRecord(
            name=upload.name,
            version=upload.version,
            digest=upload.digest,
            size=upload.size,
            created_ms=self._now_ms(),
            actor=actor,
        )

    def _change(self, actor: str, message: str, **detail: str) -> Change:
        return Change(actor=actor, message=message, detail=detail, now_ms=self._now_ms())

    def _pushed(self, upload: Upload, actor: str) -> Change:
        return self._change(
            actor,
            f"{actor} pushed artifact {upload.name} {upload.version}"
            f" ({format_size(upload.size)}, {_short(upload.digest)}...)",
            name=upload.name,
            version=upload.version,
            digest=upload.digest,
            size=str(upload.size),
        )

    async def _view(self, record: ArtifactRecord) -> ArtifactView:
        return ArtifactView(record, await self._refs.references(record.name, record.version))

    # --- reads and delete -------------------------------------------------------

    async def list_artifacts(self, name: str = "") -> list[ArtifactView]:
        """Every artifact, or `name`'s versions (InvalidArgument for an invalid name)."""
        if name:
            validate_name(name)
        return [await self._view(r) for r in await self._repo.list_artifacts(name)]

    async def get(self, name: str, version: str) -> ArtifactView:
        """One artifact; NotFound if it is not stored."""
        validate_name(name)
        validate_version(version)
        record = await self._repo.get(name, version)
        if record is None:
            raise NotFound(
                f"artifact {name} {version} is not stored",
                resource=Resource("artifact", f"{name}:{version}"),
            )
        return await self._view(record)

    async def delete(self, name: str, version: str, *, actor: str) -> ArtifactRecord:
        """Delete one artifact (audited); FailedPrecondition while a definition uses it."""
        validate_name(name)
        validate_version(version)
        users = await self._refs.references(name, version)
        if users:
            raise FailedPrecondition(
                f"artifact {name} {version} is used by {', '.join(sorted(users))}; change or"
                " delete those definitions first"
            )
        return await self._repo.delete(
            name,
            version,
            self._change(
                actor,
                f"{actor} deleted artifact {name} {version}",
                name=name,
                version=version,
            ),
        )

    async def resolve(self, ref: common_pb2.ArtifactRef, *, field: str) -> common_pb2.ArtifactRef:
        """A definition's reference completed from the store (name, version, digest, size).

        By name and version (a digest given too must match), or by digest
        alone (the oldest artifact with that content names it). InvalidArgument
        naming `field` if it is incomplete or nothing stored matches.
        """
        record: ArtifactRecord | None
        if ref.name or ref.version:
            validate_name(ref.name, field=f"{field}.name")
            validate_version(ref.version, field=f"{field}.version")
            record = await self._repo.get(ref.name, ref.version)
            if record is None:
                raise InvalidArgument(
                    f"artifact {ref.name} {ref.version} is not stored on this manager", field=field
                )
            if ref.digest and ref.digest != record.digest:
                raise InvalidArgument(
                    f"artifact {ref.name} {ref.version} is {record.digest}, not {ref.digest}",
                    field=f"{field}.digest",
                )
        elif ref.digest:
            validate_digest(ref.digest, field=f"{field}.digest")
            found = sorted(await self._repo.by_digest(ref.digest), key=lambda r: r.created_ms)
            if not found:
                raise InvalidArgument(
                    f"no artifact with digest {ref.digest} is stored on this manager", field=field
                )
            record = found[0]
        else:
            raise InvalidArgument(
                "give the artifact's name and version, or its digest", field=field
            )
        return common_pb2.ArtifactRef(
            name=record.name, version=record.version, digest=record.digest, size_bytes=record.size
        )

    # --- downloads ------------------------------------------------------------

    async def download(self, node_id: str, digest: str, offset: int) -> AsyncGenerator[Piece, None]:
        """The content `digest` from `offset`, for `node_id`.

        PermissionDenied unless the access policy lets the node have it
        (checked before anything about the content is revealed); NotFound if
        it is not stored (or deleted meanwhile). An offset at the end gives
        one empty piece, so the caller learns the size either way.
        """
        validate_digest(digest)
        if offset < 0:
            raise InvalidArgument(f"must be >= 0, got {offset}", field="offset")
        if not await self._access.may_download(node_id, digest):
            raise PermissionDenied(
                f"node/{node_id} may not download {digest}: no definition assigned to it uses"
                " that artifact"
            )
        blob = await self._repo.blob(digest)
        if blob is None:
            raise NotFound(
                f"artifact {digest} is not stored on this manager",
                resource=Resource("artifact", digest),
            )
        if offset > blob.size:
            raise InvalidArgument(
                f"{offset} is past the end of {digest} ({blob.size} bytes)", field="offset"
            )
        if offset == blob.size:
            yield Piece(offset, b"", blob.size)
            return
        index, skip = divmod(offset, blob.chunk_size)
        position = offset
        while position < blob.size:
            data = await self._repo.read_chunk(blob.id, index)
            if data is None:
                raise NotFound(
                    f"artifact {digest} was deleted during the download",
                    resource=Resource("artifact", digest),
                )
            view = memoryview(data)[skip:]
            for start in range(0, len(view), CHUNK_SIZE):
                piece = bytes(view[start : start + CHUNK_SIZE])
                yield Piece(position, piece, blob.size)
                position += len(piece)
            skip = 0
            index += 1

    async def expire_uploads(self, *, stale_after: float) -> int:
        """Delete the staged chunks of uploads idle longer than `stale_after` seconds."""
        return await self._repo.expire_uploads(
            idle_before_ms=self._now_ms() - int(stale_after * 1000)
        )
