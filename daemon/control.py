"""The daemon's end of the control channel: one open `ManagerService.Connect` stream.

`ControlStream.open` sends the hello (what RegisterNode carries) and waits
for the welcome; after that the stream carries, upward, the same requests
the unary link makes (agent states, metric batches, job reports and
uploads) and, downward, the manager's commands (daemon.commands).

The upward methods (`SyncAgentStates`, `ReportMetrics`, ...) behave like
the generated stub's unary methods: they return the answer with the same
`reply_to`, or raise `grpc.RpcError` with the code the unary call would have
ended with (a `ConnectError` answer, with its trailing metadata, so
`from_rpc_error` keeps the `Resource`; DEADLINE_EXCEEDED when no answer comes
in time, UNAVAILABLE when the stream broke). So the link's loops and the job
reporter run unchanged over either transport, through the link's one call
wrapper and its one error mapping.

Everything sent goes through one bounded queue and one writer task: when the
manager stops reading, HTTP/2 flow control stops the writer, the queue
fills, and every sender waits -- the daemon's memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc import aio

from daemon.commands import CommandRunner
from fleet.identity import Identity
from fleet.v1 import manager_pb2, manager_pb2_grpc

__all__ = ["SEND_QUEUE", "ControlStream", "StreamBroken", "StreamUnimplemented", "manager_auth"]

log = logging.getLogger(__name__)

SEND_QUEUE = 16
"""Messages waiting for the writer (each at most one ~1 MiB piece)."""

_ANSWERS = {
    "agent_states": "agent_states",
    "metrics": "metrics",
    "job_status": "job_status",
    "job_output": "job_output",
    "hello": "welcome",
}
"""Which ConnectResponse field answers which ConnectRequest field."""


class StreamBroken(Exception):
    """The control stream ended; the link dials again."""


class StreamUnimplemented(Exception):
    """The manager does not serve Connect (an older one): use the unary RPCs."""


def manager_auth(server_name: str, trust_domain: str) -> dict[str, list[bytes]]:
    """The identity the daemon's TLS handshake verified for the manager, as an auth context.

    The daemon dials with `server_name` as the name the peer's certificate
    must carry (fleet.tls.channel_options), and the CA signs that name only
    into the certificate of its owner: ``manager.<td>`` into every manager's,
    ``<name>.<role>.<td>`` into that identity's. Any other name proves no
    Fleet identity: an empty context, which the handlers refuse
    (UNAUTHENTICATED).
    """
    if server_name == f"manager.{trust_domain}":
        identity = Identity("manager", "control-channel", trust_domain)
    else:
        name, _, rest = server_name.partition(".")
        role, _, domain = rest.partition(".")
        try:
            identity = Identity.from_uri(f"spiffe://{domain}/{role}/{name}")
        except ValueError:
            return {}
        if domain != trust_domain:
            return {}
    return {"peer_uri": [identity.uri.encode()]}


def _rpc_error(
    code: grpc.StatusCode, details: str, trailing: Mapping[str, str] | None = None
) -> aio.AioRpcError:
    """The error a unary call ending with `code`, `details` and `trailing` metadata raises."""
    return aio.AioRpcError(
        code, aio.Metadata(), aio.Metadata(*(trailing or {}).items()), details, None
    )


class ControlStream:
    """One open Connect stream: pending answers by id, the send queue, the commands."""

    def __init__(
        self,
        call: Any,
        *,
        rpc_timeout: float,
        commands: Callable[[ControlStream], CommandRunner] | None,
        queue_size: int = SEND_QUEUE,
    ) -> None:
        self._call = call
        self._rpc_timeout = rpc_timeout
        self._queue: asyncio.Queue[manager_pb2.ConnectRequest] = asyncio.Queue(queue_size)
        self._next_id = 0
        self._pending: dict[int, tuple[str, asyncio.Future[manager_pb2.ConnectResponse]]] = {}
        self._runner = commands(self) if commands is not None else None
        self._broken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._error: aio.AioRpcError | None = None
        self.unknown_replies = 0
        """Answers whose reply_to matched nothing (late, after a timeout)."""
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="control-write"),
            asyncio.create_task(self._read_loop(), name="control-read"),
        ]

    @classmethod
    async def open(
        cls,
        stub: manager_pb2_grpc.ManagerServiceStub,
        hello: manager_pb2.RegisterNodeRequest,
        *,
        rpc_timeout: float,
        welcome_timeout: float | None = None,
        commands: Callable[[ControlStream], CommandRunner] | None = None,
        queue_size: int = SEND_QUEUE,
    ) -> tuple[ControlStream, manager_pb2.RegisterNodeResponse]:
        """Open Connect, say hello, return the stream and the welcome.

        The hello waits `welcome_timeout` (default `rpc_timeout`) for its welcome.
        StreamUnimplemented if the manager does not serve Connect; the
        welcome's error as grpc.RpcError (as RegisterNode would raise it).
        """
        stream = cls(
            # No request iterator: the writer task writes (one writer, bounded queue).
            stub.Connect(),  # type: ignore[call-arg]
            rpc_timeout=rpc_timeout,
            commands=commands,
            queue_size=queue_size,
        )
        try:
            welcome = await stream.request("hello", hello, welcome_timeout)
        except grpc.RpcError as exc:
            await stream.close()
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise StreamUnimplemented(exc.details() or "Connect is not implemented") from None
            raise
        except BaseException:
            await stream.close()
            raise
        assert isinstance(welcome, manager_pb2.RegisterNodeResponse)
        return stream, welcome

    # --- the unary calls, over the stream (named and called as the stub's) ----

    async def SyncAgentStates(
        self,
        request: manager_pb2.SyncAgentStatesRequest,
        timeout: float | None = None,  # noqa: ASYNC109  # the stub's
    ) -> Message:
        """As the stub's SyncAgentStates."""
        return await self.request("agent_states", request, timeout)

    async def ReportMetrics(
        self,
        request: manager_pb2.ReportMetricsRequest,
        timeout: float | None = None,  # noqa: ASYNC109  # the stub's
    ) -> Message:
        """As the stub's ReportMetrics: the answer means stored (or already stored)."""
        return await self.request("metrics", request, timeout)

    async def ReportJobStatus(
        self,
        request: manager_pb2.ReportJobStatusRequest,
        timeout: float | None = None,  # noqa: ASYNC109  # the stub's
    ) -> Message:
        """As the stub's ReportJobStatus."""
        return await self.request("job_status", request, timeout)

    async def UploadJobOutput(
        self,
        request: manager_pb2.UploadJobOutputRequest,
        timeout: float | None = None,  # noqa: ASYNC109  # the stub's
    ) -> Message:
        """As the stub's UploadJobOutput."""
        return await self.request("job_output", request, timeout)

    async def request(
        self,
        field: str,
        message: Message,
        timeout: float | None = None,  # noqa: ASYNC109  # as the stub's calls
    ) -> Message:
        """Send `message` as ConnectRequest.`field`; its answer, or grpc.RpcError."""
        if self._error is not None:
            raise self._error
        self._next_id += 1
        request_id = self._next_id
        future: asyncio.Future[manager_pb2.ConnectResponse] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[request_id] = (_ANSWERS[field], future)
        wait = self._rpc_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(wait):
                outgoing = manager_pb2.ConnectRequest(id=request_id)
                getattr(outgoing, field).CopyFrom(message)
                await self.send(outgoing)
                answer = await future
        except TimeoutError:
            raise _rpc_error(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer to {field} within {wait:g}s"
            ) from None
        finally:
            self._pending.pop(request_id, None)
        body = answer.WhichOneof("body")
        if body == "error":
            # The trailers carry the Resource, so from_rpc_error gives the unary call's error.
            error = answer.error
            raise _rpc_error(_status(error.code), error.message, error.trailing_metadata)
        expected = _ANSWERS[field]
        if body != expected:
            raise _rpc_error(
                grpc.StatusCode.INTERNAL,
                f"the manager answered {field} with {body}, not {expected}",
            )
        reply: Message = getattr(answer, expected)
        return reply

    async def send(self, message: manager_pb2.ConnectRequest) -> None:
        """Queue `message` for the writer (waits while the queue is full)."""
        if self._error is not None:
            raise self._error
        await self._queue.put(message)

    async def send_result(self, result: manager_pb2.CommandResult) -> None:
        """Queue a piece of a command's result."""
        await self.send(manager_pb2.ConnectRequest(result=result))

    async def wait_broken(self) -> None:
        """Return never; raise StreamBroken when the stream ends."""
        await asyncio.shield(self._broken)
        raise StreamBroken(self._error.details() if self._error else "the control stream ended")

    async def close(self) -> None:
        """Stop the stream, its writer, reader and every command."""
        self._fail(_rpc_error(grpc.StatusCode.UNAVAILABLE, "the control stream was closed"))
        if self._runner is not None:
            await self._runner.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._call is not None:
            self._call.cancel()
        # Let go of the call now: an error raised from this stream can keep it (and so
        # the closed channel, redialing every <= 2 s) alive through the backoff.
        self._call = None

    # --- internals ------------------------------------------------------

    def _fail(self, error: aio.AioRpcError) -> None:
        if self._error is None:
            self._error = error
        for _field, future in self._pending.values():
            if not future.done():
                future.set_exception(self._error)
        if not self._broken.done():
            self._broken.set_result(None)

    async def _write_loop(self) -> None:
        try:
            while True:
                message = await self._queue.get()
                await self._call.write(message)
        except asyncio.CancelledError:
            raise
        except Exception:  # a write on a finished call: its status says why
            self._fail(await self._status())

    async def _read_loop(self) -> None:
        try:
            while True:
                message = await self._call.read()
                if message is aio.EOF:  # type: ignore[attr-defined]  # missing from grpc's stubs
                    self._fail(
                        _rpc_error(grpc.StatusCode.UNAVAILABLE, "the manager ended the stream")
                    )
                    return
                self._dispatch(message)
        except asyncio.CancelledError:
            raise
        except grpc.RpcError as exc:
            self._fail(_as_aio(exc))
        except Exception as exc:
            log.exception("control stream reader failed")
            self._fail(_rpc_error(grpc.StatusCode.INTERNAL, f"control stream reader: {exc!r}"))

    async def _status(self) -> aio.AioRpcError:
        """The call's own final status (what the manager ended it with)."""
        try:
            async with asyncio.timeout(self._rpc_timeout):
                code = await self._call.code()
                details = await self._call.details()
        except TimeoutError:
            return _rpc_error(grpc.StatusCode.UNAVAILABLE, "the control stream failed")
        return _rpc_error(code, details or code.name)

    def _dispatch(self, message: manager_pb2.ConnectResponse) -> None:
        if message.WhichOneof("body") == "command":
            if self._runner is None:
                self._refuse_command(message.command)
                return
            self._runner.handle(message.command)
            return
        entry = self._pending.get(message.reply_to)
        if entry is None:
            self.unknown_replies += 1
            log.debug("control stream: answer to %d, which waits no more", message.reply_to)
            return
        _field, future = entry
        if not future.done():
            future.set_result(message)

    def _refuse_command(self, command: manager_pb2.Command) -> None:
        # A link without a runner: end each call at once (UNIMPLEMENTED), never leave
        # the manager's caller waiting for its deadline. Credit and cancels need nothing.
        if not command.method or command.cancel:
            return
        result = manager_pb2.CommandResult(
            request_id=command.request_id,
            end=True,
            code=grpc.StatusCode.UNIMPLEMENTED.value[0],
            message="this daemon runs no commands on its control stream",
        )
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(manager_pb2.ConnectRequest(result=result))


def _status(code: int) -> grpc.StatusCode:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN


def _as_aio(exc: grpc.RpcError) -> aio.AioRpcError:
    # A copy: the call's own error (and its traceback) keeps the call alive.
    return _rpc_error(exc.code(), exc.details() or "")
