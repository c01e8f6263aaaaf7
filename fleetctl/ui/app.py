"""The console's local web server: its files, and FleetService over the operator's connection.

`fleetctl ui` serves this on 127.0.0.1. The browser never holds a fleet
credential: each API call is made here, over the operator's own mTLS gRPC
channel, so the manager authorizes and audits it as that operator. Between
that channel and anyone else -- another local user, or a web page open in
the same browser -- stand:

- the one-time secret in the printed URL, exchanged at ``/login`` for a
  session cookie (HttpOnly, SameSite=Strict; named after the port, since
  cookies ignore ports and two consoles must not clobber each other);
- the Host header, which must name this server: a DNS-rebinding page's
  requests carry its own name;
- the Origin header, which every POST must carry and which must be this
  server's (SameSite already keeps the cookie off cross-site requests; this
  is the second lock);
- a Content-Security-Policy allowing scripts, styles and connections to
  this server only: no inline script, no eval, no framing. Fleet data is
  rendered as text by the console's templates, never as HTML.

The API is the manager's HTTP API (`fleet.httpwire`, docs/http-api.md):
``POST /v1/fleet.v1.FleetService/<Method>``, proto3 JSON in and out,
newline-delimited ``{"result": ...}`` lines for server streams.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Message as AsgiMessage
from starlette.types import Receive, Scope, Send

from fleet.errors import FleetError
from fleet.httpwire import (
    HTTP_STATUS,
    JSON,
    NDJSON,
    PATH_PREFIX,
    TIMEOUT_HEADER,
    error_body,
    timeout_seconds,
)
from fleet.protojson import encode, encode_message, message_to_dict, parse_request
from fleet.v1 import fleet_pb2
from fleetctl.client import Connection, explain_rpc_error

__all__ = ["CSP", "ConsoleApp", "Sessions", "static_dir"]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none';"
    " frame-ancestors 'none'"
)
"""Everything from this server, nothing inline, nothing evaluated, never framed."""

_SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    # The login URL holds the secret: never send it on as a Referer.
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]

MAX_BODY_BYTES = 4 * 1024 * 1024
"""Largest API request the console forwards (the manager's own gRPC limit is the real one)."""
FIRST_WAIT = 0.5
"""As the manager's HTTP API: a stream's first message or error within this decides the status."""
# Codes whose gRPC details say little to a person; fleetctl's own wording says what to check.
_EXPLAINED = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
}


def static_dir() -> Path:
    """Where the console's files are (package data of fleetctl.ui)."""
    return Path(str(resources.files("fleetctl.ui") / "static"))


@dataclass
class Sessions:
    """The one-time login secret and the browser sessions it was exchanged for."""

    secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    used: bool = False
    _tokens: set[str] = field(default_factory=set)

    def login(self, offered: str) -> str | None:
        """A new session token for the right, unused secret; None otherwise."""
        if self.used or not hmac.compare_digest(offered.encode(), self.secret.encode()):
            return None
        self.used = True
        token = secrets.token_urlsafe(32)
        self._tokens.add(token)
        return token

    def valid(self, token: str | None) -> bool:
        """Whether `token` is one this server handed out."""
        return token is not None and any(
            hmac.compare_digest(token.encode(), known.encode()) for known in self._tokens
        )


@dataclass(frozen=True)
class _Method:
    name: str
    request_type: type[Message]
    server_streaming: bool
    call: Callable[..., Any]
    """The stub's multicallable for this RPC."""


