"""A real SDK agent's version and heartbeats reach a real `fleet-manager` (issue 5 part 2).

`fleet-agent run worker` under an in-process daemon whose manager link points
at a `fleet-manager serve` process: the manager's stored agent state carries
the version the agent registered with and a last heartbeat that moves on.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from importlib import metadata
from typing import Any

import pytest
from daemon_helpers import agent, daemon_config, eventually, short_tmp
from manager_proc import REPO, Manager

from daemon.config import ManagerLinkConfig
from daemon.server import DaemonServer
from daemon.supervisor.spec import HealthSpec
from fleet.retry import Backoff


@pytest.fixture
async def daemon(pki: Any, manager: Manager) -> AsyncIterator[DaemonServer]:
    """A daemon (node/n1) running `fleet-agent run worker`, linked to `manager`."""
    with short_tmp() as root:
        link = ManagerLinkConfig(
            addresses=(f"127.0.0.1:{manager.port}",),
            sync_interval_seconds=1.0,  # full snapshots carry the moving last heartbeat
            rpc_timeout_seconds=5.0,
            reconnect=Backoff(initial=0.2, maximum=1.0),
        )
        config = {"inbox": str(root / "in"), "outbox": str(root / "out"), "pace_seconds": 0.2}
        worker = agent(
            "worker",
            sys.executable,
            "-m",
            "agent_runtime.cli",
            "run",
            "worker",
            env={"PYTHONPATH": str(REPO)},
            health=HealthSpec(kind="heartbeat", timeout=3.0),
            config=json.dumps(config),
        )
        cfg = daemon_config(
            root,
            pki.issue("node", "n1"),
            (worker,),
            manager=link,
            stop_agents_on_exit=True,
            agent_heartbeat_interval_seconds=0.5,
        )
        server = DaemonServer(cfg)
        await server.start()
        try:
            yield server
        finally:
            await server.stop(1.0)


async def test_sdk_version_and_last_heartbeat_reach_the_managers_agent_state(
    manager: Manager, daemon: DaemonServer
) -> None:
    """The manager stores the version the worker registered with and a fresh, moving heartbeat."""
    version = metadata.version("fleet")
    sql = "SELECT version, last_heartbeat_ms, health FROM agent_states WHERE agent_id='worker'"

    async def row() -> list[tuple[Any, ...]]:
        return await asyncio.to_thread(manager.query, sql)

    first = await eventually(row, lambda r: len(r) == 1 and r[0][1] > 0, within=60)
    stored_version, first_beat, _ = first[0]
    assert stored_version == version, "the SDK-reported version, not the spec's empty one"
    local = daemon.supervisor.get("worker")
    assert local.version == version
    assert abs(first_beat - local.last_heartbeat_ms) < 10_000
    later = await eventually(row, lambda r: r[0][1] >= first_beat + 1000, within=30)
    assert later[0][0] == version
    assert later[0][2] == "HEALTHY", "heartbeats arrive within the health timeout"
