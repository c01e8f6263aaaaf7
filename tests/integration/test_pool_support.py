"""Fakes and fixtures shared by the test_pool_* modules (no tests here).

A tiny DaemonService per simulated daemon, each with its own node
certificate, on 127.0.0.1:0 with mTLS; pools holding a manager certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from grpc import aio

from fleet import errors
from fleet.interceptors import ErrorMappingInterceptor
from fleet.retry import Backoff
from fleet.tls import TLSConfig, require_role, server_credentials
from fleet.v1 import common_pb2, daemon_pb2, daemon_pb2_grpc
from manager.pool import ConnectionState, DaemonPool, PoolConfig

S = ConnectionState
FAST_RETRY = Backoff(initial=0.05, multiplier=2.0, maximum=0.2)


@dataclass
class FakeDaemon(daemon_pb2_grpc.DaemonServiceServicer):
    """A tiny DaemonService: records callers, can fail or stall on request."""

    node_id: str
    peers: list[str] = field(default_factory=list)
    callers: list[str] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    fail_next: int = 0
    """Answer this many calls UNAVAILABLE before serving."""
    stall: float = 0.0
    """Sleep this long in every unary call."""
    log_chunks: tuple[bytes, ...] = (b"line 1\n", b"line 2\n")
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the first call arrived."""

    async def _enter(self, method: str, context: Any) -> None:
        caller = require_role(context, "manager")  # as the real daemon: managers only
        self.callers.append(str(caller))
        self.peers.append(context.peer())
        self.calls.append(method)
        self.entered.set()
        if self.fail_next > 0:
            self.fail_next -= 1
            raise errors.Unavailable("daemon is warming up")
        if self.stall:
            await asyncio.sleep(self.stall)

    async def ListAgents(self, request: Any, context: Any) -> daemon_pb2.ListAgentsResponse:
        await self._enter("ListAgents", context)
        agent = common_pb2.AgentInfo(
            id=f"{self.node_id}-web", status=common_pb2.AGENT_STATUS_RUNNING
        )
        return daemon_pb2.ListAgentsResponse(agents=[agent])

    async def OperateAgent(self, request: Any, context: Any) -> daemon_pb2.OperateAgentResponse:
        await self._enter(f"OperateAgent:{request.operation}", context)
        return daemon_pb2.OperateAgentResponse(success=True)

    async def GetAgentMetrics(
        self, request: Any, context: Any
    ) -> daemon_pb2.GetAgentMetricsResponse:
        await self._enter("GetAgentMetrics", context)
        point = common_pb2.ResourceDataPoint(timestamp=1, cpu=12.5)
        return daemon_pb2.GetAgentMetricsResponse(agent_id=request.agent_id, data_points=[point])

    async def PushUpdate(self, request: Any, context: Any) -> daemon_pb2.PushUpdateResponse:
        await self._enter("PushUpdate", context)
        return daemon_pb2.PushUpdateResponse(success=True, version=request.version)

    async def ReadAgentLog(
        self, request: Any, context: Any
    ) -> AsyncIterator[daemon_pb2.ReadAgentLogResponse]:
        await self._enter("ReadAgentLog", context)
        offset = 0
        for chunk in self.log_chunks:
            yield daemon_pb2.ReadAgentLogResponse(
                data=chunk, offset=offset, next_offset=offset + len(chunk)
            )
            offset += len(chunk)
        if request.follow:
            await asyncio.Event().wait()  # nothing more is ever written


@dataclass
class Daemon:
    """One running simulated daemon."""

    node_id: str
    address: str
    servicer: FakeDaemon
    server: aio.Server

    @property
    def client_ports(self) -> set[str]:
        """The client ports its callers connected from."""
        return {peer.rsplit(":", 1)[1] for peer in self.servicer.peers}


StartDaemon = Callable[..., Awaitable[Daemon]]


@contextlib.asynccontextmanager
async def running_daemons(pki: Any) -> AsyncIterator[StartDaemon]:
    """Start simulated daemons, each with its own node certificate; all stopped on exit."""
    servers: list[aio.Server] = []

    async def start(
        node_id: str, *, tls: TLSConfig | None = None, port: int = 0, **behaviour: Any
    ) -> Daemon:
        servicer = FakeDaemon(node_id, **behaviour)
        server = aio.server(interceptors=[ErrorMappingInterceptor()])
        daemon_pb2_grpc.add_DaemonServiceServicer_to_server(servicer, server)
        bound = server.add_secure_port(
            f"127.0.0.1:{port}", server_credentials(tls or pki.issue("node", node_id))
        )
        await server.start()
        servers.append(server)
        return Daemon(node_id, f"127.0.0.1:{bound}", servicer, server)

    try:
        yield start
    finally:
        for server in servers:
            await server.stop(None)


MakePool = Callable[..., DaemonPool]


@contextlib.asynccontextmanager
async def pools(pki: Any, manager_tls: TLSConfig) -> AsyncIterator[MakePool]:
    """Make pools holding the manager's certificate; all closed on exit."""
    made: list[DaemonPool] = []

    def make(**config: Any) -> DaemonPool:
        config.setdefault("retry", FAST_RETRY)
        pool = DaemonPool(manager_tls, pki.trust_domain, config=PoolConfig(**config))
        made.append(pool)
        return pool

    try:
        yield make
    finally:
        for pool in made:
            await pool.close()


def free_port() -> int:
    """A loopback port nobody listens on (for now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
