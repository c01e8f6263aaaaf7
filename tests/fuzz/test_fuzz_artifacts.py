"""Fuzz whole PushArtifact streams and DownloadArtifact offsets against a live manager.

The generic fuzzers send PushArtifact a stream of one message; here a stream
is a header (valid or not, true or lying about the bytes) followed by the
data cut at random points, with stray messages mixed in. Properties: never
UNKNOWN/INTERNAL; OK exactly when the stream is a valid header followed by
bytes of exactly the declared size and digest, and then the artifact serves
back those bytes; anything else stores nothing. DownloadArtifact answers any
offset with the bytes from there or INVALID_ARGUMENT. Streams are pushed with
grpc's synchronous client, as fleetctl does (the asyncio client can report
INTERNAL when the server refuses a stream early: grpc/grpc#36066).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio
from artifact_helpers import Grants, digest, sync_operator
from fuzz_support import FUZZ, NEVER, db_state
from grpc import aio
from hypothesis import event, given, settings
from hypothesis import strategies as st
from live_env import ModulePki, channels, live_manager, manager_name
from proto_strategies import mostly

from fleet.v1 import desired_pb2, fleet_pb2, fleet_pb2_grpc, manager_pb2, manager_pb2_grpc
from manager.server import ManagerServer

Request = fleet_pb2.FleetServicePushArtifactRequest
NODE = "n1"
STORED = bytes(range(256)) * 9
"""Stored once, downloaded at fuzzed offsets."""
_versions = itertools.count(1)


@dataclass
class Env:
    """The manager, an operator's stub and node n1's (assigned every digest it asks for)."""

    manager: ManagerServer
    operator: fleet_pb2_grpc.FleetServiceStub
    """Synchronous: pushes run in a thread."""
    node: manager_pb2_grpc.ManagerServiceStub


class AnyDigest(Grants):
    """Node n1 is assigned every artifact: the fuzzer gets past the access check."""

    async def may_download(self, node_id: str, digest: str) -> bool:
        return node_id == NODE


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(
    module_pki: ModulePki, tmp_path_factory: pytest.TempPathFactory, manager_database: str
) -> AsyncIterator[Env]:
    """One manager per module and backend, with STORED pushed."""
    root = tmp_path_factory.mktemp("manager")
    async with (
        live_manager(module_pki, root, manager_database, artifact_access=AnyDigest()) as manager,
        channels(
            manager.port, {NODE: module_pki.issue("node", NODE)}, manager_name(module_pki)
        ) as chans,
    ):
        with sync_operator(module_pki, manager.port, name="fuzz") as operator:
            stream = [Request(upload=_upload("stored", "1", STORED)), Request(chunk=STORED)]
            await asyncio.to_thread(operator.PushArtifact, iter(stream), timeout=30)
            yield Env(manager, operator, manager_pb2_grpc.ManagerServiceStub(chans[NODE]))


def _upload(name: str, version: str, data: bytes) -> desired_pb2.ArtifactUpload:
    return desired_pb2.ArtifactUpload(
        name=name, version=version, digest=digest(data), size_bytes=len(data)
    )


@st.composite
def push_streams(draw: st.DrawFn) -> tuple[list[Request], bytes | None]:
    """(a PushArtifact stream, the bytes it stores if it is valid, else None)."""
    data = draw(st.binary(max_size=3000), label="data")
    name = draw(mostly("web", st.sampled_from(["a-b.c_d", "", "-bad", "x" * 64, "é"])))
    version = draw(mostly("v", st.sampled_from(["", ".1", "v" * 129])))
    version = f"{next(_versions)}+{version}" if version == "v" else version
    header = _upload(name, version, data)
    valid = name in ("web", "a-b.c_d") and version not in ("", ".1", "v" * 129)
    lie = draw(mostly("none", st.sampled_from(["digest", "size", "bad digest", "negative size"])))
    if lie == "digest":
        header.digest = digest(data + b"!")
    elif lie == "size":
        header.size_bytes += draw(st.sampled_from([-1, 1, 2**40]))
    elif lie == "bad digest":
        header.digest = draw(st.sampled_from(["", "sha256:", "md5:abc", header.digest.upper()]))
    elif lie == "negative size":
        header.size_bytes = -1
    valid = valid and lie == "none"
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=5)))
    bounds = [0, *cuts, len(data)]
    stream = [Request(upload=header)]
    stream += [Request(chunk=data[a:b]) for a, b in itertools.pairwise(bounds)]
    stray = draw(mostly("none", st.sampled_from(["upload again", "empty message", "header last"])))
    if stray == "upload again":
        stream.insert(draw(st.integers(1, len(stream))), Request(upload=header))
    elif stray == "empty message":
        stream.insert(draw(st.integers(0, len(stream))), Request())
    elif stray == "header last" and len(stream) > 1:
        stream.append(stream.pop(0))
    valid = valid and stray == "none"
    event(f"valid={valid}")
    return stream, data if valid else None


@pytest.mark.asyncio(loop_scope="module")
@FUZZ
@given(case=push_streams())
async def test_fuzz_push_streams(env: Env, case: tuple[list[Request], bytes | None]) -> None:
    """OK exactly for a true header and its bytes (then served back); else nothing stored."""
    stream, stored = case
    before = await db_state(env.manager.db)
    refused: grpc.RpcError | None = None
    try:
        reply = await asyncio.to_thread(env.operator.PushArtifact, iter(stream), timeout=30)
    except grpc.RpcError as exc:
        refused = exc
    if refused is not None:
        event(refused.code().name)
        assert refused.code() not in NEVER, f"{refused.code().name}: {refused.details()}"
        assert stored is None, f"a valid stream was refused: {refused.details()}"
        assert await db_state(env.manager.db) == before
        return
    assert stored is not None, f"an invalid stream was stored: {stream!r}"
    request = manager_pb2.DownloadArtifactRequest(node_id=NODE, digest=reply.artifact.digest)
    served = [m.data async for m in env.node.DownloadArtifact(request, timeout=30)]
    assert b"".join(served) == stored


@pytest.mark.asyncio(loop_scope="module")
@settings(FUZZ, max_examples=max(10, FUZZ.max_examples // 3))
@given(offset=st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-2, len(STORED) + 2)))
async def test_fuzz_download_offsets(env: Env, offset: int) -> None:
    """Any offset: the bytes from there (one empty piece at the end), or INVALID_ARGUMENT."""
    request = manager_pb2.DownloadArtifactRequest(
        node_id=NODE, digest=digest(STORED), offset=offset
    )
    refused: aio.AioRpcError | None = None
    try:
        served = [m async for m in env.node.DownloadArtifact(request, timeout=30)]
    except aio.AioRpcError as exc:
        refused = exc
    if refused is not None:
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.details()
        assert not 0 <= offset <= len(STORED)
        return
    assert 0 <= offset <= len(STORED)
    assert served[0].offset == offset
    assert b"".join(m.data for m in served) == STORED[offset:]
