"""The one place where `fleet.errors` become gRPC status codes on a server.

Servicers raise `FleetError` subclasses; `ErrorMappingInterceptor` aborts the
call with the error's code and message, and its `Resource` as trailing
metadata. The generated base class's NotImplementedError stays UNIMPLEMENTED.
Anything else escaping a servicer is
a bug: it is logged with its traceback and answered `INTERNAL`, never
`UNKNOWN`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from fleet.errors import FleetError

__all__ = ["MAX_DETAILS", "ErrorMappingInterceptor", "bounded"]

log = logging.getLogger(__name__)

_Context = aio.ServicerContext[Any, Any]

MAX_DETAILS = 1024
"""Longest status message sent. Messages quote the bad value; a long one would
push the trailer past the client's metadata limit, and the client would see
RESOURCE_EXHAUSTED instead of the error that names the field."""


def bounded(message: str, limit: int = MAX_DETAILS) -> str:
    """`message`, cut to `limit` characters with a note of how much was cut."""
    if len(message) <= limit:
        return message
    note = f"... ({len(message) - limit} more characters)"
    return message[: limit - len(note)] + note


async def _abort_for(exc: Exception, context: _Context, method: str) -> None:
    if isinstance(exc, FleetError):
        about = exc.resource.metadata() if exc.resource is not None else ()
        await context.abort(exc.code, bounded(exc.message), trailing_metadata=about)
    if type(exc) is NotImplementedError:
        # The generated base class's answer for a method this server does not serve:
        # UNIMPLEMENTED, as without the interceptor (clients fall back on it).
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented here")
    log.exception("unhandled error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")


def _wrap_unary(behavior: Any, method: str) -> Callable[[Any, _Context], Awaitable[Any]]:
    async def wrapper(request: Any, context: _Context) -> Any:
        try:
            return await behavior(request, context)
        except aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(exc, context, method)
            raise  # unreachable: abort raises

    return wrapper


def _wrap_stream(behavior: Any, method: str) -> Callable[[Any, _Context], AsyncIterator[Any]]:
    async def wrapper(request: Any, context: _Context) -> AsyncIterator[Any]:
        try:
            result = behavior(request, context)
            if inspect.isawaitable(result):  # a handler that writes with context.write()
                await result
                return
            async for item in result:
                yield item
        except aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(exc, context, method)
            raise  # unreachable: abort raises

    return wrapper


class ErrorMappingInterceptor(aio.ServerInterceptor):  # type: ignore[type-arg]
    """Maps `FleetError` to its status code and any other exception to INTERNAL."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
