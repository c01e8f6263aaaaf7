"""Liveness with an injectable clock, on SQLite and PostgreSQL, over real mTLS gRPC."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from manager_harness import FakeClock, manager_config, node_stub, registration, running_manager

from fleet.v1 import manager_pb2
from manager.server import ManagerServer

# ttl 10 s, jitter 0.1, grace 5 s: offline after 16 s of silence; 60 s failover grace.
LIVENESS = {
    "min_ttl_seconds": 10.0,
    "jitter": 0.1,
    "grace_seconds": 5.0,
    "failover_grace_seconds": 60.0,
}


async def sweeping(server: ManagerServer) -> ManagerServer:
    """Wait until the background sweeper took the lead (its failover grace starts then)."""
    while server.sweeper.active_since is None:  # noqa: ASYNC110 - no event to await
        await asyncio.sleep(0.01)
    return server


async def offline_events(server: ManagerServer) -> list[str]:
    """Node ids of NODE_OFFLINE events, oldest first."""
    return [e.node_id for e in await server.events.list_after(0, kinds=["NODE_OFFLINE"])]


async def heartbeat(stub: Any, node: str, clock: FakeClock) -> manager_pb2.HeartbeatResponse:
    """One heartbeat stamped with the test clock."""
    return await stub.Heartbeat(manager_pb2.HeartbeatRequest(node_id=node, timestamp=clock.ms()))


async def test_silent_node_goes_offline_after_ttl_plus_grace_with_an_event(
    pki: Any, database_url: str, tmp_path: Path
) -> None:
    """Only a node silent past ttl*(1+jitter)+grace is marked offline, with an event."""
    clock = FakeClock()
    config = manager_config(pki, database_url, tmp_path / "s", liveness=LIVENESS)
    async with running_manager(config, clock) as server:
        await sweeping(server)
        async with node_stub(pki, "a", server.port) as a, node_stub(pki, "b", server.port) as b:
            await a.RegisterNode(registration("a"))
            await b.RegisterNode(registration("b"))
            clock.advance(50)
            await heartbeat(a, "a", clock)
            clock.advance(15.9)  # a: silent 15.9 s (< 16); b: silent 65.9 s
            result = await server.sweeper.sweep_once()
            assert result.offline == ("b",)
            assert await offline_events(server) == ["b"]
            assert (await server.nodes.get("a")).status == "online"  # type: ignore[union-attr]
            clock.advance(0.2)  # a: silent 16.1 s
            assert (await server.sweeper.sweep_once()).offline == ("a",)
            # b comes back: its heartbeat turns it online again, with an event.
            await heartbeat(b, "b", clock)
            await server.heartbeats.flush()
            node_b = await server.nodes.get("b")
            assert node_b is not None
            assert node_b.status == "online"
            online = await server.events.list_after(0, kinds=["NODE_ONLINE"])
            assert [e.node_id for e in online] == ["b"]


async def test_no_node_goes_offline_during_the_failover_grace_after_a_restart(
    pki: Any, database_url: str, tmp_path: Path
) -> None:
    """After a manager restart, nodes silent for long get failover_grace before going offline."""
    clock = FakeClock()
    config = manager_config(pki, database_url, tmp_path / "s", liveness=LIVENESS)
    async with running_manager(config, clock) as server, node_stub(pki, "a", server.port) as a:
        await a.RegisterNode(registration("a"))
    clock.advance(3600)  # the manager was down for an hour
    async with running_manager(config, clock) as server:
        await sweeping(server)
        clock.advance(59)
        assert (await server.sweeper.sweep_once()).cutoff_ms is None
        assert (await server.nodes.get("a")).status == "online"  # type: ignore[union-attr]
        async with node_stub(pki, "a", server.port) as a:
            await heartbeat(a, "a", clock)  # the node reconnects within the grace
        clock.advance(2)
        assert (await server.sweeper.sweep_once()).offline == ()
        clock.advance(16)
        assert (await server.sweeper.sweep_once()).offline == ("a",)
        assert await offline_events(server) == ["a"]


async def test_interval_scales_with_fleet_size_to_keep_the_rate_under_the_ceiling(
    pki: Any, database_url: str, tmp_path: Path
) -> None:
    """With max_heartbeat_rate 0.5/s, the 20th node is told 40 s (20 / 0.5), jittered up to +10%."""
    clock = FakeClock()
    liveness = {**LIVENESS, "max_heartbeat_rate": 0.5}
    config = manager_config(pki, database_url, tmp_path / "s", liveness=liveness)
    async with running_manager(config, clock) as server:
        intervals = []
        for i in range(20):
            async with node_stub(pki, f"n{i}", server.port) as stub:
                intervals.append(
                    (await stub.RegisterNode(registration(f"n{i}"))).heartbeat_interval_ms
                )
                if i == 19:
                    hb = await heartbeat(stub, f"n{i}", clock)
        assert 10_000 <= intervals[0] <= 11_000  # 1 node: min_ttl
        assert 40_000 <= intervals[-1] <= 44_000
        assert 40_000 <= hb.heartbeat_interval_ms <= 44_000
        assert len(set(intervals[-5:])) > 1  # jittered, not lock-step
        # Total rate implied by the intervals handed out stays under the ceiling.
        assert 20 / (min(intervals[-1], hb.heartbeat_interval_ms) / 1000) <= 0.5


async def test_a_forward_step_of_the_wall_clock_takes_no_node_offline(
    pki: Any, database_url: str, tmp_path: Path
) -> None:
    """+1 h on the manager's wall clock (NTP, a VM resumed) makes every last-seen an hour
    old: nobody goes offline for it; silence counts from the step, after a failover grace."""
    clock = FakeClock()
    config = manager_config(pki, database_url, tmp_path / "s", liveness=LIVENESS)
    async with running_manager(config, clock, monotonic=clock.monotonic) as server:
        await server.sweeper.stop()  # the test sweeps, at the times it chooses
        async with node_stub(pki, "a", server.port) as a, node_stub(pki, "b", server.port) as b:
            await a.RegisterNode(registration("a"))
            await b.RegisterNode(registration("b"))
            await server.sweeper.sweep_once()  # the sweeper starts: failover grace
            clock.advance(61)
            await heartbeat(a, "a", clock)
            await heartbeat(b, "b", clock)
            clock.advance(5)
            assert (await server.sweeper.sweep_once()).offline == ()
            clock.step(3600)
            assert (await server.sweeper.sweep_once()).offline == ()
            await heartbeat(a, "a", clock)  # a lives on; b died at the step
            clock.advance(59)
            await heartbeat(a, "a", clock)
            assert (await server.sweeper.sweep_once()).offline == ()
            clock.advance(2)  # the failover grace after the step is over
            assert (await server.sweeper.sweep_once()).offline == ("b",)
            assert await offline_events(server) == ["b"]


async def test_a_backward_step_of_the_wall_clock_does_not_freeze_liveness(
    pki: Any, database_url: str, tmp_path: Path
) -> None:
    """-10 min on the manager's wall clock leaves last-seen times in the future: a node
    that dies at the step still goes offline ttl*(1+jitter)+grace later, not 10 min on."""
    clock = FakeClock()
    config = manager_config(pki, database_url, tmp_path / "s", liveness=LIVENESS)
    async with running_manager(config, clock, monotonic=clock.monotonic) as server:
        await server.sweeper.stop()
        async with node_stub(pki, "a", server.port) as a, node_stub(pki, "b", server.port) as b:
            await a.RegisterNode(registration("a"))
            await b.RegisterNode(registration("b"))
            await server.sweeper.sweep_once()
            clock.advance(61)
            await heartbeat(a, "a", clock)
            await heartbeat(b, "b", clock)
            assert (await server.sweeper.sweep_once()).offline == ()
            clock.step(-600)
            assert (await server.sweeper.sweep_once()).offline == ()
            for _ in range(2):  # a lives on; b died at the step
                clock.advance(8.5)
                await heartbeat(a, "a", clock)
            assert (await server.sweeper.sweep_once()).offline == ("b",)  # silent 17 s
            node_b = await server.nodes.get("b")
            assert node_b is not None
            assert abs(node_b.last_seen_ms - (clock.now - 17) * 1000) <= 1  # at the step
