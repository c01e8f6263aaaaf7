"""Calls through the daemon pool: retries for idempotent calls only, deadlines, clear errors."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from test_pool_support import (
    MakePool,
    S,
    StartDaemon,
    free_port,
)

from fleet import errors
from fleet.v1 import common_pb2


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
    """A node without a daemon address or stream fails with UNAVAILABLE naming it, in words
    and as the error's Resource (a client tells it from the manager being unreachable)."""
    pool = make_pool()
    with pytest.raises(
        errors.Unavailable,
        match=r"^node-9: the node has no control stream and no listen address",
    ) as raised:
        await pool.list_agents("node-9", "")
    assert raised.value.resource == errors.Resource("node", "node-9")


async def test_daemon_that_comes_up_later_is_reached_by_retries(
    start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """A call started while the daemon's port is closed succeeds once it starts listening."""
    port = free_port()
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
    """Nobody listening: UNAVAILABLE saying so in words, then the channel goes back to IDLE."""
    address = f"127.0.0.1:{free_port()}"
    pool = make_pool(max_attempts=3)
    started = time.monotonic()

    with pytest.raises(errors.Unavailable) as info:
        await pool.list_agents("node-1", address)
    assert info.value.message == (
        f"node-1: daemon at {address} refused the connection (is fleet-daemon running there?)"
    )

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
        with pytest.raises(errors.Unavailable) as info:
            await pool.list_agents("node-1", f"127.0.0.1:{port}")
        assert time.monotonic() - started < 5
        assert info.value.message == (
            f"node-1: daemon at 127.0.0.1:{port} did not complete the connection in time"
            " (is the address right and the port open?)"
        )
        await pool.close()


async def test_a_daemon_address_that_does_not_resolve_is_said_in_words(
    make_pool: MakePool,
) -> None:
    """A registered name that never resolves (.invalid) is one line, no resolver text."""
    pool = make_pool(max_attempts=1)
    with pytest.raises(errors.Unavailable) as info:
        await pool.list_agents("node-1", "node-1.invalid:7443")
    assert info.value.message == (
        "node-1: daemon at node-1.invalid:7443: the name does not resolve"
        " (check its advertise setting)"
    )


async def test_call_deadline_is_honoured(start_daemon: StartDaemon, make_pool: MakePool) -> None:
    """A daemon that stalls past call_timeout gives DEADLINE_EXCEEDED quickly, not retried."""
    daemon = await start_daemon("node-1", stall=10.0)
    pool = make_pool(call_timeout=0.3)
    started = time.monotonic()

    with pytest.raises(errors.DeadlineExceeded) as info:
        await pool.list_agents("node-1", daemon.address)
    assert str(info.value) == f"node-1: daemon at {daemon.address} did not answer within 0.3 s"

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
