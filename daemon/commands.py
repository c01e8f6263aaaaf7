"""Runs the manager's commands from the control channel through the DaemonService servicer.

A `Command` is a DaemonService call carried on the daemon's own Connect
stream (fleet.control). `CommandRunner` reassembles its request, runs the
SAME servicer handler the TCP server runs, with a `CommandContext` in place
of gRPC's servicer context, and sends the result back in pieces. Several
calls run at once, one task each; a `cancel` cancels the task, a deadline
(`timeout_seconds`) bounds it, and a streaming call sends no more response
messages than the manager credited (`Credit`), so a followed log never
floods the stream: the handler waits at its next message until more credit
or a cancel arrives.

Every outcome ends the call with one `CommandResult(end=True)` that carries
no response bytes: the status the TCP server would have ended the call with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, cast

import grpc
from google.protobuf.message import DecodeError, Message
from grpc import aio

from fleet.control import METHODS, Method, Reassembler, pieces
from fleet.errors import FleetError
from fleet.interceptors import bounded
from fleet.v1 import manager_pb2

__all__ = [
    "MAX_CALLS",
    "MAX_REQUEST_BYTES",
    "CommandContext",
    "CommandRunner",
    "Credit",
    "command_deadline",
]

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4 * 1024 * 1024
"""Largest reassembled request: the TCP server's receive limit (daemon.server)."""
MAX_CALLS = 64
"""Commands assembling or running at once; more are refused RESOURCE_EXHAUSTED."""
_MAX_CREDIT = 2**32
"""Credit is capped so a manager granting in a loop cannot grow an int without bound."""


@dataclass
class Credit:
    """Response messages a command may still send (`Command.credit`).

    The first piece's credit starts the count, 0 there meaning 1 (so a unary
    call can always answer); later grants add to it.
    """

    available: int

    @classmethod
    def first(cls, credit: int) -> Credit:
        """The count a call starts with, from its first piece's `credit`."""
        return cls(max(credit, 1))

    def grant(self, credit: int) -> None:
        """The manager allowed `credit` more messages."""
        self.available = min(self.available + max(credit, 0), _MAX_CREDIT)

    def take(self) -> bool:
        """Use one message of credit; False (nothing used) when none is left."""
        if self.available <= 0:
            return False
        self.available -= 1
        return True


def command_deadline(received_at: float, timeout_seconds: float) -> float | None:
    """When a command must be over (monotonic seconds), None for no deadline.

    ValueError for a timeout that is negative or not a finite number.
    """
    if math.isnan(timeout_seconds) or math.isinf(timeout_seconds) or timeout_seconds < 0:
        raise ValueError(f"timeout_seconds must be a finite number >= 0, got {timeout_seconds}")
    return received_at + timeout_seconds if timeout_seconds > 0 else None


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, trailing: Any = ()) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailing = trailing


class CommandContext:
    """What the DaemonService handlers use of `grpc.aio.ServicerContext`, for one command.

    The caller is the peer at the other end of the daemon's own mTLS
    connection (`auth` holds its identity, as gRPC's auth context would);
    `abort` ends the command with its code, as on the TCP server.
    """

    def __init__(
        self, auth: Mapping[str, Sequence[bytes]], deadline: float | None, peer: str
    ) -> None:
        self._auth = auth
        self._deadline = deadline
        self._peer = peer
        self._done = False
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailing: Any = ()

    def auth_context(self) -> Mapping[str, Sequence[bytes]]:
        """The caller's verified identity (`fleet.tls.peer_identity` reads it)."""
        return self._auth

    def peer(self) -> str:
        """The manager's address."""
        return self._peer

    def invocation_metadata(self) -> tuple[()]:
        """Commands carry no metadata."""
        return ()

    def time_remaining(self) -> float | None:
        """Seconds until the command's deadline (None: none)."""
        if self._deadline is None:
            return None
        return max(self._deadline - time.monotonic(), 0.0)

    def cancelled(self) -> bool:
        """Handlers see a cancel as CancelledError; the flag is never needed."""
        return False

    def done(self) -> bool:
        """True once the command ended."""
        return self._done

    def set_code(self, code: grpc.StatusCode) -> None:
        """The status a handler that returns normally wants (rare)."""
        self.code = code

    def set_details(self, details: str) -> None:
        """The message with `set_code`."""
        self.details = details

    def set_trailing_metadata(self, metadata: Any) -> None:
        """Sent with the command's end (`CommandResult.trailing_metadata`)."""
        self.trailing = metadata

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> NoReturn:
        """End the command with `code` (as `context.abort` ends a call)."""
        raise _Abort(code, details, trailing_metadata)


