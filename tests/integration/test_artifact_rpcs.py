"""The artifact RPCs over real mTLS: operators push, list, show and delete; nodes download.

Pushes use grpc's synchronous client, as fleetctl does (see artifact_helpers).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from artifact_helpers import Grants, Uses, digest, push, push_requests, sync_operator
from daemon_helpers import eventually
from fleet_harness import operator_stub
from manager_harness import FakeClock, manager_config, node_stub, rpc_error, running_manager
from sqlalchemy import func, select

from fleet.artifacts import CHUNK_SIZE
from fleet.errors import Resource
from fleet.v1 import desired_pb2, fleet_pb2, fleet_pb2_grpc, manager_pb2
from manager.server import ManagerServer
from manager.storage import AuditRepository, EventRepository
from manager.storage.schema import artifact_blobs, artifact_chunks, artifacts

PushRequest = fleet_pb2.FleetServicePushArtifactRequest


@dataclass
class Env:
    """A manager with injected artifact policies, and alice's FleetService stub."""

    manager: ManagerServer
    stub: fleet_pb2_grpc.FleetServiceStub
    sync: fleet_pb2_grpc.FleetServiceStub
    """Alice's synchronous stub, for pushes."""
    grants: Grants
    uses: Uses
    pki: Any

    async def push(
        self, data: bytes, name: str = "web", version: str = "1.0"
    ) -> fleet_pb2.FleetServicePushArtifactResponse:
        """Push `data` as alice."""
        return await asyncio.to_thread(push, self.sync, data, name, version)

    async def push_stream(self, *messages: PushRequest) -> None:
        """Send these messages as one PushArtifact stream, as alice."""
        await asyncio.to_thread(self.sync.PushArtifact, iter(messages), timeout=30)

    async def rows(self) -> int:
        """Rows in the three artifact tables together."""
        async with self.manager.db.engine.connect() as conn:
            return sum(
                [
                    (await conn.execute(select(func.count()).select_from(t))).scalar_one()
                    for t in (artifacts, artifact_blobs, artifact_chunks)
                ]
            )

    async def download(
        self, digest: str, offset: int = 0, *, node: str = "n1", speaking_for: str = ""
    ) -> list[manager_pb2.DownloadArtifactResponse]:
        """DownloadArtifact as node/<node> (about `speaking_for`, default itself)."""
        async with node_stub(self.pki, node, self.manager.port) as stub:
            request = manager_pb2.DownloadArtifactRequest(
                node_id=speaking_for or node, digest=digest, offset=offset
            )
            return [m async for m in stub.DownloadArtifact(request, timeout=30)]


@asynccontextmanager
async def artifact_env(pki: Any, tmp_path: Path, **artifacts: Any) -> AsyncIterator[Env]:
    config = manager_config(pki, f"sqlite+aiosqlite:///{tmp_path / 'm.db'}", tmp_path / "state")
    if artifacts:
        from manager.config import ArtifactsConfig

        config = dataclasses.replace(config, artifacts=ArtifactsConfig(**artifacts))
    grants, uses = Grants(), Uses()
    async with (
        running_manager(
            config, FakeClock(), artifact_access=grants, artifact_references=uses
        ) as manager,
        operator_stub(pki, manager.port) as stub,
    ):
        with sync_operator(pki, manager.port) as sync:
            yield Env(manager, stub, sync, grants, uses, pki)


async def refused(call: Any) -> grpc.RpcError:
    """Await `call` and return the grpc.RpcError it must raise."""
    with pytest.raises(grpc.RpcError) as caught:
        await call
    return caught.value


