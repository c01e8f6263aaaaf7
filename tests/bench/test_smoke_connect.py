"""bench/connect.py runs end to end at a tiny size and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_connect_bench_smoke(tmp_path: Path) -> None:
    """20 nodes on streams, 2 load generators: CPU vs the bare reference, commands, reconnect."""
    out = tmp_path / "connect.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "connect.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["nodes"] == 20
    assert figures["commands"] > 0
    assert 0 < figures["command_p50_ms"] <= figures["command_p99_ms"]
    assert figures["false_offline"] == 0
    assert 0 < figures["reconnect_all_s"] < 60
    # The busiest second's welcomes: at least one node, at most all, under the ceiling.
    assert 1 <= figures["reconnect_peak_welcomes_per_s"] <= 20
    assert figures["reconnect_peak_welcomes_per_s"] <= figures["max_hellos_per_second"]
    for key in figures["reconnect_hello_end_ages"]:  # "<end> <how long after its stream opened>"
        assert key.split(" ")[1] in ("<0.1s", "<1s", "<10s", ">=10s"), key
    assert figures["ref_cpu_per_1000"] >= 0
    assert figures["manager_cpu_per_1000"] > 0


def test_connect_bench_replicas_smoke(tmp_path: Path, postgres_url: str) -> None:
    """Two replicas on PostgreSQL, 10 nodes each: local and relayed commands both answered."""
    out = tmp_path / "replicas.json"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "connect.py"),
            "--replicas",
            "2",
            "--smoke",
            "--postgres",
            postgres_url,
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["nodes"] == 20
    assert figures["replicas"] == 2
    assert figures["commands_local"] > 0
    assert figures["commands_relayed"] > 0
    assert figures["relayed_ok_on_a"] == figures["commands_relayed"]  # every one relayed
    assert 0 < figures["relayed_p50_ms"] <= figures["relayed_p99_ms"]
    assert 0 < figures["local_p50_ms"] <= figures["local_p99_ms"]
    assert figures["false_offline"] == 0
    assert set(figures["manager_cpu_per_1000"]) == {"m1", "m2"}
