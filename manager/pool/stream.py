"""The pool's second transport: commands over a node's own control stream.

A daemon that opened `ManagerService.Connect` gets a `ControlSession`; the
pool sends that node's `DaemonService` calls through it instead of dialling.
`ControlStreams` holds the sessions of this replica, one per node (a newer
stream replaces the older).

One session, many calls at once, each with its own request id:

- a request goes out in pieces (`fleet.control.pieces`) with the call's
  deadline; the daemon's result comes back in pieces and is reassembled
  within `max_message_bytes`;
- a streaming call reads ahead at most `stream_credit` messages
  (`manager.pool.credit`): a slow caller never makes the manager buffer
  without bound;
- a deadline, or the caller going away, sends `cancel` to the daemon;
- everything written to the daemon waits in one bounded queue: a daemon that
  stops reading makes new commands fail RESOURCE_EXHAUSTED at once; credit
  grants and cancels (a few bytes per call) jump the queue so a call can
  always be stopped;
- when the stream ends every call in flight fails UNAVAILABLE at once
  (`StreamClosed`, saying whether the command had left the manager: the
  pool may then send it again, `manager.pool.outcome`).

Errors are the `fleet.errors` the dialled path raises, from the code and
message the daemon's handler ended with.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Final

import grpc
from google.protobuf.message import DecodeError, Message

from fleet import errors
from fleet.control import METHODS, PIECE_BYTES, Method, Reassembler, pieces
from fleet.v1 import manager_pb2
from manager.pool.config import ControlConfig
from manager.pool.credit import CreditWindow
from manager.pool.outcome import TransportFailed

__all__ = ["STREAM_ENDED", "ControlSession", "ControlStreams", "StreamClosed", "error_from_status"]

log = logging.getLogger(__name__)

STREAM_ENDED: Final = "the daemon stopped or its process died, or the network to it failed"
"""Why a stream ended when nothing said so: a daemon's exit and a cut cable (its
keepalive unanswered) both end the call alike here, so the words leave all open."""

_BY_CODE: Final[dict[grpc.StatusCode, type[errors.FleetError]]] = {
    cls.code: cls
    for cls in (
        errors.InvalidArgument,
        errors.NotFound,
        errors.AlreadyExists,
        errors.FailedPrecondition,
        errors.Aborted,
        errors.PermissionDenied,
        errors.Unauthenticated,
        errors.ResourceExhausted,
        errors.Unavailable,
        errors.DeadlineExceeded,
        errors.Internal,
    )
}
_STATUS: Final[dict[int, grpc.StatusCode]] = {s.value[0]: s for s in grpc.StatusCode}

Violation = Callable[[str], None]
"""Called with the kind of a protocol violation (counted in /metrics)."""


def error_from_status(
    code: int,
    message: str,
    *,
    node_id: str,
    trailing: Mapping[str, str] | None = None,
) -> errors.FleetError:
    """The FleetError for a command the daemon ended with `code` (as `from_rpc_error`,
    keeping the `Resource` its trailing metadata names)."""
    status = _STATUS.get(code, grpc.StatusCode.UNKNOWN)
    text = f"{node_id}: {message or status.name}"
    resource = errors.Resource.from_metadata((trailing or {}).items())
    if resource is not None and not resource.node:  # an agent the daemon names is the node's
        resource = dataclasses.replace(resource, node=node_id)
    cls = _BY_CODE.get(status)
    if cls is None:
        err = errors.FleetError(text, resource=resource)
        err.code = status  # type: ignore[misc]  # keep the unmapped code, as from_rpc_error
        return err
    return cls(text, resource=resource)


class StreamClosed(TransportFailed):
    """The node's control stream closed while the call was in flight (or before it
    started); the daemon reconnects by itself. `delivered` is False if the command
    never left this manager, so the daemon cannot have run it."""


_END: Final = object()


class _Call:
    """One command in flight: what arrived for it, waiting for its caller."""

    def __init__(self, request_id: int, method: Method, limit: int, credit: int | None) -> None:
        self.request_id = request_id
        self.method = method
        self.assembler = Reassembler(limit)
        self.credit = CreditWindow(credit) if credit is not None else None
        # Bounded by the credit (streams) or one response (unary); `deliver` never waits.
        self.inbox: collections.deque[Message | errors.FleetError | object] = collections.deque()
        self.ready = asyncio.Event()
        self.responses = 0
        self.done = False
        self.last_piece = 0
        """The send queue's count of messages queued when the request's last piece was:
        until that many have left, the daemon cannot have the whole request."""

    def put(self, item: Message | errors.FleetError | object) -> None:
        self.inbox.append(item)
        self.ready.set()

    async def take(self) -> Message | errors.FleetError | object:
        while not self.inbox:
            self.ready.clear()
            await self.ready.wait()
        return self.inbox.popleft()


class ControlSession:
    """The commands of one node's open control stream.

    The Connect handler feeds it the daemon's `CommandResult`s (`deliver`)
    and writes what `next_outgoing` returns; the pool calls `call` and
    `stream`.
    """

    def __init__(
        self,
        node_id: str,
        config: ControlConfig,
        *,
        on_violation: Violation = lambda _: None,
    ) -> None:
        self.node_id = node_id
        self._config = config
        self._on_violation = on_violation
        self._calls: dict[int, _Call] = {}
        self._next_id = 1
        self._queue: collections.deque[manager_pb2.ConnectResponse] = collections.deque()
        self._urgent: collections.deque[manager_pb2.ConnectResponse] = collections.deque()
        # Messages ever put in / taken out of `_queue` (FIFO): which commands have left.
        self._enqueued = 0
        self._dequeued = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._closed: str | None = None
        self.ended = asyncio.Event()
        """Set when the session is closed (stream ended, replaced, manager stopping)."""
        self.end_status: tuple[grpc.StatusCode, str] | None = None
        """The status to end the stream with, when the manager ended it."""

    # -- observing --------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Commands waiting for their result."""
        return len(self._calls)

    @property
    def queued(self) -> int:
        """Messages waiting to be written to the daemon."""
        return len(self._queue) + len(self._urgent)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def close_reason(self) -> str:
        """Why the session closed ("" while open)."""
        return self._closed or ""

    # -- the pool's side ----------------------------------------------------

    async def call(
        self,
        method: str,
        request: Message,
        timeout: float | None,  # noqa: ASYNC109  # the daemon is sent the deadline too
    ) -> Message:
        """Run a unary DaemonService `method` on the node; its response (`timeout`: the
        call's deadline in seconds, None for none)."""
        c = self._start(method, request, timeout, credit=None)
        try:
            async with self._deadline(c, timeout):
                item = await c.take()
                c.done = True  # the answer is in: what the daemon still sends is dropped
                if item is _END:  # ended OK without a response: the empty message
                    return c.method.response()
                if isinstance(item, errors.FleetError):
                    raise item
                assert isinstance(item, Message)
                return item
        finally:
            self._finish(c)

    async def stream(
        self,
        method: str,
        request: Message,
        timeout: float | None,  # noqa: ASYNC109  # the daemon is sent the deadline too
    ) -> AsyncGenerator[Message, None]:
        """Run a server-streaming DaemonService `method`; its responses as taken.

        Close the generator to stop early (the daemon is sent `cancel`).
        """
        c = self._start(method, request, timeout, credit=self._config.stream_credit)
        assert c.credit is not None
        try:
            async with self._deadline(c, timeout):
                while True:
                    item = await c.take()
                    if item is _END:
                        return
                    if isinstance(item, errors.FleetError):
                        raise item
                    assert isinstance(item, Message)
                    grant = c.credit.consume()
                    if grant:
                        self._send_urgent(
                            manager_pb2.Command(request_id=c.request_id, credit=grant)
                        )
                    yield item
        finally:
            self._finish(c)

    # -- the Connect handler's side ---------------------------------------

    def deliver(self, result: manager_pb2.CommandResult) -> None:
        """A piece of a command's result from the daemon. Never blocks."""
        c = self._calls.get(result.request_id)
        if c is None or c.done:
            if result.request_id >= self._next_id or result.request_id == 0:
                self._on_violation("unknown_request_id")
                log.warning(
                    "%s: result for request id %d, which was never sent; ignored",
                    self.node_id,
                    result.request_id,
                )
            # else: a call that already ended (cancelled, deadline): its late pieces are dropped
            return
        try:
            if result.response or result.more or not result.end:
                whole = c.assembler.add(result.response, result.more)
                if whole is not None:
                    self._response(c, whole)
        except ValueError:
            self._violate(
                c,
                "oversized_result",
                errors.ResourceExhausted(
                    f"{self.node_id}: the daemon's result for {c.method.name} is larger than "
                    f"{self._config.max_message_bytes} bytes (control.max_message_bytes)"
                ),
            )
            return
        if result.end and not c.done:
            c.done = True
            if result.code:
                c.put(
                    error_from_status(
                        result.code,
                        result.message,
                        node_id=self.node_id,
                        trailing=result.trailing_metadata,
                    )
                )
            else:
                c.put(_END)

    def _response(self, c: _Call, data: bytes) -> None:
        if c.credit is None and c.responses >= 1:
            self._violate(
                c,
                "extra_response",
                errors.Internal(
                    f"{self.node_id}: the daemon sent more than one response to {c.method.name}"
                ),
            )
            return
        if c.credit is not None and not c.credit.receive():
            self._violate(
                c,
                "over_credit",
                errors.Internal(
                    f"{self.node_id}: the daemon sent {c.method.name} results beyond its credit"
                ),
            )
            return
        try:
            msg = c.method.response.FromString(data)
        except DecodeError:
            self._violate(
                c,
                "undecodable_result",
                errors.Internal(
                    f"{self.node_id}: the daemon's result for {c.method.name} does not decode"
                ),
            )
            return
        c.responses += 1
        c.put(msg)

    def _violate(self, c: _Call, kind: str, error: errors.FleetError) -> None:
        """The daemon broke the protocol on call `c`: fail it, stop it on the daemon."""
        self._on_violation(kind)
        log.warning("%s", error.message)
        c.done = True
        c.put(error)
        self._send_urgent(manager_pb2.Command(request_id=c.request_id, cancel=True))

    async def next_outgoing(self) -> manager_pb2.ConnectResponse | None:
        """The next message to write to the daemon; None once the session is closed."""
        while True:
            if self._closed is not None:
                return None
            if self._urgent:
                return self._urgent.popleft()
            if self._queue:
                msg = self._queue.popleft()
                self._dequeued += 1
                self._room.set()
                return msg
            self._wake.clear()
            await self._wake.wait()

    async def send_answer(self, msg: manager_pb2.ConnectResponse) -> None:
        """Queue an answer to the daemon, waiting for room (backpressure on its reader)."""
        while len(self._queue) >= self._config.max_queued_messages:
            if self._closed is not None:
                return
            self._room.clear()
            await self._room.wait()
        if self._closed is None:
            self._queue.append(msg)
            self._enqueued += 1
            self._wake.set()

    def close(self, reason: str, status: tuple[grpc.StatusCode, str] | None = None) -> None:
        """End the session: every call in flight fails UNAVAILABLE now.

        `status`, if given, is what the stream is ended with (e.g. replaced).
        """
        if self._closed is not None:
            return
        self._closed = reason
        self.end_status = status
        for c in self._calls.values():
            if not c.done:
                c.done = True
                c.put(self._closed_error(delivered=self._dequeued >= c.last_piece))
        self._wake.set()
        self._room.set()
        self.ended.set()

    # -- internals ----------------------------------------------------------

    def _closed_error(self, *, delivered: bool) -> StreamClosed:
        return StreamClosed(
            f"{self.node_id}: the node's control stream closed ({self._closed})",
            delivered=delivered,
        )

    def _start(
        self, name: str, request: Message, timeout: float | None, *, credit: int | None
    ) -> _Call:
        if self._closed is not None:
            raise self._closed_error(delivered=False)
        method = METHODS.get(name)
        if method is None or method.server_streaming != (credit is not None):
            raise errors.InvalidArgument(f"{name!r} is not a DaemonService call of this kind")
        if len(self._calls) >= self._config.max_in_flight_commands:
            raise errors.ResourceExhausted(
                f"{self.node_id}: {len(self._calls)} commands already in flight on its control "
                "stream (control.max_in_flight_commands); try again later"
            )
        data = request.SerializeToString()
        if len(data) > self._config.max_message_bytes:
            raise errors.InvalidArgument(
                f"{name} request of {len(data)} bytes is larger than control.max_message_bytes"
            )
        parts = list(pieces(data, PIECE_BYTES))
        if len(self._queue) + len(parts) > self._config.max_queued_messages:
            raise errors.ResourceExhausted(
                f"{self.node_id}: the daemon is not reading its control stream "
                f"({len(self._queue)} messages queued); try again later"
            )
        request_id = self._next_id
        self._next_id += 1
        c = _Call(request_id, method, self._config.max_message_bytes, credit)
        self._calls[request_id] = c
        for i, (piece, more) in enumerate(parts):
            cmd = manager_pb2.Command(request_id=request_id, request=piece, more=more)
            if i == 0:
                cmd.method = name
                cmd.timeout_seconds = timeout or 0.0
                cmd.credit = credit or 0
            self._queue.append(manager_pb2.ConnectResponse(command=cmd))
        self._enqueued += len(parts)
        c.last_piece = self._enqueued
        self._wake.set()
        return c

    def _send_urgent(self, cmd: manager_pb2.Command) -> None:
        if self._closed is None:
            self._urgent.append(manager_pb2.ConnectResponse(command=cmd))
            self._wake.set()

    @contextlib.asynccontextmanager
    async def _deadline(self, c: _Call, seconds: float | None) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(seconds):
                yield
        except TimeoutError:
            raise errors.DeadlineExceeded(
                f"{self.node_id}: daemon did not answer {c.method.name} within {seconds:g} s "
                "(over its control stream)"
            ) from None

    def _finish(self, c: _Call) -> None:
        """The caller is done with `c`: forget it, and stop it on the daemon if it runs."""
        self._calls.pop(c.request_id, None)
        if not c.done:  # deadline, caller cancelled or closed the generator early
            c.done = True
            self._send_urgent(manager_pb2.Command(request_id=c.request_id, cancel=True))


