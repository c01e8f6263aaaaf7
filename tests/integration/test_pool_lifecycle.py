"""The daemon pool over time: connection states, idle close, the bounded pool, close()."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from test_pool_support import (
    MakePool,
    S,
    StartDaemon,
)

from fleet import errors
from manager.pool import DaemonPool, PoolConfig


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
