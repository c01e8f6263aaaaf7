"""RESOURCE_EXHAUSTED from the manager: the daemon keeps the batch and retries it, in order.

The real manager answers RESOURCE_EXHAUSTED only when its writer queue is
full, which a test cannot bring about deterministically; so this test puts a
small fault-injecting ManagerService on a real mTLS server (manager identity)
that refuses the first ReportMetrics calls and records what it stores.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from daemon_helpers import eventually
from grpc import aio

from daemon.config import ManagerLinkConfig
from daemon.manager_link import ManagerLink, NodeInfo
from fleet.errors import ResourceExhausted
from fleet.interceptors import ErrorMappingInterceptor
from fleet.retry import Backoff
from fleet.tls import require_node, server_credentials
from fleet.v1 import common_pb2, manager_pb2, manager_pb2_grpc


class BusyManager(manager_pb2_grpc.ManagerServiceServicer):
    """Registers anyone, refuses the first `busy` metric batches, then stores them."""

    def __init__(self, busy: int) -> None:
        self.busy = busy
        self.refused: list[int] = []
        self.stored: list[int] = []

    async def RegisterNode(self, request: Any, context: Any) -> manager_pb2.RegisterNodeResponse:
        require_node(context, request.node_id)
        return manager_pb2.RegisterNodeResponse(success=True, heartbeat_interval_ms=1000)

    async def Heartbeat(self, request: Any, context: Any) -> manager_pb2.HeartbeatResponse:
        return manager_pb2.HeartbeatResponse(success=True, heartbeat_interval_ms=1000)

    async def SyncAgentStates(self, request: Any, context: Any) -> Any:
        return manager_pb2.SyncAgentStatesResponse(success=True)

    async def ReportMetrics(self, request: Any, context: Any) -> Any:
        require_node(context, request.node_id)
        if self.busy > 0:
            self.busy -= 1
            self.refused.append(request.sequence)
            raise ResourceExhausted("metric queue full; retry later")
        self.stored.append(request.sequence)
        return manager_pb2.ReportMetricsResponse(success=True, accepted=len(request.metrics))


@pytest.fixture
async def busy_manager(pki: Any) -> AsyncIterator[tuple[BusyManager, int]]:
    """A real mTLS gRPC server with the manager/m1 identity running BusyManager(busy=3)."""
    servicer = BusyManager(busy=3)
    server = aio.server(interceptors=[ErrorMappingInterceptor()])
    manager_pb2_grpc.add_ManagerServiceServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(pki.issue("manager", "m1")))
    await server.start()
    yield servicer, port
    await server.stop(None)


async def test_refused_batches_are_kept_and_retried_in_order(
    pki: Any, tmp_path: Any, busy_manager: tuple[BusyManager, int]
) -> None:
    """Three RESOURCE_EXHAUSTED answers later, every batch is stored once, in sequence order."""
    servicer, port = busy_manager
    link = _link(pki, tmp_path, port)
    for _ in range(4):
        link.cut_batch()
    await link.start()
    try:
        await eventually(lambda: _value(servicer.stored), lambda s: len(s) == 4, within=20)
    finally:
        await link.stop()
    assert servicer.refused == [1, 1, 1]
    assert servicer.stored == [1, 2, 3, 4]
    assert len(link.buffer) == 0
    assert link.buffer.dropped_batches == 0


async def _value(x: list[int]) -> list[int]:
    return list(x)


def _link(pki: Any, tmp_path: Any, port: int, **config: Any) -> ManagerLink:
    """A link to 127.0.0.1:port whose batches the test cuts by hand."""
    return ManagerLink(
        ManagerLinkConfig(
            addresses=(f"127.0.0.1:{port}",),
            metrics_interval_seconds=3600.0,
            reconnect=Backoff(initial=0.05, maximum=0.2),
            **config,
        ),
        tls=pki.issue("node", "n1"),
        trust_domain=pki.trust_domain,
        node=NodeInfo("n1", "127.0.0.1:7444", {}),
        state_dir=tmp_path,
        collect=lambda: [common_pb2.MetricData(type="cpu", timestamp=1, values={"v": 1.0})],
        snapshot=list,
    )


class SlowManager(BusyManager):
    """Like BusyManager, but the first `slow` batches outlast the caller's deadline."""

    def __init__(self, slow: int) -> None:
        super().__init__(busy=0)
        self.slow = slow
        self.registrations = 0

    async def RegisterNode(self, request: Any, context: Any) -> manager_pb2.RegisterNodeResponse:
        self.registrations += 1
        return await super().RegisterNode(request, context)

    async def ReportMetrics(self, request: Any, context: Any) -> Any:
        if self.slow > 0:
            self.slow -= 1
            self.refused.append(request.sequence)
            await asyncio.sleep(2.0)  # past the link's 0.3 s rpc timeout
        if request.sequence not in self.stored:  # the real manager dedupes too
            self.stored.append(request.sequence)
        return manager_pb2.ReportMetricsResponse(success=True, accepted=len(request.metrics))


async def test_a_slow_manager_is_not_treated_as_a_dead_one(pki: Any, tmp_path: Any) -> None:
    """Deadlines on metric batches back off on the same connection: no re-registration."""
    servicer = SlowManager(slow=3)
    server = aio.server(interceptors=[ErrorMappingInterceptor()])
    manager_pb2_grpc.add_ManagerServiceServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(pki.issue("manager", "m1")))
    await server.start()
    link = _link(pki, tmp_path, port, rpc_timeout_seconds=0.3)
    for _ in range(3):
        link.cut_batch()
    await link.start()
    try:
        await eventually(lambda: _value(servicer.stored), lambda s: len(s) == 3, within=20)
    finally:
        await link.stop()
        await server.stop(None)
    assert servicer.refused == [1, 1, 1]
    assert servicer.stored == [1, 2, 3]
    assert servicer.registrations == 1
    assert link.registrations == 1
