"""Step the wall clock of a running manager process (libfaketime) under a simulated fleet.

The manager runs with libfaketime preloaded, its offset read from a file at every
clock reading (FAKETIME_NO_CACHE) and its monotonic clock left alone
(FAKETIME_DONT_FAKE_MONOTONIC), as an NTP step or `date -s` does. The simulated
daemons (bench/fleetsim.py, on control streams as real daemons are by default)
keep the real time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from faultkit import FAKETIME, ManagerProc, eventually, require_faketime

from bench.fleetsim import FleetSim, SimSettings
from fleet.retry import Backoff


@pytest.fixture(autouse=True)
def _libfaketime() -> None:
    require_faketime("the manager's wall clock cannot be stepped")


NODES = 12
# Offline after 2 * 1.1 + 2 = 4.2 s of silence; a broken stream after 3 s.
MIN_TTL, JITTER, GRACE, STREAM_GRACE, FAILOVER_GRACE = 2.0, 0.1, 2.0, 3.0, 5.0
OFFLINE_AFTER = MIN_TTL * (1 + JITTER) + GRACE


async def test_steps_of_the_managers_wall_clock_neither_take_the_fleet_offline_nor_freeze_it(
    pki: Any, tmp_path: Path
) -> None:
    """+1 h: no node offline. Then -10 min: nodes that stop go offline after their grace,
    not ten minutes later."""
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    manager = ManagerProc(
        tmp_path / "m",
        pki.issue("manager", "m1", ips=("127.0.0.1",)),
        liveness=(
            f"min_ttl_seconds = {MIN_TTL}\njitter = {JITTER}\ngrace_seconds = {GRACE}\n"
            f"failover_grace_seconds = {FAILOVER_GRACE}\nsweep_interval_seconds = 0.2\n"
        ),
        extra=f"[control]\noffline_grace_seconds = {STREAM_GRACE}\n",
    )
    settings = SimSettings(
        addresses=(manager.address,),
        metrics_interval=2.0,
        reconnect=Backoff(initial=0.5, multiplier=2.0, maximum=4.0),
        control_stream=True,
    )

    async def offline() -> list[str]:
        rows = await asyncio.to_thread(
            manager.query, "SELECT node_id FROM events WHERE kind = 'NODE_OFFLINE'"
        )
        return sorted(r[0] for r in rows)

    manager.start(
        env={
            "LD_PRELOAD": str(FAKETIME),
            "FAKETIME_TIMESTAMP_FILE": str(offset),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }
    )
    try:
        await manager.wait_serving()
        async with FleetSim(pki.ca, settings, seed=3) as fleet:
            await fleet.start(NODES)
            await fleet.wait_connected(60)
            await asyncio.sleep(FAILOVER_GRACE + OFFLINE_AFTER)  # judged on heartbeats now
            assert await offline() == []

            offset.write_text("+3600\n")  # the wall clock jumps an hour ahead
            await asyncio.sleep(FAILOVER_GRACE + 2 * OFFLINE_AFTER)
            assert await offline() == [], "a forward step took nodes offline"

            offset.write_text("+3000\n")  # and ten minutes back
            await asyncio.sleep(1.0)  # the sweeper and the stream liveness see the step
            stopped = sorted(fleet.nodes)[:3]
            for node_id in stopped:
                await fleet.nodes[node_id].stop()
            # Stream grace, the sweep, and slack for a busy machine: far below 600 s.
            await eventually(offline, lambda gone: gone == stopped, within=30, every=0.5)
            await asyncio.sleep(OFFLINE_AFTER)
            assert await offline() == stopped, "nodes still connected went offline"
    finally:
        manager.stop()
    log = manager.log.read_text()
    assert not manager.crashed(), log[-3000:]
    assert "the wall clock jumped +3600" in log
    assert "the wall clock jumped -600" in log
