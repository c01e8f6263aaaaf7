"""ReplicaService: a peer replica's command for a node whose control stream is here.

Identity first (`manager/*` of our trust domain; nodes and operators get
PERMISSION_DENIED before anything is read), then the request is checked
(a DaemonService method of the right kind, a request that decodes, meant for
this replica) and run on this replica's own stream of the node through the
pool's local-only path (`DaemonPool.local_unary` / `local_stream`): never
relayed again, so two replicas with crossed records cannot bounce a command
between them. No stream here is UNAVAILABLE, which the caller reads as
"look again". The caller's deadline is the call's: `time_remaining()` goes
down the stream as the command's timeout (a unary one's less `ANSWER_MARGIN`,
so the calling replica reads our words about a slow daemon before its own
deadline); a cancelled call cancels the command on the node.

When the way to the node fails here (no stream, the stream closed under the
call) the error carries `fleet-transport-failed` (`manager.pool.outcome`):
whether the command may have reached the daemon, so the calling replica can
decide whether to send it again another way.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, NoReturn

from google.protobuf.message import DecodeError, Message
from grpc import aio

from fleet.control import METHODS
from fleet.errors import InvalidArgument
from fleet.interceptors import bounded
from fleet.tls import require_role
from fleet.v1 import replica_pb2, replica_pb2_grpc
from manager.pool import DaemonPool
from manager.pool.outcome import TransportFailed
from manager.servicers.deadline import pool_budget

__all__ = ["ReplicaServicer"]

_Context = aio.ServicerContext[Any, Any]


def _budget(context: _Context) -> float | None:
    """A relayed unary command's timeout: the caller's deadline, less the answer's margin."""
    remaining: float | None = context.time_remaining()  # None: the caller set none
    return None if remaining is None else pool_budget(remaining, remaining)


class ReplicaServicer(replica_pb2_grpc.ReplicaServiceServicer):
    """Runs relayed DaemonService calls on this replica's control streams."""

    def __init__(self, pool: DaemonPool, *, replica_id: str, trust_domain: str) -> None:
        self._pool = pool
        self._replica_id = replica_id
        self._td = trust_domain

    def _check(
        self,
        context: _Context,
        node_id: str,
        method: str,
        data: bytes,
        replica_id: str,
        *,
        streaming: bool,
    ) -> Message:
        require_role(context, "manager", trust_domain=self._td)
        if not node_id:
            raise InvalidArgument("must name the node", field="node_id")
        m = METHODS.get(method)
        if m is None or m.server_streaming != streaming:
            kinds = sorted(n for n, x in METHODS.items() if x.server_streaming == streaming)
            shown = method if len(method) <= 64 else method[:64] + "..."
            raise InvalidArgument(
                f"{shown!r} is not a {'server-streaming' if streaming else 'unary'} "
                f"DaemonService method (one of {', '.join(kinds)})",
                field="method",
            )
        if replica_id and replica_id != self._replica_id:
            raise TransportFailed(
                f"{node_id}: this is manager replica {self._replica_id or '(unnamed)'}, not "
                f"{replica_id[:64]}: the route was stale; try again",
                delivered=False,
            )
        try:
            return m.request.FromString(data)
        except DecodeError:
            raise InvalidArgument(
                f"does not decode as {m.request.DESCRIPTOR.name}", field="request"
            ) from None

    async def Relay(
        self, request: replica_pb2.RelayRequest, context: _Context
    ) -> replica_pb2.RelayResponse:
        try:
            message = self._check(
                context,
                request.node_id,
                request.method,
                request.request,
                request.replica_id,
                streaming=False,
            )
            response = await self._pool.local_unary(
                request.node_id, request.method, message, call_timeout=_budget(context)
            )
        except TransportFailed as exc:
            await _abort_lost(context, exc)
        return replica_pb2.RelayResponse(response=response.SerializeToString())

    async def RelayStream(
        self, request: replica_pb2.RelayStreamRequest, context: _Context
    ) -> AsyncIterator[replica_pb2.RelayStreamResponse]:
        try:
            message = self._check(
                context,
                request.node_id,
                request.method,
                request.request,
                request.replica_id,
                streaming=True,
            )
            stream = self._pool.local_stream(
                request.node_id, request.method, message, call_timeout=context.time_remaining()
            )
            # aclosing: the caller going away cancels the command on the node at once.
            async with contextlib.aclosing(stream):
                async for response in stream:
                    yield replica_pb2.RelayStreamResponse(response=response.SerializeToString())
        except TransportFailed as exc:
            await _abort_lost(context, exc)


async def _abort_lost(context: _Context, exc: TransportFailed) -> NoReturn:
    """End the call UNAVAILABLE, saying in its trailers whether the command may have
    reached the daemon (the interceptor would send only the Resource)."""
    await context.abort(exc.code, bounded(exc.message), trailing_metadata=exc.metadata())
    raise AssertionError("unreachable: abort raises")  # for the type checker
