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
    assert figures["ref_cpu_per_1000"] >= 0
    assert figures["manager_cpu_per_1000"] > 0
