"""A full disk under the manager's SQLite database, under load.

A small tmpfs (root only) holds the database; it is filled to the last byte
while simulated daemons (bench/fleetsim.py: the real ManagerLink, which keeps
and retries batches) report metrics and a probe registers every 100 ms. The
manager must answer RESOURCE_EXHAUSTED meanwhile (gRPC's code for a full file
system: daemons keep the batch, back off and keep the connection), log it once,
never crash, serve again once space is freed, and lose no acknowledged batch.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from daemon_helpers import fill, small_disk
from faultkit import ManagerProc
from test_database_faults import _BATCH_COUNTS, LIVENESS, _stored_once, _under_fault

DATABASE = "[database]\nbusy_timeout_ms = 200\nretry_timeout_seconds = 0.5\n"
FULL_SECONDS = 3.0


async def test_sqlite_disk_full_answers_resource_exhausted_then_recovers(
    pki: Any, tmp_path: Path
) -> None:
    """Disk under SQLite full 3 s under load: RESOURCE_EXHAUSTED, logged once, no loss."""
    root = tmp_path / "m"
    with small_disk(root / "state"):
        manager = ManagerProc(
            root, pki.issue("manager", "m1", ips=("127.0.0.1",)), liveness=LIVENESS
        )
        manager.config.write_text(manager.config.read_text().replace("[database]\n", DATABASE))
        manager.start()
        try:
            await manager.wait_serving()

            async def full() -> tuple[float, float]:
                filler = await asyncio.to_thread(fill, root / "state")
                t0 = time.time()
                await asyncio.sleep(FULL_SECONDS)
                filler.unlink()
                return t0, time.time()

            out = await _under_fault(pki, manager, full, refusal="RESOURCE_EXHAUSTED")
            rows = await asyncio.to_thread(manager.query, _BATCH_COUNTS)
            n = _stored_once(rows, out["acked"])
        finally:
            manager.stop()
        log = manager.log.read_text()
    # Once, not per call (the background loops say it once a pass, as for any outage).
    full_lines = [line for line in log.splitlines() if "ERROR manager.storage.db" in line]
    assert len(full_lines) == 1, f"the full disk is logged once, not per call: {full_lines[:3]}"
    assert "out of disk space" in full_lines[0]
    assert "database or disk is full" in full_lines[0]
    print(
        f"\nDisk full {out['fault']:.1f}s under 20 nodes: probe answers meanwhile "
        f"{out['during']}; served again {out['recovered']:.2f}s after space was freed; "
        f"{n} acked batches all stored once; daemon-side failures {out['fleet_failures']}"
    )