async def test_push_list_show_delete_over_mtls(pki: Any, tmp_path: Path) -> None:
    """An operator's artifact goes in whole, is listed and shown, and is deleted, audited."""
    data = bytes(range(256)) * 5000  # 1.2 MiB: two messages
    async with artifact_env(pki, tmp_path) as env:
        reply = await env.push(data, "web", "1.4.2")
        assert not reply.existed
        a = reply.artifact
        assert (a.name, a.version, a.digest, a.size_bytes) == (
            "web",
            "1.4.2",
            digest(data),
            len(data),
        )
        assert a.actor == "operator/alice"
        await env.push(b"other", "api", "1")

        listed = await env.stub.ListArtifacts(fleet_pb2.FleetServiceListArtifactsRequest())
        assert [(x.name, x.version) for x in listed.artifacts] == [("api", "1"), ("web", "1.4.2")]
        only = await env.stub.ListArtifacts(fleet_pb2.FleetServiceListArtifactsRequest(name="web"))
        assert [x.version for x in only.artifacts] == ["1.4.2"]
        shown = await env.stub.GetArtifact(
            fleet_pb2.FleetServiceGetArtifactRequest(name="web", version="1.4.2")
        )
        assert shown.artifact == a

        await env.stub.DeleteArtifact(
            fleet_pb2.FleetServiceDeleteArtifactRequest(name="web", version="1.4.2")
        )
        err = await rpc_error(
            env.stub.GetArtifact(
                fleet_pb2.FleetServiceGetArtifactRequest(name="web", version="1.4.2")
            )
        )
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert Resource.from_metadata(err.trailing_metadata()) == Resource("artifact", "web:1.4.2")
        audit = await AuditRepository(env.manager.db).list_recent()
        assert [(e.actor, e.action, e.target) for e in reversed(audit)] == [
            ("operator/alice", "artifacts.push", "web:1.4.2"),
            ("operator/alice", "artifacts.push", "api:1"),
            ("operator/alice", "artifacts.delete", "web:1.4.2"),
        ]


async def test_pushing_the_same_again_is_existed(pki: Any, tmp_path: Path) -> None:
    """The same name, version and content: existed = true, one event only."""
    async with artifact_env(pki, tmp_path) as env:
        await env.push(b"v1", "web", "1")
        again = await env.push(b"v1", "web", "1")
        assert again.existed
        err = await refused(env.push(b"v2", "web", "1"))
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS
        assert digest(b"v1") in (err.details() or "")
        assert digest(b"v2") in (err.details() or "")
        kinds = [e.kind for e in await EventRepository(env.manager.db).list_after(0)]
        assert kinds == ["ARTIFACT_PUSHED"]


_UPLOAD = desired_pb2.ArtifactUpload(name="web", version="1", digest=digest(b"ab"), size_bytes=2)


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ((), "upload"),
        ((PushRequest(chunk=b"ab"),), "upload"),
        ((PushRequest(upload=_UPLOAD), PushRequest(upload=_UPLOAD)), "chunk"),
        ((PushRequest(upload=_UPLOAD), PushRequest(chunk=b"a" * (CHUNK_SIZE + 1))), "chunk"),
        ((PushRequest(upload=_UPLOAD), PushRequest(chunk=b"ba")), "upload.digest"),
        ((PushRequest(upload=_UPLOAD), PushRequest(chunk=b"a")), "upload.size_bytes"),
        (
            (PushRequest(upload=desired_pb2.ArtifactUpload(name="web", version="1")),),
            "upload.digest",
        ),
        ((PushRequest(upload=desired_pb2.ArtifactUpload(name="-x", version="1")),), "upload.name"),
        ((PushRequest(upload=desired_pb2.ArtifactUpload(name="x", version="")),), "upload.version"),
    ],
    ids=[
        "empty stream",
        "chunk first",
        "second upload",
        "chunk over 1 MiB",
        "digest mismatch",
        "short",
        "no digest",
        "bad name",
        "no version",
    ],
)
async def test_a_bad_push_stream_is_invalid_argument_and_stores_nothing(
    pki: Any, tmp_path: Path, messages: tuple[PushRequest, ...], field: str
) -> None:
    """Every malformed stream is INVALID_ARGUMENT naming the field; nothing is stored."""
    async with artifact_env(pki, tmp_path) as env:
        err = await refused(env.push_stream(*messages))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert (err.details() or "").startswith(f"{field}: "), err.details()
        assert await env.rows() == 0
        assert await EventRepository(env.manager.db).list_after(0) == []


async def test_over_the_size_limit_is_refused(pki: Any, tmp_path: Path) -> None:
    """[artifacts] max_bytes refuses a larger declared size, saying the limit."""
    async with artifact_env(pki, tmp_path, max_bytes=1000) as env:
        err = await refused(env.push(b"x" * 1001))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "over this manager's limit of 1000 B per artifact" in (err.details() or "")
        assert await env.rows() == 0


async def test_a_push_the_client_cancels_stores_nothing(pki: Any, tmp_path: Path) -> None:
    """A client that goes away half-way through its upload leaves no trace."""
    data = b"c" * (3 * CHUNK_SIZE)
    sent_half = asyncio.Event()
    never = asyncio.Event()
    requests = list(push_requests(data))

    async def stalls() -> AsyncIterator[PushRequest]:
        for request in requests[:3]:  # the upload and two chunks
            yield request
        sent_half.set()
        await never.wait()

    async with artifact_env(pki, tmp_path) as env:
        call = env.stub.PushArtifact(stalls(), timeout=60)
        await sent_half.wait()
        await eventually(env.rows, lambda n: n >= 3)  # staged: a blob and two chunks
        call.cancel()
        assert await eventually(env.rows, lambda n: n == 0) == 0
        assert await EventRepository(env.manager.db).list_after(0) == []


