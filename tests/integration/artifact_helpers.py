"""Helpers for artifact tests: the desired-state policies a test injects, pushes, archives.

The manager's artifact rules "a node downloads only the artifacts of the
definitions assigned to it" and "a referenced artifact cannot be deleted"
are injected policies (`manager.service.artifacts`); `Grants` and `Uses`
are what a test injects to say which node is assigned what and which
definitions use what.

Pushes go through grpc's synchronous client (`sync_operator`), as fleetctl's
do: the asyncio client reports INTERNAL instead of the server's status when
the server ends a client stream it is still writing (grpc/grpc#36066), which
is what every early refusal of a push does.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from fleet.artifacts import CHUNK_SIZE
from fleet.tls import channel_credentials, channel_options
from fleet.v1 import desired_pb2, fleet_pb2, fleet_pb2_grpc

__all__ = [
    "Grants",
    "Uses",
    "digest",
    "push",
    "push_requests",
    "sync_operator",
    "tar_bytes",
    "zip_bytes",
]


def digest(data: bytes) -> str:
    """``sha256:<hex>`` of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Grants:
    """An `ArtifactAccess` for tests: node -> the digests it is assigned (mutable)."""

    def __init__(self, grants: dict[str, Iterable[str]] | None = None) -> None:
        self.grants = {node: set(ds) for node, ds in (grants or {}).items()}

    def allow(self, node_id: str, digest: str) -> None:
        """Let `node_id` download `digest` from now on."""
        self.grants.setdefault(node_id, set()).add(digest)

    async def may_download(self, node_id: str, digest: str) -> bool:
        return digest in self.grants.get(node_id, set())


class Uses:
    """An `ArtifactReferences` for tests: (name, version) -> definitions using it."""

    def __init__(self, uses: dict[tuple[str, str], list[str]] | None = None) -> None:
        self.uses = dict(uses or {})

    async def references(self, name: str, version: str) -> list[str]:
        return self.uses.get((name, version), [])


def push_requests(
    data: bytes,
    name: str = "web",
    version: str = "1.0",
    *,
    declared: str | None = None,
    chunk: int = CHUNK_SIZE,
) -> Iterator[fleet_pb2.FleetServicePushArtifactRequest]:
    """The PushArtifact stream for `data`: the upload, then its chunks."""
    upload = desired_pb2.ArtifactUpload(
        name=name, version=version, digest=declared or digest(data), size_bytes=len(data)
    )
    yield fleet_pb2.FleetServicePushArtifactRequest(upload=upload)
    for start in range(0, len(data), chunk):
        yield fleet_pb2.FleetServicePushArtifactRequest(chunk=data[start : start + chunk])


@contextmanager
def sync_operator(
    pki: Any, port: int, *, role: str = "operator", name: str = "alice"
) -> Iterator[fleet_pb2_grpc.FleetServiceStub]:
    """A synchronous FleetService stub speaking as <role>/<name> over mTLS."""
    tls = pki.issue(role, name)
    channel = grpc.secure_channel(
        f"127.0.0.1:{port}",
        channel_credentials(tls),
        options=channel_options(f"manager.{pki.trust_domain}"),
    )
    try:
        yield fleet_pb2_grpc.FleetServiceStub(channel)
    finally:
        channel.close()


def push(
    stub: fleet_pb2_grpc.FleetServiceStub, data: bytes, name: str = "web", version: str = "1.0"
) -> fleet_pb2.FleetServicePushArtifactResponse:
    """Push `data` as `name` `version` with a `sync_operator` stub (blocks: use a thread)."""
    reply: fleet_pb2.FleetServicePushArtifactResponse = stub.PushArtifact(
        push_requests(data, name, version), timeout=60
    )
    return reply


def tar_bytes(files: dict[str, bytes], *, mode: str = "w:gz") -> bytes:
    """A tar archive (gzip-compressed by default) of regular files."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tar:  # type: ignore[call-overload]
        for path, content in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(content)
            info.mode = 0o755 if path.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    """A zip archive of regular files."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for path, content in files.items():
            z.writestr(path, content)
    return out.getvalue()
