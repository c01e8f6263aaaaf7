"""What an artifact is, for every tier: its reference, names, digests and chunking.

An artifact is a file or archive an operator pushes to the manager
(`fleetctl artifacts push`), stored content-addressed by SHA-256 and
referenced from a definition by name and version (or digest). The manager
checks the same names and digests as fleetctl does before uploading, and
daemons check the digest of what they download, so the rules live here:

- name: a label value (1..63 of ``[-_.A-Za-z0-9]``, alphanumeric at both
  ends), so it is also a safe file name on the node;
- version: 1..128 of ``[-_.+A-Za-z0-9]`` starting alphanumeric ("1.4.2",
  "2024-05-01", "1.0.0+build.7");
- digest: ``sha256:`` and 64 lowercase hex digits.

Bytes travel in chunks of at most `CHUNK_SIZE` both ways (PushArtifact,
DownloadArtifact), far below gRPC's 4 MiB message limit.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fleet.errors import InvalidArgument
from fleet.labels import is_valid_label_value
from fleet.v1 import common_pb2

__all__ = [
    "CHUNK_SIZE",
    "DIGEST_PREFIX",
    "PLACEHOLDER",
    "ArtifactRef",
    "digest_hex",
    "file_digest",
    "format_size",
    "validate_digest",
    "validate_name",
    "validate_version",
]

CHUNK_SIZE: Final = 1024 * 1024
"""Most bytes in one PushArtifact or DownloadArtifact message (1 MiB)."""
DIGEST_PREFIX: Final = "sha256:"
"""Every digest starts with this (the only algorithm Fleet uses)."""
PLACEHOLDER: Final = "{artifact}"
"""In a spec's argv, cwd and env values: the artifact's path on the node."""
MAX_VERSION_LENGTH: Final = 128
"""Longest artifact version."""

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_VERSION = re.compile(r"[A-Za-z0-9][-_.+A-Za-z0-9]*")


def validate_name(name: str, *, field: str = "name") -> str:
    """`name` if it is a valid artifact name, else InvalidArgument naming `field`."""
    if not is_valid_label_value(name) or not name:
        raise InvalidArgument(
            f"artifact name {name[:80]!r} must be 1..63 characters of [-_.A-Za-z0-9] that start"
            " and end alphanumeric",
            field=field,
        )
    return name


def validate_version(version: str, *, field: str = "version") -> str:
    """`version` if it is a valid artifact version, else InvalidArgument naming `field`."""
    if len(version) > MAX_VERSION_LENGTH or not _VERSION.fullmatch(version):
        raise InvalidArgument(
            f"artifact version {version[:80]!r} must be 1..{MAX_VERSION_LENGTH} characters of"
            " [-_.+A-Za-z0-9] that start alphanumeric (e.g. 1.4.2)",
            field=field,
        )
    return version


def validate_digest(digest: str, *, field: str = "digest") -> str:
    """`digest` if it is ``sha256:<64 lowercase hex>``, else InvalidArgument naming `field`."""
    if not _DIGEST.fullmatch(digest):
        raise InvalidArgument(
            f"{digest[:80]!r} is not a digest; expected sha256: and 64 lowercase hex digits",
            field=field,
        )
    return digest


def digest_hex(digest: str) -> str:
    """The 64 hex digits of a valid digest (a safe file name)."""
    return validate_digest(digest).removeprefix(DIGEST_PREFIX)


def file_digest(
    path: Path, *, progress: Callable[[int], None] | None = None, chunk: int = CHUNK_SIZE
) -> str:
    """The ``sha256:...`` digest of a file, read in chunks (`progress` gets bytes read so far)."""
    h = hashlib.sha256()
    done = 0
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
            done += len(block)
            if progress is not None:
                progress(done)
    return DIGEST_PREFIX + h.hexdigest()


def format_size(size: int) -> str:
    """Bytes for people: "512 B", "3.1 MiB", "1.0 GiB"."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


@dataclass(frozen=True)
class ArtifactRef:
    """An artifact as a pushed spec names it (the manager fills in every field)."""

    name: str
    """The artifact's name ("web")."""
    version: str
    """Its version ("1.4.2")."""
    digest: str
    """``sha256:<hex>`` of its bytes: what the daemon downloads and verifies."""
    size_bytes: int
    """Its size, as the manager stored it."""

    @classmethod
    def from_proto(cls, msg: common_pb2.ArtifactRef) -> ArtifactRef:
        """The ref of an `ArtifactRef` message (not validated: `check` does)."""
        return cls(name=msg.name, version=msg.version, digest=msg.digest, size_bytes=msg.size_bytes)

    def to_proto(self) -> common_pb2.ArtifactRef:
        """The message form."""
        return common_pb2.ArtifactRef(
            name=self.name, version=self.version, digest=self.digest, size_bytes=self.size_bytes
        )

    def check(self, *, field: str = "artifact") -> None:
        """InvalidArgument naming the field unless the ref can be fetched and verified."""
        validate_digest(self.digest, field=f"{field}.digest")
        if self.size_bytes < 0:
            raise InvalidArgument(
                f"must be >= 0, got {self.size_bytes}", field=f"{field}.size_bytes"
            )

    @property
    def label(self) -> str:
        """How messages name it: "web 1.4.2", or its digest when it has no name."""
        if self.name and self.version:
            return f"{self.name} {self.version}"
        return self.name or self.digest
