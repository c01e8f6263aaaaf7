"""What both ends of the control channel (`ManagerService.Connect`) share.

A command is a `DaemonService` call carried on the daemon's own stream: the
method's name, its serialized request in pieces of at most `PIECE_BYTES`,
and the result's messages in pieces too (`CommandResult`). The method table
comes from the generated descriptors, so a method added to `daemon.proto`
is carried without a change here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from google.protobuf import symbol_database
from google.protobuf.message import Message

from fleet.v1 import daemon_pb2

__all__ = [
    "METHODS",
    "PIECE_BYTES",
    "RETRY_AFTER",
    "RETRY_AFTER_MAX",
    "Method",
    "Reassembler",
    "pieces",
    "retry_after",
    "retry_after_metadata",
]

PIECE_BYTES: Final = 1024 * 1024
"""Largest piece of a request or response in one stream message (gRPC's
default message limit is 4 MiB; small pieces keep one big call from
holding the stream for long)."""


RETRY_AFTER: Final = "fleet-retry-after-ms"
"""Metadata key on a hello refused RESOURCE_EXHAUSTED: when to come back, in
milliseconds (the manager's `HelloPacer` queues the refused in time)."""


def retry_after_metadata(seconds: float) -> dict[str, str]:
    """The refusal's metadata saying "come back in `seconds`"."""
    return {RETRY_AFTER: str(max(0, round(seconds * 1000)))}


RETRY_AFTER_MAX: Final = 60.0
"""The longest wait a refusal's hint is followed for; past it, the client asks again."""


def retry_after(metadata: Mapping[str, str] | Iterable[Any] | None) -> float | None:
    """Seconds to come back after (at most `RETRY_AFTER_MAX`), from a refusal's
    (trailing) metadata; None if it says nothing usable."""
    if metadata is None:
        return None
    items: list[Any] = list(metadata.items() if isinstance(metadata, Mapping) else metadata)
    for key, value in items:
        if key == RETRY_AFTER:
            try:
                ms = int(value)
            except (TypeError, ValueError):
                return None
            return min(ms / 1000, RETRY_AFTER_MAX) if ms >= 0 else None
    return None


@dataclass(frozen=True)
class Method:
    """One DaemonService method as the control channel carries it."""

    name: str
    request: type[Message]
    response: type[Message]
    server_streaming: bool


def _methods() -> dict[str, Method]:
    service = daemon_pb2.DESCRIPTOR.services_by_name["DaemonService"]
    db = symbol_database.Default()
    out: dict[str, Method] = {}
    for m in service.methods:
        if m.client_streaming:  # none today; the channel carries one request per call
            continue
        out[m.name] = Method(
            name=m.name,
            request=db.GetSymbol(m.input_type.full_name),
            response=db.GetSymbol(m.output_type.full_name),
            server_streaming=m.server_streaming,
        )
    return out


METHODS: Final[dict[str, Method]] = _methods()
"""DaemonService methods by name."""


def pieces(data: bytes, size: int = PIECE_BYTES) -> Iterator[tuple[bytes, bool]]:
    """`data` in pieces of at most `size` bytes, each with "more follow"; an
    empty message is one empty piece."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if not data:
        yield b"", False
        return
    view = memoryview(data)
    for start in range(0, len(data), size):
        end = start + size
        yield bytes(view[start:end]), end < len(data)


class Reassembler:
    """Joins the pieces of one message, refusing more than `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, piece: bytes, more: bool) -> bytes | None:
        """Add a piece; the whole message once the last piece is in, else None.

        ValueError when the message would exceed the limit (the caller
        refuses it; nothing of it is kept).
        """
        self._size += len(piece)
        if self._size > self._limit:
            self._parts.clear()
            self._size = 0
            raise ValueError(f"message larger than {self._limit} bytes")
        self._parts.append(piece)
        if more:
            return None
        whole = b"".join(self._parts)
        self._parts.clear()
        self._size = 0
        return whole
