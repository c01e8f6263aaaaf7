"""FleetService as JSON over HTTP: one route per RPC, generated from the service descriptor.

``POST /v1/fleet.v1.FleetService/<Method>`` with the request message as
proto3 JSON runs the very servicer object the gRPC server serves, behind
the same `ErrorMappingInterceptor`, with an `HttpContext` standing in for
grpc's. Unary answers are the response message as JSON; server streams are
newline-delimited JSON, ``{"result": <message>}`` per line and, if the call
ends in an error after the first message, a last ``{"error": {...}}`` line
(grpc-gateway's stream format). An error before any message is an HTTP
status with ``{"code": "NOT_FOUND", "message": ..., "metadata": {...}}``
(`HTTP_STATUS`). docs/http-api.md is the user's side of this.

The caller's role is checked (`fleet.tls.require_role`, as every handler
does first) before the body is read, so a refused caller learns nothing and
costs no parsing. Client streams (PushArtifact) are not served: 501 naming
the gRPC call to use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc import aio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from fleet.errors import FleetError, InvalidArgument
from fleet.httpwire import (
    HTTP_STATUS,
    JSON,
    NDJSON,
    PATH_PREFIX,
    TIMEOUT_HEADER,
    error_body,
    timeout_seconds,
)
from fleet.identity import Role
from fleet.interceptors import ErrorMappingInterceptor, bounded
from fleet.protojson import encode, encode_message, message_to_dict, parse_request
from fleet.tls import require_role
from manager.httpapi.context import HttpContext
from manager.metrics import HttpMetricsMiddleware, ManagerMetrics

__all__ = ["AUTH_STATE_KEY", "FleetHttpApp", "Method"]

log = logging.getLogger(__name__)

AUTH_STATE_KEY = "fleet.auth_context"
"""Where the server puts the connection's auth context in the ASGI scope's ``state``."""


@dataclass(frozen=True)
class Method:
    """One RPC as an HTTP route."""

    name: str
    """The RPC's name ("ListNodes")."""
    grpc_path: str
    """gRPC's method path ("/fleet.v1.FleetService/ListNodes"), for the interceptor and logs."""
    request_type: type[Message]
    """The request message class."""
    server_streaming: bool
    """Answered as newline-delimited JSON."""
    client_streaming: bool
    """Not served over HTTP (501)."""
    behavior: Callable[[Any, Any], Any] | None
    """The servicer's handler behind the error interceptor; None for client streams."""

    @property
    def path(self) -> str:
        """The HTTP path ("/v1/fleet.v1.FleetService/ListNodes")."""
        return PATH_PREFIX + self.grpc_path


@dataclass(frozen=True)
class _CallDetails(grpc.HandlerCallDetails):
    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


class _Failed(Exception):
    """The call ended with a non-OK status (taken from the context)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        metadata: Any = (),
        *,
        http_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.metadata = code, message, tuple(metadata or ())
        self.http_status = HTTP_STATUS.get(code, 500) if http_status is None else http_status

    @classmethod
    def of(cls, ctx: HttpContext) -> _Failed:
        code: grpc.StatusCode | None = ctx.code()
        if code is None:
            code = grpc.StatusCode.UNKNOWN
        return cls(code, ctx.details() or code.name, ctx.trailing_metadata())

    @classmethod
    def from_error(cls, exc: FleetError) -> _Failed:
        about = exc.resource.metadata() if exc.resource is not None else ()
        return cls(exc.code, bounded(exc.message), about)

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.metadata)


def _error_response(failed: _Failed) -> Response:
    return Response(encode(failed.body()), status_code=failed.http_status, media_type=JSON)


async def _methods(
    servicer: Any, service: ServiceDescriptor, interceptor: aio.ServerInterceptor[Any, Any]
) -> dict[str, Method]:
    """Every RPC of `service`, its handler being `servicer`'s behind `interceptor`."""
    methods: dict[str, Method] = {}
    for m in service.methods:
        grpc_path = f"/{service.full_name}/{m.name}"
        behavior: Callable[[Any, Any], Any] | None = None
        if not m.client_streaming:
            bound = getattr(servicer, m.name)
            make = (
                grpc.unary_stream_rpc_method_handler
                if m.server_streaming
                else grpc.unary_unary_rpc_method_handler
            )
            plain = make(bound)

            async def continuation(_: grpc.HandlerCallDetails, handler: Any = plain) -> Any:
                return handler

            handler = await interceptor.intercept_service(continuation, _CallDetails(grpc_path))
            behavior = handler.unary_stream if m.server_streaming else handler.unary_unary
        methods[grpc_path] = Method(
            name=m.name,
            grpc_path=grpc_path,
            request_type=GetMessageClass(m.input_type),
            server_streaming=m.server_streaming,
            client_streaming=m.client_streaming,
            behavior=behavior,
        )
    return methods


