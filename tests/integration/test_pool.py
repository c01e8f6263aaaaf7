"""The manager's daemon pool against real mTLS DaemonService servers on loopback."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from grpc import aio

from fleet import errors
from fleet.interceptors import ErrorMappingInterceptor
from fleet.pki import CertificateAuthority
from fleet.retry import Backoff
from fleet.tls import TLSConfig, require_role, server_credentials
from fleet.v1 import common_pb2, daemon_pb2, daemon_pb2_grpc
from manager.pool import ConnectionState, DaemonPool, PoolConfig, WrongDaemonIdentity

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


@pytest.fixture
async def start_daemon(pki: Any) -> AsyncIterator[StartDaemon]:
    """Start simulated daemons, each with its own node certificate; all stopped after."""
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

    yield start
    for server in servers:
        await server.stop(None)


MakePool = Callable[..., DaemonPool]


@pytest.fixture
def manager_tls(pki: Any) -> TLSConfig:
    """The manager's certificate files (manager/m1)."""
    tls: TLSConfig = pki.issue("manager", "m1")
    return tls


@pytest.fixture
async def make_pool(pki: Any, manager_tls: TLSConfig) -> AsyncIterator[MakePool]:
    """Pools holding the manager's certificate; each closed after the test."""
    pools: list[DaemonPool] = []

    def make(**config: Any) -> DaemonPool:
        config.setdefault("retry", FAST_RETRY)
        pool = DaemonPool(manager_tls, pki.trust_domain, config=PoolConfig(**config))
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_channel_is_opened_on_first_call(
    start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """No channel exists until a daemon is first called; then it is READY."""
    daemon = await start_daemon("node-1")
    pool = make_pool()
    assert pool.open_channels == 0
    assert pool.state("node-1") is S.IDLE
    assert pool.stats() == {}

    reply = await pool.list_agents("node-1", daemon.address)

    assert [a.id for a in reply.agents] == ["node-1-web"]
    assert pool.open_channels == 1
    async with asyncio.timeout(5):
        await pool.wait_for_state("node-1", S.READY)
    stats = pool.stats()["node-1"]
    assert (stats.calls, stats.failures, stats.connections) == (1, 0, 1)
    assert stats.history[:3] == (S.IDLE, S.CONNECTING, S.READY)


async def test_every_daemon_gets_its_own_connection(
    start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """Many calls to three daemons use exactly one connection (client port) per daemon."""
    daemons = [await start_daemon(f"node-{i}") for i in range(3)]
    pool = make_pool()

    await asyncio.gather(
        *(pool.list_agents(d.node_id, d.address) for d in daemons for _ in range(5))
    )
    await asyncio.gather(*(pool.list_agents(d.node_id, d.address) for d in daemons))

    ports = [d.client_ports for d in daemons]
    assert all(len(p) == 1 for p in ports), ports
    assert len(set.union(*ports)) == 3
    assert pool.connections_opened == 3
    args = {dict(s.channel_args)["fleet.node_id"] for s in pool.stats().values()}
    assert args == {"node-0", "node-1", "node-2"}


async def test_two_nodes_at_one_address_do_not_share_a_connection(
    pki: Any, start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """Two node ids served at the same address still get two separate connections."""
    both = pki.issue("node", "node-a", hostnames=["node-b.node.fleet.local"])
    daemon = await start_daemon("node-a", tls=both)
    pool = make_pool()

    await pool.list_agents("node-a", daemon.address)
    await pool.list_agents("node-b", daemon.address)
    await pool.list_agents("node-a", daemon.address)

    assert len(daemon.client_ports) == 2
    assert pool.connections_opened == 2


async def test_daemon_with_another_nodes_certificate_is_refused(
    pki: Any, start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """A daemon presenting node-3's certificate where node-7 was meant fails clearly, untried."""
    impostor = await start_daemon("node-3")
    pool = make_pool()

    with pytest.raises(WrongDaemonIdentity) as info:
        await pool.list_agents("node-7", impostor.address)

    assert str(info.value) == (
        f"node-7 at {impostor.address} presented a certificate that is not node/node-7"
    )
    assert isinstance(info.value, errors.Unavailable)
    assert impostor.servicer.calls == []
    assert pool.stats()["node-7"].retries == 0
    assert pool.state("node-7") is S.IDLE  # no handshakes with the impostor in the background
    assert pool.open_channels == 0


async def test_daemon_certificate_from_another_ca_is_refused(
    tmp_path: Any, start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """A daemon whose certificate another CA signed is refused, naming the fleet CA."""
    foreign = CertificateAuthority.create().issue("node", "node-7").write(tmp_path / "foreign")
    daemon = await start_daemon("node-7", tls=foreign)
    pool = make_pool()

    with pytest.raises(WrongDaemonIdentity, match="not signed by the fleet CA"):
        await pool.list_agents("node-7", daemon.address)
    assert daemon.servicer.calls == []


async def test_unavailable_is_retried_for_idempotent_calls(
    start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """ListAgents, GetAgentMetrics and start/stop succeed after transient UNAVAILABLE answers."""
    daemon = await start_daemon("node-1", fail_next=2)
    pool = make_pool(max_attempts=4)

    reply = await pool.list_agents("node-1", daemon.address)
    assert len(reply.agents) == 1
    assert daemon.servicer.calls == ["ListAgents"] * 3

    daemon.servicer.fail_next = 1
    metrics = await pool.get_agent_metrics("node-1", daemon.address, "web", 60)
    assert metrics.data_points[0].cpu == 12.5

    for op in (common_pb2.AGENT_OPERATION_START, common_pb2.AGENT_OPERATION_STOP):
        daemon.servicer.fail_next = 1
        assert (await pool.operate_agent("node-1", daemon.address, "web", op)).success
    stats = pool.stats()["node-1"]
    assert (stats.calls, stats.retries, stats.failures) == (4, 5, 0)


async def test_unavailable_is_not_retried_for_restart_or_push_update(
    start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """A restart or an update that met UNAVAILABLE is reported, never sent twice."""
    daemon = await start_daemon("node-1", fail_next=1)
    pool = make_pool(max_attempts=4)

    with pytest.raises(errors.Unavailable, match=r"^node-1: daemon is warming up$"):
        await pool.operate_agent(
            "node-1", daemon.address, "web", common_pb2.AGENT_OPERATION_RESTART
        )
    daemon.servicer.fail_next = 1
    with pytest.raises(errors.Unavailable):
        await pool.push_update("node-1", daemon.address, 2, [common_pb2.AgentSpec(id="web")])

    assert daemon.servicer.calls == [
        f"OperateAgent:{common_pb2.AGENT_OPERATION_RESTART}",
        "PushUpdate",
    ]
    assert pool.stats()["node-1"].retries == 0


async def test_retries_stop_after_max_attempts(
    start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """An idempotent call gives up after max_attempts and says the daemon is unavailable."""
    daemon = await start_daemon("node-1", fail_next=10)
    pool = make_pool(max_attempts=3)

    with pytest.raises(errors.Unavailable, match=r"^node-1: daemon is warming up$"):
        await pool.list_agents("node-1", daemon.address)
    assert len(daemon.servicer.calls) == 3
    assert pool.state("node-1") is S.READY  # the daemon answered: the connection is kept
    assert pool.open_channels == 1


async def test_unsupported_operation_is_refused_without_a_call(
    start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """An unspecified operation is INVALID_ARGUMENT and never reaches the daemon."""
    daemon = await start_daemon("node-1")
    pool = make_pool()
    with pytest.raises(errors.InvalidArgument, match="operation: unsupported"):
        await pool.operate_agent(
            "node-1",
            daemon.address,
            "web",
            common_pb2.AgentOperation.Value("AGENT_OPERATION_UNSPECIFIED"),
        )
    assert daemon.servicer.calls == []
    assert pool.open_channels == 0


async def test_missing_address_is_a_clear_error(make_pool: MakePool) -> None:
    """A node without a daemon address fails with FAILED_PRECONDITION naming the node."""
    pool = make_pool()
    with pytest.raises(errors.FailedPrecondition, match=r"^node-9: no daemon address known"):
        await pool.list_agents("node-9", "")


async def test_daemon_that_comes_up_later_is_reached_by_retries(
    start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """A call started while the daemon's port is closed succeeds once it starts listening."""
    port = _free_port()
    pool = make_pool(max_attempts=50, call_timeout=10.0)
    call = asyncio.create_task(pool.list_agents("node-1", f"127.0.0.1:{port}"))
    async with asyncio.timeout(5):
        await pool.wait_for_state("node-1", S.RECONNECTING)
    await start_daemon("node-1", port=port)

    reply = await call

    assert len(reply.agents) == 1
    stats = pool.stats()["node-1"]
    assert stats.retries >= 1
    assert stats.state is S.READY
    assert S.RECONNECTING in stats.history
    assert stats.history[-1] is S.READY


async def test_dead_daemon_fails_fast_and_the_channel_is_given_up(make_pool: MakePool) -> None:
    """Nobody listening: UNAVAILABLE naming the node, then the channel goes back to IDLE."""
    address = f"127.0.0.1:{_free_port()}"
    pool = make_pool(max_attempts=3)
    started = time.monotonic()

    with pytest.raises(errors.Unavailable, match=r"^node-1: failed to connect"):
        await pool.list_agents("node-1", address)

    assert time.monotonic() - started < 5
    stats = pool.stats()["node-1"]
    assert stats.state is S.IDLE
    assert stats.history == (S.IDLE, S.CONNECTING, S.RECONNECTING, S.IDLE)
    assert (stats.failures, stats.reconnects) == (1, 1)
    assert pool.open_channels == 0


async def test_connect_timeout_bounds_a_stuck_handshake(make_pool: MakePool) -> None:
    """A peer that takes TCP but never answers TLS fails after connect_timeout, not call_timeout."""
    with socket.socket() as mute:  # the kernel completes TCP handshakes; nobody reads
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        port = mute.getsockname()[1]
        pool = make_pool(connect_timeout=0.5, call_timeout=20.0, max_attempts=1)
        started = time.monotonic()
        with pytest.raises(errors.Unavailable, match=r"^node-1: "):
            await pool.list_agents("node-1", f"127.0.0.1:{port}")
        assert time.monotonic() - started < 5
        await pool.close()


async def test_call_deadline_is_honoured(start_daemon: StartDaemon, make_pool: MakePool) -> None:
    """A daemon that stalls past call_timeout gives DEADLINE_EXCEEDED quickly, not retried."""
    daemon = await start_daemon("node-1", stall=10.0)
    pool = make_pool(call_timeout=0.3)
    started = time.monotonic()

    with pytest.raises(errors.DeadlineExceeded) as info:
        await pool.list_agents("node-1", daemon.address)
    assert str(info.value) == (
        f"node-1: no answer from {daemon.address} within 0.3 s (Deadline Exceeded)"
    )

    assert time.monotonic() - started < 2
    assert daemon.servicer.calls == ["ListAgents"]


async def test_per_call_timeout_overrides_the_default(
    start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """call_timeout on one call bounds that call even when the pool default is long."""
    daemon = await start_daemon("node-1", stall=10.0)
    pool = make_pool(call_timeout=30.0)
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded):
        await pool.get_agent_metrics("node-1", daemon.address, "web", 60, call_timeout=0.2)
    assert time.monotonic() - started < 2


async def test_stopped_daemon_leaves_ready(start_daemon: StartDaemon, make_pool: MakePool) -> None:
    """When the daemon goes away the connection leaves READY, and calls report it."""
    daemon = await start_daemon("node-1")
    pool = make_pool(max_attempts=2)
    await pool.list_agents("node-1", daemon.address)
    async with asyncio.timeout(5):
        await pool.wait_for_state("node-1", S.READY)

    await daemon.server.stop(None)
    async with asyncio.timeout(5):
        await pool.wait_for_state("node-1", S.IDLE, S.RECONNECTING)
    with pytest.raises(errors.Unavailable, match=r"^node-1: "):
        await pool.list_agents("node-1", daemon.address)
    assert pool.state("node-1") is S.IDLE


async def test_idle_channel_is_closed_by_the_reaper(
    start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """A channel unused for idle_close_after is closed, and reopened by the next call."""
    daemon = await start_daemon("node-1")
    pool = make_pool(idle_close_after=0.3)
    await pool.list_agents("node-1", daemon.address)
    async with asyncio.timeout(5):
        await pool.wait_for_state("node-1", S.READY)

    async with asyncio.timeout(5):
        await pool.wait_for_state("node-1", S.IDLE)
    assert pool.open_channels == 0

    await pool.list_agents("node-1", daemon.address)
    assert pool.channels_opened == 2
    assert len(daemon.client_ports) == 2


async def test_idle_close_follows_the_pool_clock(pki: Any, start_daemon: StartDaemon) -> None:
    """reap_idle closes channels idle per the injected clock, never one with a stream open."""
    now = [1000.0]
    a = await start_daemon("node-a")
    b = await start_daemon("node-b")
    async with DaemonPool(
        pki.issue("manager", "m1"),
        pki.trust_domain,
        config=PoolConfig(idle_close_after=60.0),
        clock=lambda: now[0],
    ) as pool:
        await pool.list_agents("node-a", a.address)
        stream = pool.read_agent_log("node-b", b.address, "web", follow=True)
        first = await anext(stream)
        assert first.data == b"line 1\n"

        now[0] += 59.0
        assert pool.reap_idle() == []
        now[0] += 2.0
        assert pool.reap_idle() == ["node-a"]  # node-b has a stream open
        assert pool.state("node-a") is S.IDLE
        assert pool.open_channels == 1

        await stream.aclose()
        now[0] += 61.0
        assert pool.reap_idle() == ["node-b"]
        assert pool.open_channels == 0


async def test_pool_is_bounded_and_evicts_the_least_recently_used(
    start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """With max_channels=2, a third daemon evicts the channel used longest ago."""
    a, b, c = [await start_daemon(f"node-{n}") for n in "abc"]
    pool = make_pool(max_channels=2)
    await pool.list_agents("node-a", a.address)
    await pool.list_agents("node-b", b.address)
    await pool.list_agents("node-a", a.address)  # b is now the least recently used

    await pool.list_agents("node-c", c.address)

    assert pool.open_channels == 2
    assert pool.state("node-b") is S.IDLE
    assert {n for n, s in pool.stats().items() if s.created_at is not None} == {"node-a", "node-c"}


async def test_full_pool_of_busy_channels_waits_then_is_exhausted(
    start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """All channels busy: a new daemon waits for room within its deadline, else is refused."""
    slow = await start_daemon("node-slow", stall=0.6)
    other = await start_daemon("node-other")
    pool = make_pool(max_channels=1)

    busy = asyncio.create_task(pool.list_agents("node-slow", slow.address))
    async with asyncio.timeout(5):
        await pool.wait_for_state("node-slow", S.READY)
    with pytest.raises(errors.ResourceExhausted, match="all 1 daemon channels are busy"):
        await pool.list_agents("node-other", other.address, call_timeout=0.1)

    reply = await pool.list_agents("node-other", other.address, call_timeout=5.0)
    assert len(reply.agents) == 1
    assert (await busy).agents
    assert pool.open_channels == 1


async def test_new_address_replaces_the_channel(
    pki: Any, start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """A node re-registered at a new address is called there; the old channel is closed."""
    old = await start_daemon("node-1")
    new = await start_daemon("node-1", tls=pki.issue("node", "node-1"))
    pool = make_pool()
    await pool.list_agents("node-1", old.address)

    await pool.list_agents("node-1", new.address)

    assert (len(old.servicer.calls), len(new.servicer.calls)) == (1, 1)
    assert pool.open_channels == 1
    assert pool.stats()["node-1"].address == new.address
    assert pool.channels_opened == 2


async def test_call_in_flight_on_a_replaced_channel_completes(
    pki: Any, start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """A call already running when the node moves still gets its answer from the old address."""
    old = await start_daemon("node-1", stall=0.5)
    new = await start_daemon("node-1", tls=pki.issue("node", "node-1"))
    pool = make_pool()
    running = asyncio.create_task(pool.list_agents("node-1", old.address))
    async with asyncio.timeout(5):
        await old.servicer.entered.wait()  # the slow call has reached the old daemon

    await pool.list_agents("node-1", new.address)

    assert len((await running).agents) == 1
    assert pool.stats()["node-1"].address == new.address


async def test_close_does_not_wait_out_the_grace_of_a_replaced_channel(
    pki: Any, start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """close() right after a node moved cuts the old channel's call short instead of waiting."""
    old = await start_daemon("node-1", stall=20.0)
    new = await start_daemon("node-1", tls=pki.issue("node", "node-1"))
    pool = make_pool(call_timeout=30.0)
    running = asyncio.create_task(pool.list_agents("node-1", old.address))
    async with asyncio.timeout(5):
        await old.servicer.entered.wait()
    await pool.list_agents("node-1", new.address)
    started = time.monotonic()

    await pool.close()

    assert time.monotonic() - started < 2
    with pytest.raises(errors.Unavailable):
        await running


async def test_close_turns_calls_in_flight_into_unavailable(
    start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """Closing the pool under a running call fails it with UNAVAILABLE, not a bare cancellation."""
    daemon = await start_daemon("node-1", stall=5.0)
    pool = make_pool()
    running = asyncio.create_task(pool.list_agents("node-1", daemon.address))
    async with asyncio.timeout(5):
        await daemon.servicer.entered.wait()

    await pool.close()

    with pytest.raises(
        errors.Unavailable, match=r"^(node-1: the call was cut off|the daemon pool)"
    ):
        await running


async def test_forget_closes_the_channel_and_drops_the_counters(
    start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """A forgotten node has no channel and no stats; calling it again starts afresh."""
    daemon = await start_daemon("node-1")
    pool = make_pool()
    await pool.list_agents("node-1", daemon.address)

    await pool.forget("node-1")

    assert pool.open_channels == 0
    assert pool.stats() == {}
    assert pool.state("node-1") is S.IDLE
    await pool.list_agents("node-1", daemon.address)
    assert pool.stats()["node-1"].calls == 1


async def test_renewed_manager_certificate_is_used_by_new_connections(
    pki: Any, manager_tls: TLSConfig, start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """Certificate files replaced on disk are presented from the next channel on, no restart."""
    daemon = await start_daemon("node-1")
    pool = make_pool()
    await pool.list_agents("node-1", daemon.address)

    stem = manager_tls.cert_file.stem
    pki.ca.issue("manager", "m2").write(manager_tls.cert_file.parent, stem=stem)
    await pool.list_agents("node-1", daemon.address)  # the open connection is kept
    await pool.forget("node-1")
    await pool.list_agents("node-1", daemon.address)

    assert daemon.servicer.callers == ["manager/m1", "manager/m1", "manager/m2"]


async def test_unusable_renewed_files_keep_the_old_certificate(
    manager_tls: TLSConfig, start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """A half-written certificate update is ignored; new connections keep the last good one."""
    daemon = await start_daemon("node-1")
    pool = make_pool()
    manager_tls.cert_file.write_bytes(b"-----BEGIN CERTIFICATE-----\ntruncated")

    await pool.list_agents("node-1", daemon.address)

    assert daemon.servicer.callers == ["manager/m1"]


async def test_read_agent_log_streams_and_retries_its_start(
    start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """A log read delivers every chunk in order, even when the daemon first said UNAVAILABLE."""
    daemon = await start_daemon("node-1", fail_next=1, log_chunks=(b"a\n", b"b\n", b"c\n"))
    pool = make_pool()

    chunks = [r async for r in pool.read_agent_log("node-1", daemon.address, "web")]

    assert b"".join(c.data for c in chunks) == b"a\nb\nc\n"
    assert chunks[-1].next_offset == 6
    assert daemon.servicer.calls == ["ReadAgentLog", "ReadAgentLog"]
    assert pool.stats()["node-1"].in_flight == 0


async def test_close_leaves_nothing_open(start_daemon: StartDaemon, make_pool: MakePool) -> None:
    """close() closes every channel, ends open streams and stops the pool's tasks."""
    daemons = [await start_daemon(f"node-{i}") for i in range(2)]
    pool = make_pool()
    for d in daemons:
        await pool.list_agents(d.node_id, d.address)
    stream = pool.read_agent_log("node-0", daemons[0].address, "web", follow=True)
    await anext(stream)

    await pool.close()

    assert pool.open_channels == 0
    assert all(s.state is S.IDLE for s in pool.stats().values())
    with pytest.raises(errors.Unavailable, match=r"^node-0: the call was cut off"):
        async for _ in stream:
            pass
    with pytest.raises(errors.Unavailable, match="pool is closed"):
        await pool.list_agents("node-0", daemons[0].address)
    leftovers = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("pool-")]
    assert leftovers == []
