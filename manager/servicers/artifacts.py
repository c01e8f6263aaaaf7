"""The artifact RPCs: FleetService's push/list/get/delete and ManagerService's download.

Translation and identity only, mixed into the servicers: `ArtifactRpcs` into
`FleetServicer` (which provides the operator check `_operator`),
`ArtifactDownloads` into `ManagerServicer` (which provides the node check
`_identities`). The decisions are in `manager.service.artifacts`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

from grpc import aio

from fleet.errors import InvalidArgument
from fleet.v1 import desired_pb2, fleet_pb2, manager_pb2
from manager.service.artifacts import Artifacts, ArtifactView, Upload
from manager.servicers.identity import NodeIdentities

__all__ = ["ArtifactDownloads", "ArtifactRpcs", "artifact_message"]

_Context = aio.ServicerContext[Any, Any]
_PushRequest = fleet_pb2.FleetServicePushArtifactRequest


def artifact_message(view: ArtifactView) -> desired_pb2.Artifact:
    """A stored artifact as its message."""
    r = view.record
    return desired_pb2.Artifact(
        name=r.name,
        version=r.version,
        digest=r.digest,
        size_bytes=r.size,
        created_at=r.created_ms,
        actor=r.actor,
        referenced_by=view.referenced_by,
    )


async def _upload(stream: AsyncIterator[_PushRequest]) -> Upload:
    """The header: the stream's first message, which must carry `upload`."""
    first = await anext(stream, None)
    if first is None or first.WhichOneof("item") != "upload":
        raise InvalidArgument(
            "the first message must be the ArtifactUpload (name, version, digest, size_bytes)",
            field="upload",
        )
    u = first.upload
    return Upload(name=u.name, version=u.version, digest=u.digest, size=u.size_bytes)


async def _chunks(stream: AsyncIterator[_PushRequest]) -> AsyncIterator[bytes]:
    """The bytes of every following message, each of which must carry `chunk`."""
    async for message in stream:
        if message.WhichOneof("item") != "chunk":
            raise InvalidArgument(
                "only the first message carries the upload; every later one a chunk",
                field="chunk",
            )
        yield message.chunk


class ArtifactRpcs:
    """FleetService's artifact RPCs, for `operator/*` callers."""

    _artifacts: Artifacts
    """The service (set by FleetServicer)."""

    def _operator(self, context: _Context) -> str:
        raise NotImplementedError  # FleetServicer's: the caller must be an operator

    async def PushArtifact(
        self, request_iterator: AsyncIterable[_PushRequest], context: _Context
    ) -> fleet_pb2.FleetServicePushArtifactResponse:
        actor = self._operator(context)
        stream = aiter(request_iterator)
        upload = await _upload(stream)
        view, existed = await self._artifacts.push(upload, _chunks(stream), actor=actor)
        return fleet_pb2.FleetServicePushArtifactResponse(
            artifact=artifact_message(view), existed=existed
        )

    async def ListArtifacts(
        self, request: fleet_pb2.FleetServiceListArtifactsRequest, context: _Context
    ) -> fleet_pb2.FleetServiceListArtifactsResponse:
        self._operator(context)
        views = await self._artifacts.list_artifacts(request.name)
        return fleet_pb2.FleetServiceListArtifactsResponse(
            artifacts=[artifact_message(v) for v in views]
        )

    async def GetArtifact(
        self, request: fleet_pb2.FleetServiceGetArtifactRequest, context: _Context
    ) -> fleet_pb2.FleetServiceGetArtifactResponse:
        self._operator(context)
        view = await self._artifacts.get(request.name, request.version)
        return fleet_pb2.FleetServiceGetArtifactResponse(artifact=artifact_message(view))

    async def DeleteArtifact(
        self, request: fleet_pb2.FleetServiceDeleteArtifactRequest, context: _Context
    ) -> fleet_pb2.FleetServiceDeleteArtifactResponse:
        actor = self._operator(context)
        await self._artifacts.delete(request.name, request.version, actor=actor)
        return fleet_pb2.FleetServiceDeleteArtifactResponse()


class ArtifactDownloads:
    """ManagerService's DownloadArtifact, for `node/<id>` callers about themselves."""

    _artifacts: Artifacts
    """The service (set by ManagerServicer)."""
    _identities: NodeIdentities
    """The node check (set by ManagerServicer)."""

    async def DownloadArtifact(
        self, request: manager_pb2.DownloadArtifactRequest, context: _Context
    ) -> AsyncIterator[manager_pb2.DownloadArtifactResponse]:
        self._identities.require_node(context, request.node_id)
        pieces = self._artifacts.download(request.node_id, request.digest, request.offset)
        async with contextlib.aclosing(pieces):
            async for piece in pieces:
                yield manager_pb2.DownloadArtifactResponse(
                    data=piece.data, offset=piece.offset, size=piece.size
                )