@dataclass
class _Call:
    request_id: int
    method: Method | None
    deadline: float | None
    credit: Credit
    joiner: Reassembler
    more_credit: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    cancelled: bool = False
    ending: bool = False


Send = Callable[[manager_pb2.CommandResult], Awaitable[None]]
Done = Callable[[str, grpc.StatusCode], None]


class CommandRunner:
    """Runs `Command`s on `servicer` (a DaemonServicer) and sends their results with `send`.

    `auth` is the manager's identity as an auth context; `on_done(method,
    code)` is told how each call ended (for /metrics). `handle` never blocks,
    so the stream's reader keeps reading (credit and cancels must get
    through while results wait for room in the send queue).
    """

    def __init__(
        self,
        servicer: object,
        send: Send,
        *,
        auth: Mapping[str, Sequence[bytes]],
        peer: str = "",
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_calls: int = MAX_CALLS,
        on_done: Done | None = None,
    ) -> None:
        self._servicer = servicer
        self._send = send
        self._auth = auth
        self._peer = peer
        self._max_request_bytes = max_request_bytes
        self._max_calls = max_calls
        self._on_done = on_done
        self._calls: dict[int, _Call] = {}
        self._refusals: set[asyncio.Task[None]] = set()  # held so they are not collected

    @property
    def running(self) -> int:
        """Calls assembling or running."""
        return len(self._calls)

    def handle(self, command: manager_pb2.Command) -> None:
        """One `Command` from the manager: a piece of a call, credit, or a cancel."""
        call = self._calls.get(command.request_id)
        if command.cancel:
            if call is not None:  # a cancel for an unknown (or finished) id is ignored
                self._cancel(call)
            return
        if call is None:
            if not command.method:
                # Credit or a piece for a call that already ended (or was refused): nothing to do.
                log.debug("command %d: no such call; message ignored", command.request_id)
                return
            self._begin(command)
            return
        if command.credit:
            call.credit.grant(command.credit)
            call.more_credit.set()
        if call.task is None:
            self._add_piece(call, command.request, command.more)

    async def close(self) -> None:
        """The stream is gone: stop every call without answering."""
        tasks = [c.task for c in self._calls.values() if c.task is not None]
        for task in tasks:
            task.cancel()
        for task in self._refusals:
            task.cancel()
        await asyncio.gather(*tasks, *self._refusals, return_exceptions=True)
        self._calls.clear()

    # --- internals ------------------------------------------------------

    def _begin(self, command: manager_pb2.Command) -> None:
        now = time.monotonic()
        method = METHODS.get(command.method)
        call = _Call(
            request_id=command.request_id,
            method=method,
            deadline=None,
            credit=Credit.first(command.credit),
            joiner=Reassembler(self._max_request_bytes),
        )
        if len(self._calls) >= self._max_calls:
            self._refuse_full(call, command.method)
            return
        self._calls[call.request_id] = call
        if method is None:
            self._end(
                call,
                grpc.StatusCode.UNIMPLEMENTED,
                f"this daemon does not serve DaemonService method {command.method[:100]!r};"
                " upgrade it or use a method it knows",
                name=command.method[:100] or "?",
            )
            return
        try:
            call.deadline = command_deadline(now, command.timeout_seconds)
        except ValueError as exc:
            self._end(call, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        self._add_piece(call, command.request, command.more)

    def _add_piece(self, call: _Call, piece: bytes, more: bool) -> None:
        try:
            whole = call.joiner.add(piece, more)
        except ValueError as exc:
            self._end(
                call,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request of {self._name(call)}: {exc}; send less (the TCP server's limit too)",
            )
            return
        if whole is not None:
            name = f"command-{call.request_id}"
            call.task = asyncio.create_task(self._run(call, whole), name=name)

    def _cancel(self, call: _Call) -> None:
        if call.ending:  # its end is on its way already
            return
        if call.task is None:  # still assembling: nothing runs yet
            self._end(call, grpc.StatusCode.CANCELLED, "cancelled by the manager")
            return
        call.cancelled = True
        call.task.cancel()

    def _end(
        self, call: _Call, code: grpc.StatusCode, message: str, *, name: str | None = None
    ) -> None:
        """End a call that is not running (refused before it started)."""
        call.ending = True
        call.task = asyncio.create_task(
            self._finish(call, code, message, name=name), name=f"command-{call.request_id}-end"
        )

    def _refuse_full(self, call: _Call, name: str) -> None:
        # No task for it (that is the bound); a full send queue loses the answer,
        # and the manager's deadline ends its side.
        log.warning(
            "command %d (%s) refused: %d calls running", call.request_id, name, self.running
        )
        self._count(name[:100] or "?", grpc.StatusCode.RESOURCE_EXHAUSTED)
        result = _result(
            call.request_id,
            end=True,
            code=grpc.StatusCode.RESOURCE_EXHAUSTED,
            message=f"the daemon runs {self._max_calls} commands already; retry later",
        )

        async def answer() -> None:
            with contextlib.suppress(Exception):
                await self._send(result)

        self._refusals.add(task := asyncio.create_task(answer()))
        task.add_done_callback(self._refusals.discard)

    @staticmethod
    def _name(call: _Call) -> str:
        return call.method.name if call.method is not None else "?"

    async def _finish(
        self,
        call: _Call,
        code: grpc.StatusCode,
        message: str,
        *,
        name: str | None = None,
        trailing: Any = (),
    ) -> None:
        try:
            await self._send(
                _result(call.request_id, end=True, code=code, message=message, trailing=trailing)
            )
        finally:
            self._calls.pop(call.request_id, None)
            self._count(name or self._name(call), code)

    def _count(self, name: str, code: grpc.StatusCode) -> None:
        if self._on_done is not None:
            self._on_done(name, code)

    async def _run(self, call: _Call, data: bytes) -> None:
        method = call.method
        assert method is not None  # only known methods get here
        code, message = grpc.StatusCode.OK, ""
        trailing: Any = ()
        context = CommandContext(self._auth, call.deadline, self._peer)
        loop = asyncio.get_running_loop()
        when = None if call.deadline is None else loop.time() + (call.deadline - time.monotonic())
        try:
            async with asyncio.timeout_at(when):
                await self._call_handler(call, method, data, context)
            if context.code is not None and context.code != grpc.StatusCode.OK:
                code, message, trailing = context.code, context.details, context.trailing
        except TimeoutError:
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, f"{method.name}: deadline exceeded"
        except asyncio.CancelledError:
            if not call.cancelled:
                self._calls.pop(call.request_id, None)
                raise  # the stream is closing: nobody to answer
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            code, message = grpc.StatusCode.CANCELLED, "cancelled by the manager"
        except _Abort as exc:
            code, message, trailing = exc.code, exc.details, exc.trailing
        except FleetError as exc:
            # What the TCP server's interceptor sends as trailing metadata (the Resource).
            code, message = exc.code, exc.message
            trailing = exc.resource.metadata() if exc.resource is not None else ()
        except DecodeError:
            code = grpc.StatusCode.INVALID_ARGUMENT
            message = f"{method.name}: the request is not a {method.request.DESCRIPTOR.full_name}"
        except Exception:
            log.exception("command %d (%s) failed", call.request_id, method.name)
            code = grpc.StatusCode.INTERNAL
            message = f"internal error in {method.name}; see the daemon log"
        finally:
            context._done = True  # the adapter's own flag
        await self._finish(call, code, bounded(message), trailing=trailing)

    async def _call_handler(
        self, call: _Call, method: Method, data: bytes, context: CommandContext
    ) -> None:
        request = method.request.FromString(data)
        handler = getattr(self._servicer, method.name)
        ctx = cast(aio.ServicerContext[Any, Any], context)
        if not method.server_streaming:
            response: Message = await handler(request, ctx)
            await self._respond(call, response)
            return
        stream: AsyncIterator[Message] = handler(request, ctx)
        async with contextlib.aclosing(stream):  # type: ignore[type-var]  # an async generator
            async for response in stream:
                await self._respond(call, response)

    async def _respond(self, call: _Call, response: Message) -> None:
        while not call.credit.take():
            call.more_credit.clear()
            await call.more_credit.wait()
        for piece, more in pieces(response.SerializeToString()):
            await self._send(_result(call.request_id, response=piece, more=more))


def _result(
    request_id: int,
    *,
    response: bytes = b"",
    more: bool = False,
    end: bool = False,
    code: grpc.StatusCode = grpc.StatusCode.OK,
    message: str = "",
    trailing: Any = (),
) -> manager_pb2.CommandResult:
    return manager_pb2.CommandResult(
        request_id=request_id,
        response=response,
        more=more,
        end=end,
        code=code.value[0] if end else 0,
        message=message,
        # Text values only (binary "-bin" keys have no place in a string map).
        trailing_metadata={
            str(k): v for k, v in trailing or () if isinstance(v, str) and not k.endswith("-bin")
        },
    )
