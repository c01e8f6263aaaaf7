"""Smoke run of bench/jobs.py: it runs, its checks pass, it prints its figures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DISPATCH = re.compile(r"^\s+(\d+) ms\s+(\d+) ms\s+([\d.]+)x\s+(\d+) ms$", re.MULTILINE)
"""fleet ms, reference ms, ratio, gather alone ms"""
INGEST = re.compile(r"^\s+([\d.]+) MiB/s\s+([\d.]+) MiB/s\s+([\d.]+)x$", re.MULTILINE)
"""manager MiB/s, raw sqlite MiB/s, ratio"""


def test_jobs_bench_smoke() -> None:
    """`bench/jobs.py --smoke` exits 0 with the dispatch and ingest rows and no failed check."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "jobs.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "CHECK FAILED" not in out
    assert "job `true` on 6 daemons, max_concurrency 2, median of 1 round(s):" in out
    (row,) = DISPATCH.findall(out)
    assert int(row[0]) > 0
    assert int(row[1]) > 0
    assert float(row[2]) > 0
    assert "output ingest, 3 targets x 256 KiB in 64 KiB chunks:" in out
    (ingest,) = INGEST.findall(out)
    assert float(ingest[0]) > 0
    assert float(ingest[1]) > 0
