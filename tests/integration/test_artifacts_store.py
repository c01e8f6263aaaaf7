"""Artifact uploads, downloads and deletes through the service, on real SQLite and PostgreSQL.

An upload is all or nothing: only a complete stream whose bytes hash to the
declared digest becomes visible; a mismatch, a short or long stream or a
cancelled push leaves no artifact, no blob and no chunk behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from artifact_helpers import Grants, Uses, digest
from manager_harness import FakeClock
from sqlalchemy import func, select

from fleet.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from fleet.v1 import common_pb2
from manager.service.artifacts import Artifacts, Upload
from manager.service.sweeper import ArtifactJanitor
from manager.storage import AuditRepository, Database, EventRepository
from manager.storage.artifacts import ArtifactRepository
from manager.storage.schema import artifact_blobs, artifact_chunks, artifacts

CHUNK = 1000
"""Bytes per stored chunk in these tests (the real size is 1 MiB)."""
ALICE = "operator/alice"


def upload(data: bytes, name: str = "web", version: str = "1.0", **changes: Any) -> Upload:
    fields: dict[str, Any] = {
        "name": name,
        "version": version,
        "digest": digest(data),
        "size": len(data),
    }
    fields.update(changes)
    return Upload(**fields)


async def pieces(data: bytes, size: int = 700) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def service(db: Database, clock: FakeClock | None = None, **kw: Any) -> Artifacts:
    kw.setdefault("max_bytes", 1 << 20)
    return Artifacts(ArtifactRepository(db), clock=clock or FakeClock(), chunk_size=CHUNK, **kw)


async def rows(db: Database) -> dict[str, int]:
    """How many rows each artifact table holds."""
    async with db.engine.connect() as conn:
        return {
            t.name: (await conn.execute(select(func.count()).select_from(t))).scalar_one()
            for t in (artifacts, artifact_blobs, artifact_chunks)
        }


NOTHING = {"artifacts": 0, "artifact_blobs": 0, "artifact_chunks": 0}


async def download(svc: Artifacts, digest: str, offset: int = 0, node: str = "n1") -> bytes:
    return b"".join([p.data async for p in svc.download(node, digest, offset)])


async def test_a_push_is_stored_in_chunks_and_served_from_any_offset(database: Database) -> None:
    """2,500 bytes come back whole, from the middle, and as one empty piece at the end."""
    data = bytes(range(256)) * 9 + b"tail"  # 2,308 bytes: three chunks, the last one short
    svc = service(database, access=Grants({"n1": [digest(data)]}))
    view, existed = await svc.push(upload(data), pieces(data), actor=ALICE)
    assert not existed
    assert (view.record.name, view.record.version, view.record.size) == ("web", "1.0", len(data))
    assert view.record.digest == digest(data)
    assert view.record.actor == ALICE
    assert await rows(database) == {"artifacts": 1, "artifact_blobs": 1, "artifact_chunks": 3}

    assert await download(svc, digest(data)) == data
    assert await download(svc, digest(data), 1500) == data[1500:]
    served = [p async for p in svc.download("n1", digest(data), len(data))]
    assert [(p.offset, p.data, p.size) for p in served] == [(len(data), b"", len(data))]
    with pytest.raises(InvalidArgument, match="offset: 2309 is past the end"):
        await download(svc, digest(data), len(data) + 1)


async def test_a_push_is_audited_and_is_an_event(database: Database) -> None:
    """ARTIFACT_PUSHED names the operator, the artifact and its digest; the audit has it too."""
    data = b"x" * 10
    await service(database).push(upload(data, "agent", "2.1"), pieces(data), actor=ALICE)
    (event,) = await EventRepository(database).list_after(0)
    assert event.kind == "ARTIFACT_PUSHED"
    assert event.actor == ALICE
    assert event.message.startswith("operator/alice pushed artifact agent 2.1 (10 B, sha256:")
    assert event.attributes["digest"] == digest(data)
    (entry,) = await AuditRepository(database).list_recent()
    assert (entry.actor, entry.action, entry.target) == (ALICE, "artifacts.push", "agent:2.1")


async def test_a_digest_mismatch_stores_nothing(database: Database) -> None:
    """Bytes that do not hash to the declared digest: refused naming both, nothing stored."""
    data, other = b"a" * 2500, b"b" * 2500
    svc = service(database)
    with pytest.raises(InvalidArgument) as caught:
        await svc.push(upload(other, digest=digest(data)), pieces(other), actor=ALICE)
    assert "digest mismatch" in caught.value.message
    assert digest(data) in caught.value.message
    assert digest(other) in caught.value.message
    assert await rows(database) == NOTHING
    assert await EventRepository(database).list_after(0) == []
    assert await svc.list_artifacts() == []


@pytest.mark.parametrize(
    ("sent", "message"),
    [
        (b"a" * 1999, "the upload ended after 1999 of the declared 2000 bytes"),
        (b"a" * 2001, "received more bytes than the declared 2000"),
    ],
    ids=["short", "long"],
)
async def test_a_stream_of_the_wrong_length_stores_nothing(
    database: Database, sent: bytes, message: str
) -> None:
    """Fewer or more bytes than declared: refused, and the staged chunks are gone."""
    with pytest.raises(InvalidArgument, match=message):
        await service(database).push(upload(b"a" * 2000), pieces(sent), actor=ALICE)
    assert await rows(database) == NOTHING


async def test_an_interrupted_upload_stores_nothing(database: Database) -> None:
    """A push cancelled half-way (the client went away) leaves no artifact and no chunk."""
    data = b"z" * 5000
    half = asyncio.Event()
    never = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield data[:2500]
        half.set()
        await never.wait()
        yield data[2500:]

    svc = service(database)
    push = asyncio.create_task(svc.push(upload(data), stalls(), actor=ALICE))
    await half.wait()
    for _ in range(100):  # the first chunks are staged meanwhile
        if (await rows(database))["artifact_chunks"] == 2:
            break
        await asyncio.sleep(0.01)
    assert await rows(database) == {"artifacts": 0, "artifact_blobs": 1, "artifact_chunks": 2}
    push.cancel()
    with pytest.raises(asyncio.CancelledError):
        await push
    assert await rows(database) == NOTHING
    assert await EventRepository(database).list_after(0) == []


async def test_the_same_version_again_is_existed_and_changes_nothing(database: Database) -> None:
    """Same name, version and digest: existed, no second event, the bytes are not even read."""
    data = b"same" * 600
    svc = service(database)
    await svc.push(upload(data), pieces(data), actor=ALICE)
    read: list[bytes] = []

    async def watched() -> AsyncIterator[bytes]:
        async for p in pieces(data):
            read.append(p)
            yield p

    view, existed = await svc.push(upload(data), watched(), actor="operator/bob")
    assert existed
    assert view.record.actor == ALICE
    assert read == []
    assert len(await EventRepository(database).list_after(0)) == 1


async def test_a_version_is_immutable(database: Database) -> None:
    """Same name and version with other content: ALREADY_EXISTS naming both digests."""
    first, second = b"1" * 100, b"2" * 100
    svc = service(database)
    await svc.push(upload(first), pieces(first), actor=ALICE)
    with pytest.raises(AlreadyExists) as caught:
        await svc.push(upload(second), pieces(second), actor=ALICE)
    assert digest(first) in caught.value.message
    assert digest(second) in caught.value.message
    assert "push it as a new version" in caught.value.message
    assert await download(service(database, access=Grants({"n1": [digest(first)]})),
                          digest(first)) == first  # fmt: skip
    assert await rows(database) == {"artifacts": 1, "artifact_blobs": 1, "artifact_chunks": 1}


async def test_racing_pushes_of_one_version_store_exactly_one(database: Database) -> None:
    """Two operators push different content as web 1.0 at once: one wins, one is refused."""
    a, b = b"A" * 3000, b"B" * 3000
    svc = service(database)
    results = await asyncio.gather(
        svc.push(upload(a), pieces(a), actor=ALICE),
        svc.push(upload(b), pieces(b), actor="operator/bob"),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 1, results
    assert isinstance(refused[0], AlreadyExists), results
    assert await rows(database) == {"artifacts": 1, "artifact_blobs": 1, "artifact_chunks": 3}


async def test_a_declared_size_over_the_limit_is_refused_before_any_byte(
    database: Database,
) -> None:
    """max_bytes: the declared size alone refuses the push, and the stream is never read."""
    read: list[bytes] = []

    async def watched() -> AsyncIterator[bytes]:
        read.append(b"x")
        yield b"x"

    svc = service(database, max_bytes=1000)
    with pytest.raises(InvalidArgument, match=r"upload.size_bytes: 1\.0 KiB is over this manager"):
        await svc.push(upload(b"x" * 1025), watched(), actor=ALICE)
    assert read == []
    assert await rows(database) == NOTHING


async def test_shared_content_is_stored_once_and_outlives_one_delete(database: Database) -> None:
    """Two versions with one content share a blob; it goes with the last one, not before."""
    data = b"shared" * 500
    svc = service(database, access=Grants({"n1": [digest(data)]}))
    await svc.push(upload(data, version="1.0"), pieces(data), actor=ALICE)
    await svc.push(upload(data, version="1.0-copy"), pieces(data), actor=ALICE)
    assert await rows(database) == {"artifacts": 2, "artifact_blobs": 1, "artifact_chunks": 3}

    await svc.delete("web", "1.0", actor=ALICE)
    assert await download(svc, digest(data)) == data
    await svc.delete("web", "1.0-copy", actor=ALICE)
    assert await rows(database) == NOTHING
    with pytest.raises(NotFound, match="is not stored on this manager"):
        await download(svc, digest(data))
    kinds = [e.kind for e in await EventRepository(database).list_after(0)]
    assert kinds == ["ARTIFACT_PUSHED", "ARTIFACT_PUSHED", "ARTIFACT_DELETED", "ARTIFACT_DELETED"]


async def test_deleting_an_unknown_artifact_is_not_found(database: Database) -> None:
    """NotFound names the artifact and nothing is written."""
    with pytest.raises(NotFound, match=r"artifact web 9\.9 is not stored"):
        await service(database).delete("web", "9.9", actor=ALICE)
    assert await EventRepository(database).list_after(0) == []


async def test_a_referenced_artifact_cannot_be_deleted(database: Database) -> None:
    """FAILED_PRECONDITION naming the definitions that use it; it stays stored."""
    data = b"used"
    svc = service(database, references=Uses({("web", "1.0"): ["web@3", "api@1"]}))
    await svc.push(upload(data), pieces(data), actor=ALICE)
    with pytest.raises(FailedPrecondition, match=r"is used by api@1, web@3"):
        await svc.delete("web", "1.0", actor=ALICE)
    (view,) = await svc.list_artifacts()
    assert view.referenced_by == ["web@3", "api@1"]


async def test_a_stalled_upload_is_removed_by_the_janitor(database: Database) -> None:
    """Staged chunks idle past stale_upload_seconds are deleted; the upload then fails."""
    clock = FakeClock()
    data = b"s" * 3000
    svc = service(database, clock)
    staged = asyncio.Event()
    resume = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield data[:1500]
        staged.set()
        await resume.wait()
        yield data[1500:]

    push = asyncio.create_task(svc.push(upload(data), stalls(), actor=ALICE))
    await staged.wait()
    await asyncio.sleep(0.05)
    janitor = ArtifactJanitor(database, svc, interval=60, stale_after=3600)
    assert await janitor.run_once() == 0  # fresh: kept
    clock.advance(3601)
    assert await janitor.run_once() == 1
    assert await rows(database) == NOTHING
    resume.set()
    with pytest.raises(FailedPrecondition, match=r"idle so long .* push again"):
        await push
    assert await rows(database) == NOTHING


async def test_downloads_follow_the_access_policy(database: Database) -> None:
    """The interim policy lets no node download; an injected one only what it grants."""
    data, other = b"granted", b"not granted"
    for content in (data, other):
        await service(database).push(
            upload(content, version=str(len(content))), pieces(content), actor=ALICE
        )
    with pytest.raises(PermissionDenied, match="node/n1 may not download"):
        await download(service(database), digest(data))
    svc = service(database, access=Grants({"n1": [digest(data)]}))
    assert await download(svc, digest(data)) == data
    with pytest.raises(PermissionDenied, match=f"node/n1 may not download {digest(other)}"):
        await download(svc, digest(other))
    with pytest.raises(PermissionDenied, match="node/n2 may not download"):
        await download(svc, digest(data), node="n2")


async def test_resolve_completes_a_definitions_reference(database: Database) -> None:
    """By name and version or by digest; unknown ones are INVALID_ARGUMENT naming the field."""
    data = b"resolve me"
    svc = service(database)
    await svc.push(upload(data, version="1.2.3"), pieces(data), actor=ALICE)
    full = common_pb2.ArtifactRef(
        name="web", version="1.2.3", digest=digest(data), size_bytes=len(data)
    )
    by_name = common_pb2.ArtifactRef(name="web", version="1.2.3")
    assert await svc.resolve(by_name, field="definitions[web].artifact") == full
    assert await svc.resolve(common_pb2.ArtifactRef(digest=digest(data)), field="a") == full
    with pytest.raises(InvalidArgument, match=r"^definitions\[web\].artifact: artifact web 9 is"):
        await svc.resolve(
            common_pb2.ArtifactRef(name="web", version="9"), field="definitions[web].artifact"
        )
    with pytest.raises(InvalidArgument, match=r"a\.digest: artifact web 1\.2\.3 is sha256:"):
        await svc.resolve(
            common_pb2.ArtifactRef(name="web", version="1.2.3", digest=digest(b"no")), field="a"
        )
