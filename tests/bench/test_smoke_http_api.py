"""bench/http_api.py runs end to end at a tiny size and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_http_api_bench_smoke(tmp_path: Path) -> None:
    """20 nodes, 80 agents: both calls over gRPC and HTTP, complete answers, a ratio each, and
    the JSON writing timed against json_format."""
    out = tmp_path / "http_api.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "http_api.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert (figures["nodes"], figures["agents"]) == (20, 80)
    for name, count in (("ListNodes", 20), ("ListAgents", 80)):
        f = figures[name]
        assert f["grpc"] == f["http"] == count
        assert f["grpc_s"] > 0
        assert f["http_s"] > 0
        assert f["ratio"] == pytest.approx(f["http_s"] / f["grpc_s"])
        assert f["protojson_s"] > 0
        assert f["json_format_s"] > 0
    assert "target <= 1.5x" in result.stdout
    assert "protojson json_format" in result.stdout
