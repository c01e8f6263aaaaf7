"""The JSON/HTTP wire contract FleetService is served with (docs/http-api.md).

Shared by the manager's HTTP API and `fleetctl ui`, which serves the same
routes to the console over the operator's own gRPC connection: the console
speaks one dialect wherever it is served from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc

from fleet.errors import InvalidArgument

__all__ = [
    "HTTP_STATUS",
    "JSON",
    "NDJSON",
    "PATH_PREFIX",
    "TIMEOUT_HEADER",
    "error_body",
    "timeout_seconds",
]

PATH_PREFIX = "/v1"
"""Every route is ``PATH_PREFIX + "/" + <package.Service>/<Method>``: gRPC's own method path."""
JSON = "application/json"
NDJSON = "application/x-ndjson"
TIMEOUT_HEADER = "connect-timeout-ms"
"""The call's deadline in milliseconds (Connect's header), as a gRPC client's deadline."""

HTTP_STATUS: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    # 400 as grpc-gateway and Connect: 412 is for HTTP's own preconditions (If-Match).
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
"""gRPC status -> HTTP status, the mapping grpc-gateway and Connect use."""


def timeout_seconds(header: str | None) -> float | None:
    """The call's deadline from a TIMEOUT_HEADER value, in seconds (None: not given).

    InvalidArgument naming the header for anything but a whole number of milliseconds.
    """
    if header is None:
        return None
    if not header.isdigit() or len(header) > 10:
        raise InvalidArgument(
            f"{TIMEOUT_HEADER}: expected a whole number of milliseconds, got {header!r}"
        )
    return int(header) / 1000


def error_body(code: grpc.StatusCode, message: str, metadata: Iterable[Any] = ()) -> dict[str, Any]:
    """An error as the JSON body both servers send: ``{"code", "message", "metadata"}``.

    `metadata` is the call's trailing metadata (key, value pairs); its text entries
    (the `Resource` the error is about) are kept, gRPC's own and binary ones are not.
    """
    body: dict[str, Any] = {"code": code.name, "message": message}
    about = {
        str(k): v for k, v in metadata if isinstance(v, str) and not str(k).startswith("grpc-")
    }
    if about:
        body["metadata"] = about
    return body
