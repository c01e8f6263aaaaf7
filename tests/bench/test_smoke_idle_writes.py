"""Smoke run of bench/idle_writes.py: it runs and prints a figure per kind of write."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_idle_writes_bench_smoke() -> None:
    """`bench/idle_writes.py --smoke` exits 0 with the harness, report and batch figures."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "idle_writes.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert re.search(r"^harness alone: loop [\d.]+ ms per iteration$", out, re.M)
    reports = re.findall(r"^agent-state reports: 10 in (\d+) commits; loop [\d.]+ ms", out, re.M)
    batches = re.findall(r"^metric batches: 10 in (\d+) commits; loop [\d.]+ ms", out, re.M)
    assert len(reports) == 2, out
    assert len(batches) == 2, out
    assert all(int(n) > 0 for n in reports + batches), out