class FleetHttpApp:
    """The ASGI application: FleetService's routes over `servicer`.

    `stopping` set: streams still open end with an UNAVAILABLE line ("the
    manager is shutting down") and new calls are refused the same way.
    """

    def __init__(
        self,
        methods: Mapping[str, Method],
        *,
        trust_domain: str,
        max_body_bytes: int,
        role: Role = "operator",
        metrics: ManagerMetrics | None = None,
    ) -> None:
        self.methods = dict(methods)
        self._td = trust_domain
        self._role = role
        self._max_body = max_body_bytes
        self.stopping = asyncio.Event()
        routes = [
            Route(m.path, self._endpoint(m), methods=["POST"], name=m.name)
            for m in self.methods.values()
        ]
        self.asgi: Callable[[Any, Any, Any], Awaitable[None]] = Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_exception},
        )
        if metrics is not None:
            # Outside Starlette, so a 500 its error middleware answers is counted too.
            paths = {m.path: (m.name, m.server_streaming) for m in self.methods.values()}
            self.asgi = HttpMetricsMiddleware(self.asgi, metrics, paths)

    @classmethod
    async def build(
        cls,
        servicer: Any,
        service: ServiceDescriptor,
        *,
        trust_domain: str,
        max_body_bytes: int,
        metrics: ManagerMetrics | None = None,
    ) -> FleetHttpApp:
        """The app for `service` served by `servicer` (FleetService: operators only),
        its requests counted and timed in `metrics`."""
        methods = await _methods(servicer, service, ErrorMappingInterceptor())
        return cls(
            methods, trust_domain=trust_domain, max_body_bytes=max_body_bytes, metrics=metrics
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.asgi(scope, receive, send)

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            message = (
                f"no such method: {request.url.path}; the API serves"
                f" POST {PATH_PREFIX}/<package.Service>/<Method> (docs/http-api.md)"
            )
            return _error_response(_Failed(grpc.StatusCode.NOT_FOUND, message))
        if exc.status_code == 405:
            body = _Failed(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{request.method} is not allowed; every method is called with POST",
            ).body()
            return Response(encode(body), status_code=405, media_type=JSON, headers=exc.headers)
        return Response(
            encode({"code": "UNKNOWN", "message": exc.detail}),
            status_code=exc.status_code,
            media_type=JSON,
        )

    def _endpoint(self, method: Method) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await self._call(method, request)

        return endpoint

    def _context(self, request: Request) -> HttpContext:
        auth = request.scope.get("state", {}).get(AUTH_STATE_KEY, {})
        client = request.client
        peer = f"ipv4:{client.host}:{client.port}" if client else ""
        timeout = timeout_seconds(request.headers.get(TIMEOUT_HEADER))
        deadline = None if timeout is None else time.monotonic() + timeout
        return HttpContext(
            auth, peer=peer, metadata=tuple(request.headers.items()), deadline=deadline
        )

    async def _body(self, request: Request) -> bytes:
        """The request body; InvalidArgument on a wrong content type, _Failed(413) if too large."""
        kind = request.headers.get("content-type", "")
        if kind.split(";")[0].strip().lower() != JSON:
            # Also what keeps browsers from posting here cross-site without a CORS
            # preflight, which this API never answers.
            raise InvalidArgument(
                f"Content-Type must be {JSON}, got {kind or 'none'!r}"
                " (curl: -H 'Content-Type: application/json')"
            )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body:
            raise _TooLarge(self._max_body)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self._max_body:
                raise _TooLarge(self._max_body)
            chunks.append(chunk)
        return b"".join(chunks)

    def _admit(self, method: Method, request: Request) -> HttpContext:
        """The call's context if it may go on to read its body; else raises why not."""
        if self.stopping.is_set():
            raise _SHUTTING_DOWN
        ctx = self._context(request)
        # The handler checks the same first; doing it here too means a refused
        # caller's body is never read.
        require_role(ctx, self._role, trust_domain=self._td)
        if method.behavior is None:
            raise _Failed(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{method.name} streams its request and is served over gRPC only:"
                f" call {method.grpc_path} on the manager's gRPC port"
                " (fleetctl: `fleetctl artifacts push`)",
            )
        return ctx

    async def _call(self, method: Method, request: Request) -> Response:
        try:
            ctx = self._admit(method, request)
            message = parse_request(await self._body(request), method.request_type)
        except _Failed as failed:
            return _error_response(failed)
        except FleetError as exc:
            return _error_response(_Failed.from_error(exc))
        except ClientDisconnect:
            return Response(status_code=499)
        if method.server_streaming:
            return await self._stream(method, message, ctx)
        return await self._unary(method, message, ctx)

    async def _unary(self, method: Method, message: Message, ctx: HttpContext) -> Response:
        assert method.behavior is not None
        try:
            remaining = ctx.time_remaining()
            async with asyncio.timeout(remaining):
                response = await method.behavior(message, ctx)
        except aio.AbortError:
            return _error_response(_Failed.of(ctx))
        except TimeoutError:
            return _error_response(_deadline(method))
        finally:
            ctx.finish()
        if ctx.code() not in (None, grpc.StatusCode.OK):  # set_code without abort
            return _error_response(_Failed.of(ctx))
        return Response(encode_message(response), media_type=JSON)

    async def _stream(self, method: Method, message: Message, ctx: HttpContext) -> Response:
        assert method.behavior is not None
        messages: AsyncIterator[Any] = method.behavior(message, ctx)
        pull = _Puller(messages, self.stopping, ctx)
        # The first message, or an error before it, decides the HTTP status; a stream
        # that waits for something to happen (follow) gets its 200 after FIRST_WAIT.
        first: Any = _NOTHING_YET
        try:
            first = await pull.next(wait=FIRST_WAIT)
        except _NotYet:
            pass
        except _Failed as failed:
            await pull.close()
            ctx.finish()
            return _error_response(failed)
        except _Done:
            await pull.close()
            ctx.finish()
            return Response(b"", media_type=NDJSON)
        except BaseException:
            await pull.close()
            ctx.finish(cancelled=True)
            raise
        return StreamingResponse(
            _lines(first, pull, ctx, method),
            media_type=NDJSON,
            # Proxies must pass each line on as it comes.
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )


class _TooLarge(_Failed):
    """413: gRPC's answer to an oversized request is RESOURCE_EXHAUSTED, HTTP's is 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the request body is larger than the limit of {limit} bytes (http.max_body_bytes)",
            http_status=413,
        )


def _deadline(method: Method) -> _Failed:
    return _Failed(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"{method.name} did not finish within the {TIMEOUT_HEADER} the caller gave",
    )


class _Done(Exception):
    """The stream ended with OK."""


_NOTHING_YET = object()
FIRST_WAIT = 0.5
"""How long a server stream's first message (or its error) may take to decide the HTTP
status; past it the answer is 200 and an error comes as the last line. Handlers check the
caller and the request before their first message, so their errors come well within it."""

_SHUTTING_DOWN = _Failed(grpc.StatusCode.UNAVAILABLE, "the manager is shutting down")


class _NotYet(Exception):
    """No message (nor error) within the wait asked for; the pull goes on in the background."""


class _Puller:
    """Takes a server stream's messages one at a time, ending early when the manager stops
    or the deadline passes (the servicer's generator is cancelled, as gRPC cancels it)."""

    def __init__(self, messages: AsyncIterator[Any], stopping: asyncio.Event, ctx: HttpContext):
        self._messages = messages
        self._stopping = stopping
        self._ctx = ctx
        self._stop_wait: asyncio.Task[Any] | None = None
        self._step: asyncio.Future[Any] | None = None

    async def next(self, wait: float | None = None) -> Any:
        """The next message; _Done at the end, _Failed for an error status, _NotYet if
        `wait` seconds passed first (the next call goes on waiting for the same message)."""
        if self._stopping.is_set():
            raise _SHUTTING_DOWN
        if self._stop_wait is None:
            self._stop_wait = asyncio.ensure_future(self._stopping.wait())
        step = self._step
        if step is None:
            step = self._step = asyncio.ensure_future(anext(self._messages))
        remaining = self._ctx.time_remaining()
        timeout = remaining if wait is None else wait if remaining is None else min(wait, remaining)
        try:
            done, _ = await asyncio.wait(
                {step, self._stop_wait}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:
            await self._cancel_step()
            raise
        if step not in done:
            if self._stopping.is_set():
                await self._cancel_step()
                raise _SHUTTING_DOWN
            if remaining is not None and timeout == remaining:
                await self._cancel_step()
                raise _Failed(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed")
            raise _NotYet
        self._step = None
        try:
            return step.result()
        except StopAsyncIteration:
            if self._ctx.code() not in (None, grpc.StatusCode.OK):
                raise _Failed.of(self._ctx) from None
            raise _Done from None
        except aio.AbortError:
            raise _Failed.of(self._ctx) from None

    async def _cancel_step(self) -> None:
        step, self._step = self._step, None
        if step is not None and not step.done():
            step.cancel()
            with contextlib.suppress(BaseException):
                await step

    async def close(self) -> None:
        """Close the servicer's generator (its `aclosing` blocks run) and the stop waiter."""
        if self._stop_wait is not None:
            self._stop_wait.cancel()
        await self._cancel_step()
        aclose = getattr(self._messages, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


async def _lines(
    first: Any, pull: _Puller, ctx: HttpContext, method: Method
) -> AsyncIterator[bytes]:
    cancelled = True
    try:
        if first is not _NOTHING_YET:
            yield encode({"result": message_to_dict(first)}) + b"\n"
        while True:
            try:
                item = await pull.next()
            except _Done:
                break
            except _Failed as failed:
                yield encode({"error": failed.body()}) + b"\n"
                break
            yield encode({"result": message_to_dict(item)}) + b"\n"
        cancelled = False
    finally:
        # The client went away: Starlette cancels this generator's scope; shield the
        # cleanup so the servicer's generator is closed (a fan-out stops launching).
        with anyio.CancelScope(shield=True):
            await pull.close()
        ctx.finish(cancelled=cancelled)
        if cancelled:
            log.debug("%s: the client went away during the stream", method.grpc_path)
