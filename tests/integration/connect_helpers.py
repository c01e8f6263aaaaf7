"""A small Connect server for the daemon's control-channel tests.

The real manager's Connect is built in parallel (branch i15-manager); until
it lands these tests run the daemon against this one: a real grpc.aio server
with a manager certificate, implementing Connect with the generated base
class, storing metric batches once by sequence as the manager does, and
letting the test send commands and read their results.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc import aio

from fleet.control import Reassembler, pieces
from fleet.interceptors import ErrorMappingInterceptor
from fleet.tls import TLSConfig, require_node, require_role, server_credentials
from fleet.v1 import manager_pb2, manager_pb2_grpc

M = manager_pb2


@dataclass
class CallResult:
    """What came back for one command."""

    responses: list[bytes] = field(default_factory=list)
    """Each reassembled response message."""
    code: int | None = None
    """The end's status code (None: not ended yet)."""
    message: str = ""
    joiner: Reassembler = field(default_factory=lambda: Reassembler(64 * 1024 * 1024))


class ConnectManager(manager_pb2_grpc.ManagerServiceServicer):
    """Serves Connect and the unary RPCs, for one node at a time.

    `answer_metrics=False` leaves metric batches unanswered (a manager that
    did not store them); `refuse` maps a request field to a ConnectError code.
    """

    def __init__(self) -> None:
        self.hellos: list[M.RegisterNodeRequest] = []
        self.registrations: list[M.RegisterNodeRequest] = []
        self.heartbeats = 0
        self.stored: list[int] = []
        self.received: list[int] = []
        self.snapshots: list[M.SyncAgentStatesRequest] = []
        self.answer_metrics = True
        self.refuse: dict[str, int] = {}
        self.results: dict[int, CallResult] = {}
        self.streams = 0
        self.changed = asyncio.Event()
        self._out: asyncio.Queue[M.ConnectResponse | None] | None = None
        self._next = 0

    # --- unary (the original design) --------------------------------------

    async def RegisterNode(self, request: Any, context: Any) -> M.RegisterNodeResponse:
        require_node(context, request.node_id)
        self.registrations.append(request)
        return M.RegisterNodeResponse(success=True, heartbeat_interval_ms=300)

    async def Heartbeat(self, request: Any, context: Any) -> M.HeartbeatResponse:
        require_node(context, request.node_id)
        self.heartbeats += 1
        return M.HeartbeatResponse(success=True, heartbeat_interval_ms=300)

    async def SyncAgentStates(self, request: Any, context: Any) -> M.SyncAgentStatesResponse:
        require_node(context, request.node_id)
        self.snapshots.append(request)
        return M.SyncAgentStatesResponse(success=True)

    async def ReportMetrics(self, request: Any, context: Any) -> M.ReportMetricsResponse:
        require_node(context, request.node_id)
        return self._store(request)

    # --- the control channel ------------------------------------------------

    async def Connect(
        self, request_iterator: AsyncIterator[M.ConnectRequest], context: Any
    ) -> AsyncIterator[M.ConnectResponse]:
        identity = require_role(context, "node")
        out: asyncio.Queue[M.ConnectResponse | None] = asyncio.Queue()
        self._out = out
        self.streams += 1
        reader = asyncio.create_task(self._read(request_iterator, out, identity.name))
        try:
            while (message := await out.get()) is not None:
                yield message
        finally:
            reader.cancel()
            if self._out is out:
                self._out = None

    async def _read(
        self,
        requests: AsyncIterator[M.ConnectRequest],
        out: asyncio.Queue[M.ConnectResponse | None],
        node: str,
    ) -> None:
        try:
            async for req in requests:
                self._answer(req, out, node)
                self.changed.set()
        except Exception:  # the stream broke: the handler ends
            pass
        out.put_nowait(None)

    def _answer(
        self, req: M.ConnectRequest, out: asyncio.Queue[M.ConnectResponse | None], node: str
    ) -> None:
        body = req.WhichOneof("body")
        if body == "hello" and req.hello.node_id != node:
            self.refuse["hello"] = grpc.StatusCode.PERMISSION_DENIED.value[0]
        if body in self.refuse:
            out.put_nowait(
                M.ConnectResponse(
                    reply_to=req.id,
                    error=M.ConnectError(code=self.refuse[body], message=f"{body} refused"),
                )
            )
            return
        if body == "hello":
            self.hellos.append(req.hello)
            out.put_nowait(
                M.ConnectResponse(reply_to=req.id, welcome=M.RegisterNodeResponse(success=True))
            )
        elif body == "metrics":
            self.received.append(req.metrics.sequence)
            if self.answer_metrics:
                out.put_nowait(M.ConnectResponse(reply_to=req.id, metrics=self._store(req.metrics)))
        elif body == "agent_states":
            self.snapshots.append(req.agent_states)
            out.put_nowait(
                M.ConnectResponse(
                    reply_to=req.id, agent_states=M.SyncAgentStatesResponse(success=True)
                )
            )
        elif body == "result":
            r = req.result
            got = self.results.setdefault(r.request_id, CallResult())
            if r.end:
                got.code, got.message = r.code, r.message
            else:
                whole = got.joiner.add(r.response, r.more)
                if whole is not None:
                    got.responses.append(whole)

    def _store(self, request: M.ReportMetricsRequest) -> M.ReportMetricsResponse:
        duplicate = request.sequence in self.stored
        if not duplicate:
            self.stored.append(request.sequence)
        return M.ReportMetricsResponse(success=True, duplicate=duplicate)

    # --- for the test -----------------------------------------------------------

    @property
    def open(self) -> bool:
        """A stream is open."""
        return self._out is not None

    def command(
        self,
        method: str,
        request: Message | bytes,
        *,
        credit: int = 0,
        timeout: float = 0.0,
        piece: int | None = None,
    ) -> int:
        """Send a command (in pieces of `piece` bytes); its request id."""
        assert self._out is not None, "no stream is open"
        self._next += 1
        data = request if isinstance(request, bytes) else request.SerializeToString()
        parts = list(pieces(data, piece)) if piece else list(pieces(data))
        for i, (chunk, more) in enumerate(parts):
            self._out.put_nowait(
                M.ConnectResponse(
                    command=M.Command(
                        request_id=self._next,
                        method=method if i == 0 else "",
                        request=chunk,
                        more=more,
                        credit=credit if i == 0 else 0,
                        timeout_seconds=timeout if i == 0 else 0.0,
                    )
                )
            )
        return self._next

    def grant(self, request_id: int, credit: int) -> None:
        """Allow `credit` more result messages for `request_id`."""
        assert self._out is not None
        self._out.put_nowait(
            M.ConnectResponse(command=M.Command(request_id=request_id, credit=credit))
        )

    def cancel(self, request_id: int) -> None:
        """Cancel `request_id`."""
        assert self._out is not None
        cancel = M.Command(request_id=request_id, cancel=True)
        self._out.put_nowait(M.ConnectResponse(command=cancel))

    async def wait(self, probe: Any, *, within: float = 15.0) -> Any:
        """Wait until `probe()` is truthy (re-checked on every message and every 50 ms)."""
        async with asyncio.timeout(within):
            while not (value := probe()):
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await self.changed.wait()
            return value

    async def ended(self, request_id: int, *, within: float = 15.0) -> CallResult:
        """The result of `request_id` once it ended."""
        result: CallResult = await self.wait(
            lambda: (r := self.results.get(request_id)) is not None and r.code is not None and r,
            within=within,
        )
        return result


async def serve(tls: TLSConfig, servicer: ConnectManager, port: int = 0) -> tuple[aio.Server, int]:
    """`servicer` on a real mTLS server on 127.0.0.1 (`port`, 0: any); started."""
    server = aio.server(interceptors=[ErrorMappingInterceptor()])
    manager_pb2_grpc.add_ManagerServiceServicer_to_server(servicer, server)
    bound = server.add_secure_port(f"127.0.0.1:{port}", server_credentials(tls))
    await server.start()
    return server, bound


class OlderManager(ConnectManager):
    """A manager from before the control channel: Connect is the generated base's
    (UNIMPLEMENTED), the unary RPCs are served."""

    Connect = manager_pb2_grpc.ManagerServiceServicer.Connect  # type: ignore[assignment]
