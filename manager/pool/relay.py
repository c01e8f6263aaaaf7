"""The pool's third transport: a command forwarded to the replica holding the node's stream.

With several manager replicas a daemon's control stream lives on one of
them. A command issued on another replica goes, replica to replica over the
manager's own mTLS port, to `ReplicaService` on the one holding the stream,
which runs it down the stream (`manager.servicers.replica`) and never
forwards it again. Channels to peer replicas are a `Channels` of their own
(keyed by replica id, the peer must present `manager/<replica id>`), so
they are opened lazily, bounded, watched and closed when idle like daemon
channels.

- The caller's deadline is the relayed call's gRPC deadline; the holding
  replica sends the daemon what remains of it.
- Cancelling (the caller's task, or closing a stream's generator) cancels
  the relayed call, which cancels the command on the node.
- Errors the holding replica answers pass through with their status,
  message and `Resource`; a peer that cannot be reached is said in words
  ("its control stream is on manager replica mb at ..., which refused the
  connection").
- Nothing is retried here. A relay that failed on the way (`PeerUnreachable`:
  the peer could not be reached; or the peer's own stream failed, which it
  says in trailing metadata) is a `TransportFailed` saying whether the
  command may have been delivered, and the pool decides whether to send it
  once more another way (`manager.pool.outcome`) and stops routing to a peer
  it could not reach.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, cast

import grpc
from google.protobuf.message import DecodeError, Message
from grpc import aio

from fleet.control import METHODS
from fleet.errors import (
    DeadlineExceeded,
    FleetError,
    Internal,
    InvalidArgument,
    Unavailable,
    from_rpc_error,
)
from fleet.reachability import Cause, cause, last_error
from fleet.v1 import replica_pb2
from manager.pool.channel import NodeRecord, never_sent, no_connection, wrong_peer
from manager.pool.channels import Channels
from manager.pool.config import PoolConfig
from manager.pool.outcome import TransportFailed, lost_from_metadata
from manager.pool.routing import Route
from manager.pool.transport import cancelled_by_caller, stream_budget

if TYPE_CHECKING:
    from collections.abc import Callable

    from fleet.v1.replica_pb2_grpc import ReplicaServiceAsyncStub

__all__ = ["PeerUnreachable", "RelayTransport", "translate_relay_error"]

_UNREACHABLE = {
    Cause.REFUSED: "refused the connection",
    Cause.NO_NAME: "has an address that does not resolve",
    Cause.TIMED_OUT: "did not complete the connection in time",
    Cause.CLOSED: "closed or reset the connection",
}


class PeerUnreachable(TransportFailed):
    """The replica holding the node's stream could not be reached (refused, timed
    out, not the replica meant, the connection broke under the call)."""

    def __init__(self, message: str, *, route: Route, delivered: bool) -> None:
        super().__init__(message, delivered=delivered)
        self.route = route
        """The route that failed: its replica gets no commands for a while."""


def translate_relay_error(
    error: aio.AioRpcError, *, node_id: str, route: Route, budget: float | None
) -> FleetError:
    """The FleetError for a relayed call to `node_id` through `route` that failed.

    What the holding replica answered passes through (its message already
    names the node); what kept us from reaching it is said in words, as a
    `PeerUnreachable` that says whether the call may have been delivered.
    """
    details = error.details() or ""
    code = error.code()
    where = f"manager replica {route.replica_id} at {route.address}"
    lost = lost_from_metadata(error.trailing_metadata())
    translated: FleetError
    if (
        budget is not None
        and code == grpc.StatusCode.DEADLINE_EXCEEDED
        # gRPC's own wording ("Deadline Exceeded", "Stream removed (Deadline Exceeded)"):
        # our deadline; the peer's own messages start with the node id.
        and not details.startswith(f"{node_id}: ")
    ):
        translated = DeadlineExceeded(
            f"{node_id}: no answer within {budget:g} s (relayed to {where}, "
            "which holds its control stream)"
        )
    elif code == grpc.StatusCode.UNAVAILABLE and lost is not None:
        # The peer's own stream to the node failed (or is not there): its words, our rule.
        # First: only the peer sets the trailer, whatever its message quotes.
        answered = from_rpc_error(error)
        translated = TransportFailed(answered.message, delivered=lost, resource=answered.resource)
    elif code == grpc.StatusCode.UNAVAILABLE and (why := wrong_peer(details)) is not None:
        what = (
            f"is not manager/{route.replica_id}"
            if why == "name"
            else "is not signed by the fleet CA"
        )
        translated = PeerUnreachable(
            f"{node_id}: its control stream is recorded on {where}, whose certificate {what} "
            "(a stale replica address?); try again",
            route=route,
            delivered=False,  # the handshake failed: nothing was sent
        )
    elif code == grpc.StatusCode.UNAVAILABLE and no_connection(details):
        words = _UNREACHABLE.get(cause(details)) or f"cannot be reached: {last_error(details)}"
        translated = PeerUnreachable(
            f"{node_id}: its control stream is on {where}, which {words}; the node "
            "reconnects to a live replica by itself, try again",
            route=route,
            delivered=not never_sent(details),
        )
    else:
        translated = from_rpc_error(error)
    translated.__cause__ = error  # gRPC's debug string stays in the log
    return translated


def _request(method: str, request: Message, *, streaming: bool) -> bytes:
    m = METHODS.get(method)
    if m is None or m.server_streaming != streaming:
        raise InvalidArgument(f"{method!r} is not a DaemonService call of this kind")
    return request.SerializeToString()


def _decode(method: str, data: bytes, node_id: str, route: Route) -> Message:
    try:
        return METHODS[method].response.FromString(data)
    except DecodeError:
        raise Internal(
            f"{node_id}: the {method} result relayed by manager replica {route.replica_id} "
            "does not decode"
        ) from None


class RelayTransport:
    """Calls forwarded to the peer replica `route` names, which holds the node's stream."""

    def __init__(
        self,
        channels: Channels,
        config: PoolConfig,
        route: Route,
        record: NodeRecord,
        *,
        on_done: Callable[[grpc.StatusCode], None] = lambda _: None,
    ) -> None:
        self._channels = channels
        self._config = config
        self.route = route
        """The replica this transport relays to."""
        self._record = record
        self._peer = channels.record(route.replica_id)  # the peer's own counters
        self._on_done = on_done

    def _count(self, failed: bool) -> None:
        for record in (self._record, self._peer):
            if failed:
                record.failures += 1
            else:
                record.calls += 1

    def _cut_off(self, node_id: str) -> Unavailable:
        return Unavailable(
            f"{node_id}: the call relayed to manager replica {self.route.replica_id} was cut "
            "off: its channel was closed (pool closed)"
        )

    async def unary(
        self,
        node_id: str,
        address: str,
        method: str,
        request: Message,
        *,
        idempotent: bool,
        call_timeout: float | None,
    ) -> Message:
        loop = asyncio.get_running_loop()
        budget = self._config.call_timeout if call_timeout is None else call_timeout
        deadline = loop.time() + budget
        route = self.route
        self._count(failed=False)
        code = grpc.StatusCode.OK
        try:
            body = _request(method, request, streaming=False)
            channel = await self._channels.acquire(route.replica_id, route.address, deadline)
            try:
                stub = cast("ReplicaServiceAsyncStub", channel.stub)
                reply = await stub.Relay(
                    replica_pb2.RelayRequest(
                        node_id=node_id, method=method, request=body, replica_id=route.replica_id
                    ),
                    timeout=max(0.0, deadline - loop.time()),
                )
            except aio.AioRpcError as exc:
                raise translate_relay_error(
                    exc, node_id=node_id, route=route, budget=budget
                ) from None
            except asyncio.CancelledError:
                if cancelled_by_caller():
                    code = grpc.StatusCode.CANCELLED
                    raise
                raise self._cut_off(node_id) from None
            finally:
                self._channels.release(channel)
            return _decode(method, reply.response, node_id, route)
        except FleetError as exc:
            self._count(failed=True)
            code = exc.code
            raise
        finally:
            self._on_done(code)

    async def stream(
        self,
        node_id: str,
        address: str,
        method: str,
        request: Message,
        *,
        follow: bool,
        call_timeout: float | None,
    ) -> AsyncGenerator[Message, None]:
        loop = asyncio.get_running_loop()
        budget = stream_budget(self._config, follow=follow, call_timeout=call_timeout)
        start_deadline = loop.time() + (budget or self._config.call_timeout)
        route = self.route
        self._count(failed=False)
        code = grpc.StatusCode.OK
        try:
            body = _request(method, request, streaming=True)
            channel = await self._channels.acquire(route.replica_id, route.address, start_deadline)
            stub = cast("ReplicaServiceAsyncStub", channel.stub)
            call = stub.RelayStream(
                replica_pb2.RelayStreamRequest(
                    node_id=node_id, method=method, request=body, replica_id=route.replica_id
                ),
                timeout=budget,
            )
            try:
                async for reply in call:
                    yield _decode(method, reply.response, node_id, route)
            except aio.AioRpcError as exc:
                raise translate_relay_error(
                    exc, node_id=node_id, route=route, budget=budget
                ) from None
            except asyncio.CancelledError:
                if cancelled_by_caller():
                    code = grpc.StatusCode.CANCELLED
                    raise
                raise self._cut_off(node_id) from None
            finally:
                # A reader that leaves early (GeneratorExit) ends the call on the peer,
                # which cancels the command on the node.
                call.cancel()
                self._channels.release(channel)
        except FleetError as exc:
            self._count(failed=True)
            code = exc.code
            raise
        except GeneratorExit:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self._on_done(code)
