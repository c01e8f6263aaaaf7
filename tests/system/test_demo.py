"""`DEMO_ONESHOT=1 make demo` works on a fresh clone, exactly as the README says."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_oneshot_on_a_fresh_clone(tmp_path: Path) -> None:
    """A clone of HEAD sets itself up, runs the fleet and the tour, and exits 0."""
    if shutil.which("npm") is None:
        pytest.skip("make demo needs npm (for the pinned buf CLI of make setup)")
    clone = tmp_path / "fleet"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "FLEET_"))}
    env["DEMO_ONESHOT"] = "1"
    done = subprocess.run(
        ["make", "demo"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    output = done.stdout + done.stderr
    logs = "".join(
        f"\n--- {log.name} (tail)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        for log in sorted((clone / "var" / "demo").glob("*.log"))
    )
    assert done.returncode == 0, output[-3000:] + logs
    # The tour really talked to a live fleet: both nodes online, six agents
    # running, a two-target restart with no failure, a chart, events, a job.
    assert re.search(r"node-1\s+ONLINE", output), output[-4000:]
    assert re.search(r"node-2\s+ONLINE", output), output[-4000:]
    assert len(re.findall(r"\bRUNNING\b", output)) >= 6
    assert "2 ok, 0 failed, 0 skipped of 2" in output
    assert "usage_percent" in output
    # The events step lists the newest events; which kinds are newest depends on
    # timing (agent states, operations, node events), so any kind will do.
    assert re.search(r"\b(AGENT_STATE_CHANGED|OPERATION|NODE_[A-Z_]+)\b", output)
    # The job ran its steps on both nodes, one at a time, and succeeded.
    assert re.search(r"job \S+ SUCCESS: 2 success", output), output[-4000:]
    assert re.search(r"node-1 \| ", output), output[-4000:]
    assert re.search(r"node-2 \| ", output), output[-4000:]
    # It started the web console and printed the link that opens it.
    assert re.search(r"open the console: http://127\.0\.0\.1:\d+/login\?secret=\S{20,}", output)
    # The printed export line sets up a bare shell for fleetctl: the venv's
    # fleetctl on PATH, the manager and the operator's files in FLEET_*.
    (line,) = [ln for ln in output.splitlines() if ln.startswith("export PATH=")]
    shell = subprocess.run(
        ["env", "-i", "HOME=" + str(tmp_path), "PATH=/usr/bin:/bin", "bash", "-c",
         f'{line}; command -v fleetctl; fleetctl --help >/dev/null && echo "$FLEET_MANAGER"'],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert shell.returncode == 0, shell.stderr
    found, manager = shell.stdout.split()
    assert found == str(clone / ".venv" / "bin" / "fleetctl")
    assert re.fullmatch(r"127\.0\.0\.1:\d+", manager)
    # A normal run and shutdown logs no error anywhere in the fleet.
    for log in (clone / "var" / "demo").glob("*.log"):
        bad = [ln for ln in log.read_text().splitlines() if " ERROR " in ln or "Traceback" in ln]
        assert bad == [], f"{log.name}: {bad[:3]}"
    # Everything it started is gone: no daemon, manager or agent of the clone.
    leftovers = subprocess.run(
        ["pgrep", "-f", str(clone)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert leftovers == []
