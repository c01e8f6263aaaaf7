"""configs/systemd/fleet-daemon.service is accepted by systemd and keeps agents alive."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "configs" / "systemd" / "fleet-daemon.service"


def _settings() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_unit_leaves_agents_running_on_stop_and_uses_notify() -> None:
    """The unit signals only the daemon on stop/restart and waits for READY=1 with a watchdog."""
    s = _settings()
    assert s["KillMode"] == "process"
    assert s["Type"] == "notify"
    assert int(s["WatchdogSec"]) > 0
    assert s["OOMPolicy"] == "continue"
    assert s["RuntimeDirectoryPreserve"] == "yes"
    assert "fleet-daemon --config" in s["ExecStart"]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """`systemd-analyze verify` reports nothing for the unit (ExecStart pointed at a real file)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd to run this check)")
    script = Path(sys.executable).parent / "fleet-daemon"
    exe = script if script.exists() else Path(sys.executable)
    unit = tmp_path / "fleet-daemon.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/fleet-daemon", str(exe)))
    result = subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    problems = [line for line in result.stderr.splitlines() if "fleet-daemon.service" in line]
    assert problems == [], result.stderr
