"""A tiny run of bench/manager_ingest.py: it runs end to end and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "manager_ingest.py"


@pytest.mark.slow
def test_manager_ingest_smoke(tmp_path: Path) -> None:
    """--smoke prints heartbeat, metric and fleet-size figures with their references."""
    out = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--json", str(out), "--tmpdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for label in ("heartbeat ratio", "metric ratio", "largest N held"):
        assert label in result.stdout
    figures = json.loads(out.read_text())
    assert figures["hb_rate"] > 0
    assert figures["ref_rate"] > 0
    assert figures["samples_per_s"] > 0
    assert figures["raw_samples_per_s"] > 0
    assert [s["nodes"] for s in figures["steps"]][:1] == [10]
    assert all(s["errors"] == 0 for s in figures["steps"])
