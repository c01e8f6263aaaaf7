"""A tiny run of bench/supervise.py: both supervisors run and every figure is printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "supervise.py"


@pytest.mark.slow
def test_supervise_bench_smoke() -> None:
    """--smoke measures respawn latency, start time, idle cost and sampling cost for both."""
    supervisord = Path(sys.executable).parent / "supervisord"
    if not supervisord.exists():
        pytest.skip("supervisord is not installed (pip install -e '.[dev]' installs it)")
    result = subprocess.run(
        [sys.executable, str(BENCH), "--smoke"],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for label in (
        "crash-to-respawn p50",
        "crash-to-respawn p99",
        "agents, wall (s)",
        "idle CPU",
        "idle RSS",
        "@1 Hz",
        "sampling every",
        "gRPC floor",
        "load average",
    ):
        assert label in out, out
    header, *rows = out.splitlines()
    assert "fleet-daemon" in header
    assert "supervisord" in header
    for row in rows[:6]:
        daemon_value, supervisord_value = (float(x) for x in row[42:].split()[:2])
        assert daemon_value >= 0
        assert supervisord_value >= 0
