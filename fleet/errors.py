"""Fleet's error tree, and its one mapping to gRPC status codes.

Domain code raises these; a server interceptor (`fleet.interceptors`) turns
them into a status code exactly once, and `from_rpc_error` turns a
`grpc.RpcError` back into one of them on the client side::

    FleetError
    ├── InvalidArgument      INVALID_ARGUMENT    the request is wrong; fix it, do not retry
    ├── NotFound             NOT_FOUND           no such node/agent; register or check the name
    ├── AlreadyExists        ALREADY_EXISTS      it exists; use the existing one
    ├── FailedPrecondition   FAILED_PRECONDITION not in a state that allows it (stale version, ...)
    ├── Aborted              ABORTED             lost a race; re-read and retry
    ├── PermissionDenied     PERMISSION_DENIED   the caller's identity may not do this
    ├── Unauthenticated      UNAUTHENTICATED     no usable identity was presented
    ├── ResourceExhausted    RESOURCE_EXHAUSTED  back-pressure; retry later with backoff
    ├── Unavailable          UNAVAILABLE         a peer or the database cannot be reached; retry
    ├── DeadlineExceeded     DEADLINE_EXCEEDED   it took too long; it may or may not have happened
    ├── Internal             INTERNAL            a bug in Fleet; report it
    └── ConfigError          (start-up only)     a config file or certificate is unusable

Messages say what was wrong and what to do ("node-7 presented a certificate
for node-3"), because they end up in an operator's terminal. They name no
client's commands: an error may carry the `Resource` it is about (the node
or agent that does not exist), sent as trailing metadata next to the status
(``fleet-resource-kind``, ``-name``, ``-node``), so each client can add its
own pointer ("see `fleetctl nodes list`") instead of the server guessing it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import grpc

__all__ = [
    "Aborted",
    "AlreadyExists",
    "ConfigError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FileSettingError",
    "FleetError",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Resource",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]


_PREFIX = "fleet-resource-"
_MAX_VALUE = 253
"""Longest id a Resource sends (a DNS name's limit); a longer one is no valid id anyway and
could push the trailers past the client's metadata limit (RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True)
class Resource:
    """What an error is about, for a client to point its user at (a NotFound's node)."""

    kind: str
    """"node", "agent" or "metric-type"."""
    name: str
    """Its id: the node id, the agent id, the metric type."""
    node: str = ""
    """The node an agent or metric type belongs to ("" for a node)."""

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """As gRPC trailing metadata; nothing if a value is not a plausible id (an invalid one
        the request carried: too long or not printable ASCII)."""
        items = (("kind", self.kind), ("name", self.name), ("node", self.node))
        pairs = tuple((_PREFIX + k, v) for k, v in items if v)
        if not all(len(v) <= _MAX_VALUE and v.isascii() and v.isprintable() for _, v in pairs):
            return ()
        return pairs

    @classmethod
    def from_metadata(cls, metadata: Iterable[tuple[str, Any]] | None) -> Resource | None:
        """The Resource `metadata` describes, or None."""
        found = {
            str(k).removeprefix(_PREFIX): str(v)
            for k, v in metadata or ()
            if str(k).startswith(_PREFIX)
        }
        if not found.get("kind") or not found.get("name"):
            return None
        return cls(found["kind"], found["name"], found.get("node", ""))


class FleetError(Exception):
    """Base of every error Fleet raises on purpose.

    Catch this to handle any Fleet failure; catch a subclass to handle one
    kind. `code` is the gRPC status the error maps to; `resource` (optional)
    says what the error is about.
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, resource: Resource | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.resource = resource


class InvalidArgument(FleetError):
    """The request is malformed; `field` names the offending field, if one.

    Retrying the same request fails the same way: fix the input.
    """

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(
        self, message: str, *, field: str | None = None, resource: Resource | None = None
    ) -> None:
        super().__init__(f"{field}: {message}" if field else message, resource=resource)
        self.field = field


class NotFound(FleetError):
    """The named node, agent or object does not exist (or no longer does)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(FleetError):
    """The object to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(FleetError):
    """The target is not in a state that allows the request (e.g. a stale
    update version). Re-read the state before deciding to retry."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(FleetError):
    """A concurrent change won; re-read and retry the whole operation."""

    code = grpc.StatusCode.ABORTED


class PermissionDenied(FleetError):
    """The caller is authenticated but its identity may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(FleetError):
    """The caller presented no usable identity (no or unparseable certificate)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(FleetError):
    """Back-pressure: a queue or limit is full. Retry later with backoff;
    nothing of the refused request was applied."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(FleetError):
    """A peer or the database cannot be reached right now. Safe to retry
    idempotent requests with backoff."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(FleetError):
    """The call ran out of time; whether it took effect is unknown."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(FleetError):
    """A bug in Fleet. Never used for anything a client did wrong."""

    code = grpc.StatusCode.INTERNAL


class ConfigError(FleetError):
    """A config file, key or certificate is unusable; raised at start-up.

    The message is one line naming the file, the key and what is wrong, and
    is printed as-is before the process exits non-zero.
    """

    code = grpc.StatusCode.FAILED_PRECONDITION


class FileSettingError(ConfigError):
    """A ConfigError about the file a config key names (a TLS certificate, say).

    `field` is that key's name in its table, `path` the file, `problem` what
    is wrong with it; the config loader says it of the key and where it was
    set ("daemon.toml: tls.cert_file: /etc/fleet/node.pem: no such file").
    """

    def __init__(self, message: str, *, field: str, path: Path, problem: str) -> None:
        super().__init__(message)
        self.field = field
        self.path = path
        self.problem = problem

    def in_setting(self, setting: str) -> ConfigError:
        """The same problem said of `setting`, where the file came from."""
        return ConfigError(f"{setting}: {self.path}: {self.problem}")


_BY_CODE: dict[grpc.StatusCode, type[FleetError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Internal,
    )
}


def from_rpc_error(error: grpc.RpcError, *, target: str = "") -> FleetError:
    """Translate a client-side `grpc.RpcError` into the matching FleetError.

    `target` (an address or node id) is prefixed to the message so a fan-out
    error says which peer failed. The server's `Resource`, if it sent one, is
    kept.
    """
    code: grpc.StatusCode = error.code()
    details: str = error.details() or code.name
    message = f"{target}: {details}" if target else details
    trailing = getattr(error, "trailing_metadata", None)
    resource = Resource.from_metadata(trailing() if callable(trailing) else None)
    cls = _BY_CODE.get(code)
    if cls is None:
        err = FleetError(message, resource=resource)
        err.code = code  # type: ignore[misc]  # keep the unmapped code for callers
        return err
    return cls(message, resource=resource)
