"""An HTTP health check, run by a daemon, seen by a real `fleet-manager` and `fleetctl`.

The agent is `python -m http.server` serving its own directory; the check GETs
/healthz, a file there. Removing the file makes the server answer 404: the
daemon turns the agent UNHEALTHY, and the manager's agent state, its
agent-state-changed event and `fleetctl agents list/show` all say why. Putting
the file back makes it HEALTHY again; the process was never restarted.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import agent, daemon_config, eventually, short_tmp
from manager_proc import REPO, Manager, free_port

from daemon.config import ManagerLinkConfig
from daemon.server import DaemonServer
from daemon.supervisor.spec import HealthSpec
from fleet.retry import Backoff
from manager.storage.agents import REBASE_JITTER_MS


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """The directory the agent serves, with a healthz file."""
    (tmp_path / "healthz").write_text("ok\n")
    return tmp_path


@pytest.fixture
async def daemon(pki: Any, manager: Manager, site: Path) -> AsyncIterator[tuple[DaemonServer, int]]:
    """A daemon (node/n1) running `python -m http.server` with an HTTP check, linked to manager."""
    port = free_port()
    with short_tmp() as root:
        link = ManagerLinkConfig(
            addresses=(f"127.0.0.1:{manager.port}",),
            sync_interval_seconds=1.0,
            rpc_timeout_seconds=5.0,
            reconnect=Backoff(initial=0.2, maximum=1.0),
        )
        web = agent(
            "web",
            sys.executable,
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            str(port),
            cwd=str(site),
            health=HealthSpec(
                kind="http",
                url=f"http://127.0.0.1:{port}/healthz",
                interval=0.2,
                timeout=2.0,
                failure_threshold=2,
            ),
        )
        cfg = daemon_config(
            root, pki.issue("node", "n1"), (web,), manager=link, stop_agents_on_exit=True
        )
        server = DaemonServer(cfg)
        await server.start()
        try:
            yield server, port
        finally:
            await server.stop(1.0)


def _fleetctl(pki: Any, manager: Manager, *args: str) -> str:
    operator = pki.issue("operator", "alice")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "FLEET_MANAGER": f"127.0.0.1:{manager.port}",
        "FLEET_CA": str(operator.ca_file),
        "FLEET_CERT": str(operator.cert_file),
        "FLEET_KEY": str(operator.key_file),
        "COLUMNS": "250",
    }
    done = subprocess.run(
        [sys.executable, "-c", "from fleetctl.app import main; main()", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_http_check_health_and_reason_reach_the_manager_events_and_fleetctl(
    pki: Any, manager: Manager, daemon: tuple[DaemonServer, int], site: Path
) -> None:
    """HEALTHY, then UNHEALTHY with the 404 as the reason everywhere, then HEALTHY again."""
    server, port = daemon
    url = f"http://127.0.0.1:{port}/healthz"
    sql = "SELECT health, health_message, health_since_ms, pid FROM agent_states"

    async def state() -> list[tuple[Any, ...]]:
        return await asyncio.to_thread(manager.query, sql + " WHERE agent_id='web'")

    healthy = await eventually(state, lambda r: len(r) == 1 and r[0][0] == "HEALTHY", within=60)
    pid = healthy[0][3]
    (site / "healthz").unlink()
    reason = f"GET {url}: status 404 File not found (expected 200..399) (2 times in a row)"
    sick = await eventually(state, lambda r: r[0][0] == "UNHEALTHY", within=30)
    assert sick[0][1] == reason
    assert sick[0][2] >= healthy[0][2] > 0
    assert sick[0][3] == pid, "not restarted: restart_when_unhealthy is off"

    events = await asyncio.to_thread(
        manager.query,
        "SELECT message FROM events WHERE kind='AGENT_STATE_CHANGED' AND agent_id='web'",
    )
    assert any(
        m == f"web on n1: health HEALTHY -> UNHEALTHY: unhealthy: {reason};"
        " left running (restart_when_unhealthy = false)"
        for (m,) in events
    ), events

    shown = await asyncio.to_thread(_fleetctl, pki, manager, "agents", "show", "n1/web")
    assert "UNHEALTHY since" in shown
    assert reason in " ".join(shown.split())
    # agents show asks the daemon: its answer keeps the health's reason and since when.
    live = json.loads(
        await asyncio.to_thread(_fleetctl, pki, manager, "-o", "json", "agents", "show", "n1/web")
    )
    assert (live["health"], live["health_message"]) == ("UNHEALTHY", reason)
    # The daemon's stamp; the manager stores its receipt time minus the health's age.
    assert abs(live["health_since_ms"] - sick[0][2]) < REBASE_JITTER_MS
    listed = await asyncio.to_thread(_fleetctl, pki, manager, "agents", "list", "-o", "wide")
    assert "UNHEALTHY" in listed

    (site / "healthz").write_text("ok\n")
    await eventually(state, lambda r: r[0][0] == "HEALTHY" and r[0][1] == "", within=30)
    assert server.supervisor.get("web").pid == pid
