"""Enroll a host with `fleet-daemon enroll`, run `fleet-daemon` on what it wrote, and watch the
real daemon process renew its 36 s certificate while it keeps serving and reporting.

The manager end is the stand-in of tests/integration/enroll_standin.py (an
enrollment port and a Connect + RenewCertificate server, signing with an
intermediate CA) until the manager side of issue 16 lands.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from connect_helpers import serve
from cryptography import x509
from daemon_helpers import short_tmp
from enroll_standin import (
    EnrollStandIn,
    RenewingManager,
    Token,
    run_enroll,
    serial_of,
    serve_enrollment,
    served_serial,
)
from manager_proc import free_port

from fleet.enroll import ca_hash, new_token
from fleet.pki import CertificateAuthority
from fleet.tls import TLSConfig
from fleet.v1 import daemon_pb2

REPO = Path(__file__).resolve().parents[2]
LIFETIME = 36.0
"""Seconds each certificate lasts: renewal after ~23 s."""
OK = 0


@dataclass
class Fleet:
    root: CertificateAuthority
    manager: RenewingManager
    enrollment_port: int
    manager_port: int
    token: str
    manager_side: TLSConfig
    """A manager certificate, to dial the daemon's port as the manager does."""


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    """Root CA, an issuing intermediate, the stand-in's enrollment and manager ports."""
    root = CertificateAuthority.create("prod.example.com")
    issuing = root.create_intermediate()
    manager_tls = root.issue("manager", "m1").write(tmp_path / "manager")
    manager = RenewingManager(issuing, lifetime=LIFETIME)
    grpc_server, manager_port = await serve(manager_tls, manager)
    enrollment = EnrollStandIn(
        issuing, manager_address=f"127.0.0.1:{manager_port}", lifetime=LIFETIME
    )
    token = str(new_token())
    enrollment.tokens[token] = Token(node_name="web-1")
    enroll_server, enrollment_port = await serve_enrollment(manager_tls, enrollment)
    manager_side = root.issue("manager", "m9").write(tmp_path / "m9")
    try:
        yield Fleet(root, manager, enrollment_port, manager_port, token, manager_side)
    finally:
        await enroll_server.stop(None)
        await grpc_server.stop(None)


def start_daemon(config: Path, env: dict[str, str], err: Path) -> subprocess.Popen[bytes]:
    """`fleet-daemon --config CONFIG`, its stderr into `err`."""
    with open(err, "wb") as stderr:  # the child keeps its own fd
        return subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return str(answer.read().decode())


async def test_an_enrolled_daemon_renews_while_serving_and_reporting(fleet: Fleet) -> None:
    """The certificate is renewed with a new key at ~2/3 of its lifetime; the same daemon process
    then reconnects with it, serves it on its port, runs commands on its stream, reports every
    batch once, shows it in /metrics, and never loads cryptography."""
    manager = fleet.manager
    with short_tmp() as root:
        enrolled = await run_enroll(
            "--manager",
            f"127.0.0.1:{fleet.enrollment_port}",
            "--token",
            fleet.token,
            "--ca-hash",
            ca_hash(fleet.root.cert_pem),
            "--name",
            "web-1",
            "--config",
            str(root / "daemon.toml"),
            "--tls-dir",
            str(root / "tls"),
            "--state-dir",
            str(root / "state"),
        )
        assert enrolled.code == 0, enrolled.err
        cert_file, key_file = root / "tls" / "node.pem", root / "tls" / "node-key.pem"
        first_serial, first_key = serial_of(cert_file), key_file.read_bytes()

        port, mport = free_port(), free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            # The enrolled config as written, but for paths a test can use, a port to
            # check serving on, and quicker metric batches.
            "FLEET_DAEMON_RUN_DIR": str(root / "run"),
            "FLEET_DAEMON_LOG_DIR": str(root / "log"),
            "FLEET_DAEMON_LISTEN": f"127.0.0.1:{port}",
            "FLEET_DAEMON_METRICS_LISTEN": f"127.0.0.1:{mport}",
            "FLEET_DAEMON_MANAGER_METRICS_INTERVAL_SECONDS": "0.5",
        }
        daemon = start_daemon(root / "daemon.toml", env, root / "daemon.err")
        try:
            await manager.wait(lambda: manager.open and manager.connected_with, within=30)
            assert manager.connected_with == [first_serial]
            assert await asyncio.to_thread(served_serial, port, fleet.manager_side) == first_serial

            await manager.wait(lambda: manager.renewals, within=LIFETIME)
            new_serial = manager.renewals[0]
            await manager.wait(lambda: manager.open and new_serial in manager.connected_with)

            assert daemon.poll() is None, "renewed without a restart"
            assert serial_of(cert_file) in manager.renewals
            assert key_file.read_bytes() != first_key
            assert oct(key_file.stat().st_mode & 0o777) == "0o600"
            served = await asyncio.to_thread(served_serial, port, fleet.manager_side)
            assert served in manager.renewals
            rid = manager.command("ListAgents", daemon_pb2.ListAgentsRequest())
            assert (await manager.ended(rid)).code == OK

            body = await asyncio.to_thread(metrics, mport)
            assert 'fleet_daemon_certificate_renewals_total{outcome="success"} 1.0' in body
            assert 'fleet_daemon_certificate_renewals_total{outcome="failure"} 0.0' in body
            assert "fleet_daemon_manager_reconnects_total 0.0" in body
            expiry = x509.load_pem_x509_certificate(cert_file.read_bytes()).not_valid_after_utc
            gauge = re.search(
                r"^fleet_daemon_certificate_expiry_timestamp_seconds (\S+)$", body, re.M
            )
            assert gauge is not None
            assert float(gauge.group(1)) == expiry.timestamp()

            stored = len(manager.stored)
            await manager.wait(lambda: len(manager.stored) >= stored + 2)
            assert manager.stored == list(range(manager.stored[0], manager.stored[-1] + 1))
            maps = await asyncio.to_thread(Path(f"/proc/{daemon.pid}/maps").read_text)
            assert "cryptography" not in maps
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(daemon.wait, 30)
        log = (root / "daemon.err").read_text()
        assert code == 0, log
        assert "Traceback" not in log
        assert "certificate of node/web-1 renewed" in log