class ConsoleApp:
    """The ASGI application `fleetctl ui` serves.

    `stub` is a FleetService stub on the operator's channel; `allowed_hosts`
    the host:port values browsers may address this server by.
    """

    def __init__(
        self,
        stub: Any,
        conn: Connection,
        *,
        port: int,
        allowed_hosts: Iterable[str],
        sessions: Sessions | None = None,
        static: Path | None = None,
    ) -> None:
        self.sessions = sessions or Sessions()
        self.stopping = asyncio.Event()
        """Set before the server stops: open streams end, so shutdown need not cancel them."""
        self.cookie = f"fleet_console_{port}"
        self._conn = conn
        self._hosts = frozenset(h.lower() for h in allowed_hosts)
        self._static = static or static_dir()
        self.methods = _methods(stub)
        routes = [
            Route("/login", self._login, methods=["GET"]),
            Route("/", self._index, methods=["GET"]),
            Route("/console/session", self._session, methods=["GET"]),
            Mount("/static", StaticFiles(directory=self._static), name="static"),
            *(
                Route(PATH_PREFIX + path, self._endpoint(m), methods=["POST"])
                for path, m in self.methods.items()
            ),
        ]
        self._app = Starlette(routes=routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # no websockets; lifespan is off
            return
        headers = Headers(scope=scope)

        async def send_secured(message: AsgiMessage) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_SECURITY_HEADERS]
            await send(message)

        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await refusal(scope, receive, send_secured)
            return
        await self._app(scope, receive, send_secured)

    def _refusal(self, scope: Scope, headers: Headers) -> Response | None:
        """A 403 response if the request may not go on, else None."""
        host = headers.get("host", "").lower()
        if host not in self._hosts:
            return _forbidden(
                f"this console answers only to {', '.join(sorted(self._hosts))};"
                f" the request named {host or 'no host'!r}"
            )
        if scope["path"] == "/login":
            return None
        cookies = Request(scope).cookies
        if not self.sessions.valid(cookies.get(self.cookie)):
            return _forbidden(
                "this console opens with the link `fleetctl ui` printed, once per run;"
                " run `fleetctl ui` again for a new link"
            )
        if scope["method"] not in ("GET", "HEAD"):
            origin = headers.get("origin")
            if origin != f"http://{host}":
                return _forbidden(
                    f"cross-origin request refused (Origin {origin or 'missing'!r});"
                    " the console's API takes requests from its own pages only"
                )
        return None

    async def _login(self, request: Request) -> Response:
        token = self.sessions.login(request.query_params.get("secret", ""))
        if token is None:
            return _forbidden(
                "this link is not valid or was already used: each link `fleetctl ui`"
                " prints opens the console once; run `fleetctl ui` again for a new one"
            )
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(self.cookie, token, httponly=True, samesite="strict", path="/")
        response.headers["cache-control"] = "no-store"
        return response

    async def _index(self, _: Request) -> Response:
        return FileResponse(self._static / "index.html", headers={"cache-control": "no-store"})

    async def _session(self, _: Request) -> Response:
        body = {"operator": self._conn.identity, "manager": self._conn.address}
        return JSONResponse(body, headers={"cache-control": "no-store"})

    def _endpoint(self, method: _Method) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                message = parse_request(await _body(request), method.request_type)
                timeout = timeout_seconds(request.headers.get(TIMEOUT_HEADER))
                if timeout is None and not method.server_streaming:
                    timeout = self._conn.timeout
            except _Refused as refused:
                return refused.response
            except FleetError as exc:
                return _error(exc.code, exc.message)
            except ClientDisconnect:
                return Response(status_code=499)
            if method.server_streaming:
                return await self._stream(method, message, timeout)
            try:
                answer = await method.call(message, timeout=timeout)
            except grpc.RpcError as exc:
                return self._rpc_error(exc)
            return Response(encode_message(answer), media_type=JSON)

        return endpoint

    async def _stream(self, method: _Method, message: Message, deadline: float | None) -> Response:
        call = method.call(message, timeout=deadline)
        messages = call.__aiter__()
        first = asyncio.ensure_future(anext(messages))
        await asyncio.wait({first}, timeout=FIRST_WAIT)
        if first.done():
            try:
                first.result()
            except StopAsyncIteration:
                return Response(b"", media_type=NDJSON)
            except grpc.RpcError as exc:
                return self._rpc_error(exc)
        return StreamingResponse(
            self._lines(call, messages, first),
            media_type=NDJSON,
            headers={"cache-control": "no-store"},
        )

    async def _lines(
        self, call: Any, messages: AsyncIterator[Any], first: asyncio.Future[Any]
    ) -> AsyncIterator[bytes]:
        stop = asyncio.ensure_future(self.stopping.wait())
        step = first
        try:
            while True:
                await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():  # fleetctl ui is stopping: end the stream cleanly
                    break
                try:
                    item = step.result()
                except StopAsyncIteration:
                    break
                except grpc.RpcError as exc:
                    yield encode({"error": self._error_body(exc)}) + b"\n"
                    break
                yield encode({"result": message_to_dict(item)}) + b"\n"
                step = asyncio.ensure_future(anext(messages))
        finally:
            # The browser went away, the stream ended or we stop: end the gRPC call too.
            stop.cancel()
            step.cancel()
            call.cancel()

    def _error_body(self, exc: grpc.RpcError) -> dict[str, Any]:
        code: grpc.StatusCode = exc.code()
        if code in _EXPLAINED:
            message = explain_rpc_error(exc, self._conn, diagnose=False)
        else:
            message = exc.details() or code.name
        return error_body(code, message, exc.trailing_metadata() or ())

    def _rpc_error(self, exc: grpc.RpcError) -> Response:
        body = self._error_body(exc)
        return Response(encode(body), status_code=HTTP_STATUS.get(exc.code(), 500), media_type=JSON)


class _Refused(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__()
        self.response = response


def _methods(stub: Any) -> dict[str, _Method]:
    """FleetService's RPCs the console can call, by gRPC path (client streams are not)."""
    service = fleet_pb2.DESCRIPTOR.services_by_name["FleetService"]
    return {
        f"/{service.full_name}/{m.name}": _Method(
            name=m.name,
            request_type=GetMessageClass(m.input_type),
            server_streaming=m.server_streaming,
            call=getattr(stub, m.name),
        )
        for m in service.methods
        if not m.client_streaming
    }


async def _body(request: Request) -> bytes:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != JSON:
        raise _Refused(_error(grpc.StatusCode.INVALID_ARGUMENT, f"Content-Type must be {JSON}"))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _Refused(
                _error(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the request body is larger than {MAX_BODY_BYTES} bytes",
                    status=413,
                )
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _error(code: grpc.StatusCode, message: str, *, status: int | None = None) -> Response:
    return Response(
        encode(error_body(code, message)),
        status_code=status or HTTP_STATUS.get(code, 500),
        media_type=JSON,
    )


def _forbidden(reason: str) -> Response:
    """403 with `reason` as plain text (a browser shows it as is; curl prints it)."""
    return Response(
        f"fleetctl ui: {reason}\n",
        status_code=403,
        media_type="text/plain; charset=utf-8",
        headers={"cache-control": "no-store"},
    )
