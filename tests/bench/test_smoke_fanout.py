"""Smoke run of bench/fanout.py: it runs, its checks pass, it prints its figures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\s+(\d+) ms\s+([\d.]+) ms\s+([\d.]+) ms\s+[\d.]+x\s+\d+$", re.MULTILINE)
"""simulated restart, fleet ms, reference ms, ratio, peak in flight"""


def test_fanout_bench_smoke() -> None:
    """`bench/fanout.py --smoke` exits 0 with the fleet/reference table and pool counters."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fanout.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "fan-out restart of 6 agents on 6 daemons" in out
    assert "CHECK FAILED" not in out
    assert "pool counters: 6 channels, 6 connections for 6 daemons" in out
    rows = ROW.findall(out)
    assert [r[0] for r in rows] == ["0", "100"], out  # one row per simulated restart time
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)
