"""The sync facade in a plain (non-asyncio) script run as a real process."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from agent_runtime.testing import FakeDaemon

SCRIPT = r"""
import sys
from agent_runtime.sync import SyncAgent

with SyncAgent("backup", "3.1") as agent:
    agent.on_stop(lambda: print("hook ran", file=sys.stderr, flush=True))
    n = 0
    while agent.sleep(0.05):
        n += 1
        agent.metric("rounds", n, type="backup")
        if n == 3:
            print("working", agent.config.json()["dest"], file=sys.stderr, flush=True)
print("clean exit", file=sys.stderr, flush=True)
"""


async def test_sync_script_registers_reports_and_stops_on_sigterm(tmp_path: Path) -> None:
    """A plain script registers, reads its config, and on SIGTERM runs hooks, flushes, exits 0."""
    script = tmp_path / "backup.py"
    script.write_text(SCRIPT)
    async with FakeDaemon(agent_id="backup-1", config={"dest": "/srv"}) as daemon:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            env={**os.environ, **daemon.env},
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stderr is not None
        registration = await daemon.wait_registered(timeout=20)
        assert (registration.type, registration.version) == ("backup", "3.1")
        line = await asyncio.wait_for(proc.stderr.readline(), 20)
        assert line.decode().strip().endswith("working /srv")
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stderr.read(), 20)
        assert await proc.wait() == 0
        text = rest.decode()
        assert "hook ran" in text
        assert text.rstrip().endswith("clean exit")
        assert [m.values["rounds"] for m in daemon.metrics][:3] == [1.0, 2.0, 3.0]
