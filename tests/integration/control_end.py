"""A small daemon end of the control channel for manager tests, on the generated stub.

It opens `ManagerService.Connect` as ``node/<name>`` over mTLS, sends the
hello, and then serves the manager's commands from in-test handlers: unary
ones answer one message, streaming ones yield messages within the credit the
manager grants (and record the most ever outstanding). It records cancels.
The real daemon side lives in `daemon/`; this one only speaks the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc import aio
from manager_harness import registration

from fleet.control import METHODS, Reassembler, pieces
from fleet.tls import TLSConfig, channel_credentials, channel_options
from fleet.v1 import manager_pb2, manager_pb2_grpc

Unary = Callable[[Any], Awaitable[Message]]
Streaming = Callable[[Any], AsyncIterator[Message]]


@dataclass
class ControlEnd:
    """One node's control stream, from the daemon's side."""

    node_id: str
    call: Any
    channel: aio.Channel
    unary: dict[str, Unary] = field(default_factory=dict)
    streaming: dict[str, Streaming] = field(default_factory=dict)
    answers: dict[int, asyncio.Future[manager_pb2.ConnectResponse]] = field(default_factory=dict)
    commands: list[manager_pb2.Command] = field(default_factory=list)
    cancelled: set[int] = field(default_factory=set)
    max_outstanding: int = 0
    """Most result messages a streaming command ever had sent beyond those consumed... as
    the daemon sees it: sent minus the credit granted so far, never above 0 if obeyed."""
    obey_credit: bool = True
    reading: asyncio.Event = field(default_factory=asyncio.Event)
    """Cleared: the end stops reading (a daemon that stops reading its stream)."""
    next_id: int = 1
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    status: grpc.StatusCode | None = None
    details: str = ""
    trailing: dict[str, str] = field(default_factory=dict)
    """The status's trailing metadata."""
    _credit: dict[int, int] = field(default_factory=dict)
    _credit_changed: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    _parts: dict[int, Reassembler] = field(default_factory=dict)
    _reader: asyncio.Task[None] | None = None
    _write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, **body: Any) -> manager_pb2.ConnectResponse:
        """Send an upward message with the next id; its answer."""
        req_id = self.next_id
        self.next_id += 1
        return await self.send_raw(manager_pb2.ConnectRequest(id=req_id, **body))

    async def send_raw(self, req: manager_pb2.ConnectRequest) -> manager_pb2.ConnectResponse:
        """Send `req` as is; its answer (by reply_to = req.id)."""
        done = self.answers[req.id] = asyncio.get_running_loop().create_future()
        async with self._write_lock:
            await self.call.write(req)
        async with asyncio.timeout(10):
            return await done

    async def _write(self, req: manager_pb2.ConnectRequest) -> None:
        # Shielded: a write cancelled half-way would cancel the whole gRPC call.
        await asyncio.shield(self._locked_write(req))

    async def _locked_write(self, req: manager_pb2.ConnectRequest) -> None:
        async with self._write_lock:
            await self.call.write(req)

    async def _read(self) -> None:
        try:
            while True:
                await self.reading.wait()
                msg = await self.call.read()
                if msg is aio.EOF:
                    break
                if msg.reply_to:
                    fut = self.answers.pop(msg.reply_to, None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                if msg.WhichOneof("body") == "command":
                    self._command(msg.command)
            self.status = await self.call.code()
            self.details = await self.call.details()
            self.trailing = dict(await self.call.trailing_metadata() or ())
        except aio.AioRpcError as exc:
            self.status, self.details = exc.code(), exc.details() or ""
            self.trailing = dict(exc.trailing_metadata() or ())
        finally:
            self.ended.set()

    def _command(self, cmd: manager_pb2.Command) -> None:
        self.commands.append(cmd)
        rid = cmd.request_id
        if cmd.cancel:
            self.cancelled.add(rid)
            task = self._tasks.pop(rid, None)
            if task is not None:
                task.cancel()
            return
        if cmd.method:
            self._credit[rid] = cmd.credit or 1
            self._parts[rid] = Reassembler(64 * 1024 * 1024)
        elif cmd.credit:
            self._credit[rid] = self._credit.get(rid, 0) + cmd.credit
            self._credit_changed.set()
            return
        whole = self._parts[rid].add(cmd.request, cmd.more)
        if whole is None:
            return
        method = METHODS[self._method_of(rid)]
        request = method.request.FromString(whole)
        self._tasks[rid] = asyncio.create_task(self._run(rid, method.name, request))

    def _method_of(self, rid: int) -> str:
        return next(c.method for c in self.commands if c.request_id == rid and c.method)

    async def _run(self, rid: int, name: str, request: Message) -> None:
        code, text = 0, ""
        try:
            if name in self.unary:
                response = await self.unary[name](request)
                await self._result(rid, response.SerializeToString())
            else:
                sent = 0
                async for response in self.streaming[name](request):
                    while self.obey_credit and sent >= self._credit[rid]:
                        self._credit_changed.clear()
                        await self._credit_changed.wait()
                    sent += 1
                    self.max_outstanding = max(self.max_outstanding, sent - self._credit[rid])
                    await self._result(rid, response.SerializeToString())
        except asyncio.CancelledError:
            code, text = grpc.StatusCode.CANCELLED.value[0], "cancelled by the manager"
        except KeyError:
            code, text = grpc.StatusCode.UNIMPLEMENTED.value[0], f"{name} not served here"
        except Exception as exc:  # a broken test handler: say so instead of hanging
            code, text = grpc.StatusCode.INTERNAL.value[0], f"test handler failed: {exc!r}"
        with contextlib.suppress(Exception):
            await self._write(
                manager_pb2.ConnectRequest(
                    result=manager_pb2.CommandResult(
                        request_id=rid, end=True, code=code, message=text
                    )
                )
            )

    async def _result(self, rid: int, data: bytes) -> None:
        for piece, more in pieces(data):
            await self._write(
                manager_pb2.ConnectRequest(
                    result=manager_pb2.CommandResult(request_id=rid, response=piece, more=more)
                )
            )

    async def close(self) -> None:
        """Half-close, then drop the connection."""
        for task in self._tasks.values():
            task.cancel()
        with contextlib.suppress(Exception):
            await self.call.done_writing()
        self.call.cancel()
        if self._reader is not None:
            self._reader.cancel()  # it may be parked while not reading
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self.channel.close()


async def dial(pki: Any, port: int, node_id: str, *, role: str = "node") -> aio.Channel:
    """A channel as <role>/<node_id>, connected (TLS done) before it is returned."""
    tls: TLSConfig = pki.issue(role, node_id)
    channel = aio.secure_channel(
        f"127.0.0.1:{port}",
        channel_credentials(tls),
        options=channel_options(f"manager.{pki.trust_domain}"),
    )
    await channel.channel_ready()
    return channel


async def open_stream(
    pki: Any,
    port: int,
    node_id: str,
    *,
    role: str = "node",
    hello: Any = None,
    channel: aio.Channel | None = None,
    **overrides: Any,
) -> tuple[ControlEnd, manager_pb2.ConnectResponse | None]:
    """Connect as <role>/<node_id> (or on `channel`, from `dial`), send the hello; the end
    and the first answer (None if the stream ended instead; see `end.status`)."""
    if channel is None:
        tls: TLSConfig = pki.issue(role, node_id)
        channel = aio.secure_channel(
            f"127.0.0.1:{port}",
            channel_credentials(tls),
            options=channel_options(f"manager.{pki.trust_domain}"),
        )
    stub = manager_pb2_grpc.ManagerServiceStub(channel)
    end = ControlEnd(node_id, stub.Connect(), channel)
    end.reading.set()
    first = (
        hello
        if hello is not None
        else manager_pb2.ConnectRequest(id=1, hello=registration(node_id, **overrides))
    )
    end.next_id = first.id + 1
    done = end.answers[first.id] = asyncio.get_running_loop().create_future()
    end._reader = asyncio.create_task(end._read())
    await end.call.write(first)
    ended = asyncio.ensure_future(end.ended.wait())
    async with asyncio.timeout(10):
        await asyncio.wait({done, ended}, return_when=asyncio.FIRST_COMPLETED)
    ended.cancel()
    return end, (done.result() if done.done() else None)
