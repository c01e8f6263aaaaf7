"""Smoke run of bench/rollout.py: it runs, its checks pass, it prints its figures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\s+(\d+) ms\s+(\d+) ms\s+([\d.]+)x$", re.MULTILINE)
"""rollout ms, reference ms, ratio"""


def test_rollout_bench_smoke() -> None:
    """`bench/rollout.py --smoke` exits 0 with the rollout/reference row, CPU and restart."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "rollout.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "rollout of a new revision to 6 daemons, max_parallel 2" in out
    assert "CHECK FAILED" not in out
    (row,) = ROW.findall(out)
    assert int(row[0]) > 0
    assert float(row[2]) > 0
    assert "manager CPU per node updated:" in out
    assert re.search(r"reconcile after a manager restart \(6 nodes\): .* pushed 0$", out, re.M)
