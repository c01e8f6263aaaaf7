"""Smoke run of bench/fleetsim.py as a command against a real manager process."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fleet.pki import CertificateAuthority

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_fleetsim_cli_registers_reports_and_survives_injected_faults(tmp_path: Path) -> None:
    """3 nodes, lost replies, a cut and a restart storm: every node reports, each batch once."""
    ca = CertificateAuthority.create()
    ca_cert, ca_key = ca.write(tmp_path / "ca")
    tls = ca.issue("manager", "m1", ips=("127.0.0.1",)).write(tmp_path / "m1")
    port, mport = _free_port(), _free_port()
    db = tmp_path / "state" / "manager.db"
    config = tmp_path / "manager.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[server]\nlisten = "127.0.0.1:{port}"\nmetrics_listen = "127.0.0.1:{mport}"\n'
        f'[tls]\nca_file = "{tls.ca_file}"\ncert_file = "{tls.cert_file}"\n'
        f'key_file = "{tls.key_file}"\n[liveness]\nmin_ttl_seconds = 1.0\n'
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    manager = subprocess.Popen(
        [sys.executable, "-m", "manager.cli", "serve", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "manager did not start"
                assert manager.poll() is None, "manager exited"
                time.sleep(0.1)
        out = subprocess.run(
            [
                sys.executable,
                str(REPO / "bench" / "fleetsim.py"),
                "--nodes",
                "3",
                "--manager",
                f"127.0.0.1:{port}",
                "--ca-cert",
                str(ca_cert),
                "--ca-key",
                str(ca_key),
                "--duration",
                "5",
                "--metrics-interval",
                "0.3",
                "--backoff-initial",
                "0.1",
                "--backoff-max",
                "0.5",
                "--drop-reply",
                "0.2",
                "--restart-storm",
                "0.5",
                "--storm-within",
                "1",
                "--cut",
                "0.34",
                "--cut-seconds",
                "1",
                "--seed",
                "1",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        manager.terminate()
        manager.wait(30)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    print(f"\nfleetsim smoke: {summary}")
    assert summary["nodes"] == 3
    assert summary["restarts"] == 2
    assert summary["injected"].get("drop_reply", 0) > 0
    assert summary["injected"].get("cut", 0) > 0
    assert summary["batches_acked"] > 0
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT node_id, value, COUNT(*) FROM metric_samples WHERE name = 'batch' "
            "GROUP BY node_id, value"
        ).fetchall()
    assert {n for n, _, _ in rows} == {"sim-00000", "sim-00001", "sim-00002"}
    assert all(c == 1 for _, _, c in rows), "a retried batch (lost reply) was stored twice"
