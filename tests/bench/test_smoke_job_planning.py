"""Smoke run of bench/job_planning.py: both sides decide alike and it prints its row."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\s+50\s+10\s+5\s+[\d.]+ ms\s+[\d.]+ ms \(\s*\d+\)\s+[\d.]+x$", re.MULTILINE)


def test_job_planning_bench_smoke() -> None:
    """`--smoke` exits 0 (it exits non-zero if JobTargets dispatched differently from plan)
    with one row: 50 targets, window 10, 5 passes, both times and the ratio."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "job_planning.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ROW.search(proc.stdout), proc.stdout