async def test_nodes_download_what_they_are_granted_from_any_offset(
    pki: Any, tmp_path: Path
) -> None:
    """The assigned node gets the bytes in 1 MiB messages, from 0 or from where it stopped."""
    data = bytes(range(256)) * 9000  # 2.2 MiB
    async with artifact_env(pki, tmp_path) as env:
        await env.push(data)
        env.grants.allow("n1", digest(data))
        whole = await env.download(digest(data))
        assert [len(m.data) for m in whole] == [CHUNK_SIZE, CHUNK_SIZE, len(data) - 2 * CHUNK_SIZE]
        assert b"".join(m.data for m in whole) == data
        assert {m.size for m in whole} == {len(data)}
        rest = await env.download(digest(data), offset=CHUNK_SIZE + 5)
        assert rest[0].offset == CHUNK_SIZE + 5
        assert b"".join(m.data for m in rest) == data[CHUNK_SIZE + 5 :]


async def test_a_node_downloads_only_what_it_is_assigned(pki: Any, tmp_path: Path) -> None:
    """Not assigned, not itself, not stored: each refused with its reason, no bytes sent."""
    async with artifact_env(pki, tmp_path) as env:
        await env.push(b"mine", "a", "1")
        await env.push(b"theirs", "b", "1")
        env.grants.allow("n1", digest(b"mine"))
        env.grants.allow("n2", digest(b"theirs"))
        env.grants.allow("n1", digest(b"never pushed"))

        err = await rpc_error(env.download(digest(b"theirs")))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"node/n1 may not download {digest(b'theirs')}" in (err.details() or "")
        err = await rpc_error(env.download(digest(b"theirs"), speaking_for="n2"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "node/n1 may not speak for node n2" in (err.details() or "")
        err = await rpc_error(env.download(digest(b"never pushed")))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        err = await rpc_error(env.download("sha256:abc"))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.details() or "").startswith("digest: ")
        assert b"".join(m.data for m in await env.download(digest(b"mine"))) == b"mine"


async def test_without_assignments_no_node_may_download(pki: Any, tmp_path: Path) -> None:
    """With no definition using an artifact, no node may download it: PERMISSION_DENIED."""
    config = manager_config(pki, f"sqlite+aiosqlite:///{tmp_path / 'm.db'}", tmp_path / "state")
    async with running_manager(config) as manager:
        with sync_operator(pki, manager.port) as stub:
            await asyncio.to_thread(push, stub, b"data")
        async with node_stub(pki, "n1", manager.port) as node:
            request = manager_pb2.DownloadArtifactRequest(node_id="n1", digest=digest(b"data"))
            err = await rpc_error(node.DownloadArtifact(request).read())
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_referenced_artifact_cannot_be_deleted(pki: Any, tmp_path: Path) -> None:
    """DeleteArtifact is FAILED_PRECONDITION naming the definitions; show lists them."""
    async with artifact_env(pki, tmp_path) as env:
        await env.push(b"used", "web", "2")
        env.uses.uses["web", "2"] = ["web@7"]
        err = await rpc_error(
            env.stub.DeleteArtifact(
                fleet_pb2.FleetServiceDeleteArtifactRequest(name="web", version="2")
            )
        )
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "artifact web 2 is used by web@7" in (err.details() or "")
        shown = await env.stub.GetArtifact(
            fleet_pb2.FleetServiceGetArtifactRequest(name="web", version="2")
        )
        assert list(shown.artifact.referenced_by) == ["web@7"]


@pytest.mark.parametrize(("role", "name"), [("node", "n1"), ("manager", "m2")])
async def test_only_operators_push(pki: Any, tmp_path: Path, role: str, name: str) -> None:
    """A node or manager certificate cannot push: PERMISSION_DENIED naming it, nothing stored."""
    async with artifact_env(pki, tmp_path) as env:
        with sync_operator(pki, env.manager.port, role=role, name=name) as stub:
            err = await refused(asyncio.to_thread(push, stub, b"sneaky"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"{role}/{name}" in (err.details() or "")
        assert await env.rows() == 0
