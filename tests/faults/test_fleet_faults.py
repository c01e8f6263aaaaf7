"""Lossy links and a restart storm from a simulated fleet (bench/fleetsim.py) at a real manager."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from faultkit import ManagerProc

from bench.fleetsim import FaultPlan, FleetSim, SimSettings
from fleet.retry import Backoff

NODES = 60


async def test_lost_requests_lost_replies_and_restart_storm_store_each_batch_once(
    pki: Any, tmp_path: Path
) -> None:
    """5% requests and 10% replies lost, half the fleet restarted: no duplicate, none offline."""
    manager = ManagerProc(
        tmp_path / "m",
        pki.issue("manager", "m1", ips=("127.0.0.1",)),
        liveness=(
            "min_ttl_seconds = 2.0\njitter = 0.1\ngrace_seconds = 5.0\n"
            "failover_grace_seconds = 0.0\nsweep_interval_seconds = 0.2\n"
        ),
    )
    settings = SimSettings(
        addresses=(manager.address,),
        metrics_interval=0.5,
        rpc_timeout=5.0,
        reconnect=Backoff(initial=0.1, maximum=1.0),
    )
    plan = FaultPlan(drop=0.05, drop_reply=0.10, delay=0.01, heartbeat_jitter=0.2)
    manager.start()
    try:
        await manager.wait_serving()
        async with FleetSim(pki.ca, settings, plan=plan, seed=5) as fleet:
            await fleet.start(NODES)
            await fleet.wait_connected(60)
            await asyncio.sleep(3.0)
            # Unsent batches of a restarted daemon are lost (the buffer is in memory).
            restarted = await fleet.restart_storm(0.5, within=3.0)
            await asyncio.sleep(3.0)
            fleet.plan = FaultPlan()  # heal, then let everything drain
            await fleet.wait_connected(60)
            for _ in range(300):
                if not any(s.buffered for s in fleet.nodes.values()):
                    break
                await asyncio.sleep(0.1)
            acked = {n: set(s.acked) for n, s in fleet.nodes.items()}
            last = {n: s.link.sequence.peek() - 1 for n, s in fleet.nodes.items()}
            summary = fleet.summary()
        rows = await asyncio.to_thread(
            manager.query,
            "SELECT node_id, CAST(value AS INTEGER), COUNT(*) FROM metric_samples "
            "WHERE name = 'batch' GROUP BY 1, 2",
        )
        offline = await asyncio.to_thread(
            manager.query, "SELECT node_id FROM events WHERE kind = 'NODE_OFFLINE'"
        )
        assert manager.alive
        assert not manager.crashed()
    finally:
        manager.stop()
    stored: dict[str, set[int]] = {}
    for node_id, seq, count in rows:
        assert count == 1, f"{node_id} batch {seq} stored {count} times"
        stored.setdefault(node_id, set()).add(seq)
    lost_acked = [(n, s) for n, seqs in acked.items() for s in seqs - stored.get(n, set())]
    assert not lost_acked, f"acknowledged batches not stored: {lost_acked[:5]}"
    never = sum(last[n] - len(stored.get(n, set())) for n in fleet.nodes)
    assert offline == [], f"marked offline by lossy links / restarts: {offline[:5]}"
    assert summary["injected"].get("drop_reply", 0) > 0
    assert summary["injected"].get("drop", 0) > 0
    print(
        f"\n{NODES} nodes, 5% requests + 10% replies lost, {restarted} restarted: "
        f"{sum(len(s) for s in stored.values())} batches stored, each once; {never} batches "
        f"cut but never stored (unsent when their daemon restarted); injected "
        f"{summary['injected']}; no node marked offline"
    )
