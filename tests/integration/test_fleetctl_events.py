"""fleetctl events against a real manager: the last 20 by default, --tail, --since, -f from now."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetctl_live import LiveFleet, live_fleet

REPO = Path(__file__).resolve().parents[2]
NOTE = "fleetctl: showing the last 20 events; --tail N or --since ID for more"


@pytest.fixture
def fleet(pki: Any, tmp_path: Path) -> Iterator[LiveFleet]:
    """A real manager with 25 registered nodes (one NODE_REGISTERED event each)."""
    with live_fleet(pki, tmp_path) as live:
        for i in range(1, 26):
            live.register(f"n{i:02}")
        yield live


def _registered(live: LiveFleet, *args: str) -> tuple[list[str], str]:
    """Nodes of the NODE_REGISTERED events `fleetctl -o json events ARGS` lists, and stderr."""
    result = live.fleetctl("-o", "json", "events", "--kind", "node-registered", *args)
    assert result.exit_code == 0, result.output
    return [e["node_id"] for e in json.loads(result.stdout)["events"]], result.stderr


def test_events_shows_the_last_20_and_says_older_ones_were_left_out(fleet: LiveFleet) -> None:
    """Without options the newest 20 events are shown, and stderr says how to see more."""
    nodes, stderr = _registered(fleet)
    assert nodes == [f"n{i:02}" for i in range(6, 26)]
    assert stderr.strip() == NOTE


def test_tail_and_since_choose_what_is_shown(fleet: LiveFleet) -> None:
    """--tail N shows the newest N; --since ID everything after ID; all shown means no note."""
    nodes, stderr = _registered(fleet, "--tail", "3")
    assert nodes == ["n23", "n24", "n25"]
    assert "showing the last 3 events" in stderr
    result = fleet.fleetctl("-o", "json", "events", "--node", "n02")
    first_of_n02 = json.loads(result.stdout)["events"][0]["id"]
    nodes, stderr = _registered(fleet, "--since", str(first_of_n02))
    assert nodes == [f"n{i:02}" for i in range(3, 26)]
    assert stderr == ""
    nodes, stderr = _registered(fleet, "--tail", "30")
    assert len(nodes) == 25
    assert stderr == ""
    result = fleet.fleetctl("events", "--tail", "0")
    assert result.exit_code == 0, result.output
    assert "No events." in result.stdout


def test_follow_starts_from_now(fleet: LiveFleet) -> None:
    """`events -f` prints nothing of the past, then what happens next, until Ctrl-C."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "FLEETCTL_"))},
        "PYTHONPATH": str(REPO),
        "XDG_CONFIG_HOME": str(fleet.home),
        "FLEET_MANAGER": fleet.address,
        "FLEET_CA": str(fleet.operator.ca_file),
        "FLEET_CERT": str(fleet.operator.cert_file),
        "FLEET_KEY": str(fleet.operator.key_file),
    }
    argv = [sys.executable, "-c", "from fleetctl.app import main; main()", "-o", "json"]
    proc = subprocess.Popen(
        [*argv, "events", "-f", "--kind", "node-registered"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        # New nodes until the first line: the watch opens at some moment we
        # cannot see, and whatever it prints first must be news.
        deadline = time.monotonic() + 30
        new = 25
        while not select.select([proc.stdout], [], [], 0.5)[0]:
            assert time.monotonic() < deadline, "no event printed"
            new += 1
            fleet.register(f"n{new:02}")
        first = json.loads(proc.stdout.readline())
        assert int(first["node_id"][1:]) > 25, first
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 130
    assert stderr == ""