class ControlStreams:
    """This replica's open control streams, one session per node."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        on_change: Callable[[str], None] = lambda _: None,
    ) -> None:
        """`on_change(node_id)`: a node's stream here opened, was replaced or ended (the
        stream directory records it for the other replicas)."""
        self._clock = clock
        self._on_change = on_change
        self._sessions: dict[str, ControlSession] = {}
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}  # only while someone waits
        self.broken_at: dict[str, float] = {}
        """When each node's last stream here ended (cleared when it reconnects)."""
        self.opened_at: dict[str, float] = {}
        """When each connected node's current stream here opened."""
        self.quiet_until = 0.0
        """No node goes offline for a broken stream before this (the failover grace's end)."""
        self.replaced = 0
        """Streams ended because the same node opened a newer one."""
        self.closing = False
        """Every stream was ended (the manager is stopping): none attaches here again."""

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, node_id: str) -> ControlSession | None:
        """The open session of `node_id` on this replica, if any."""
        s = self._sessions.get(node_id)
        return s if s is not None and not s.closed else None

    def connected(self) -> list[str]:
        """Node ids with an open stream here."""
        return list(self._sessions)

    async def attached(self, node_id: str) -> ControlSession | None:
        """The open session of `node_id` here, waiting until one attaches if there is
        none (a call whose stream closed waits for the daemon to reconnect); None once
        the manager is stopping. Bound the wait with a timeout."""
        while (session := self.get(node_id)) is None:
            if self.closing:
                return None
            waiter = asyncio.get_running_loop().create_future()
            waiters = self._waiting.setdefault(node_id, [])
            waiters.append(waiter)
            try:
                await waiter
            finally:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiting[node_id]
        return session

    def rebase(self, step: float) -> None:
        """The wall clock was stepped by `step` s: move the times kept here with it, so a
        grace counts the time that passed, not the step."""
        for times in (self.opened_at, self.broken_at):
            for node_id in times:
                times[node_id] += step
        self.quiet_until += step

    def attach(self, session: ControlSession) -> bool:
        """`session`'s node is connected; an older stream of that node is ended (True)."""
        old = self._sessions.get(session.node_id)
        self._sessions[session.node_id] = session
        self.opened_at[session.node_id] = self._clock()
        self.broken_at.pop(session.node_id, None)
        self._on_change(session.node_id)
        for waiter in self._waiting.get(session.node_id, ()):
            if not waiter.done():
                waiter.set_result(None)
        if old is not None and old is not session:
            self.replaced += 1
            old.close(
                "replaced by a newer one",
                (grpc.StatusCode.ABORTED, "replaced by a newer control stream from the same node"),
            )
            return True
        return False

    def detach(self, session: ControlSession) -> None:
        """`session` ended; if it was its node's current stream, the grace starts."""
        # Said only if nothing said why first (replaced, broke, manager stopping): the
        # call ended, and the RPC can end here before the read loop says so.
        session.close(STREAM_ENDED)
        if self._sessions.get(session.node_id) is session:
            del self._sessions[session.node_id]
            self.opened_at.pop(session.node_id, None)
            self.broken_at[session.node_id] = self._clock()
            self._on_change(session.node_id)

    def close_all(self, reason: str) -> None:
        """End every session (manager stopping): calls in flight fail now, and calls
        waiting for a node to reconnect here stop waiting."""
        self.closing = True
        for s in list(self._sessions.values()):
            s.close(reason, (grpc.StatusCode.UNAVAILABLE, reason))
        for waiters in self._waiting.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
