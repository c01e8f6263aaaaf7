"""Enroll a host with `fleet-daemon enroll`, run `fleet-daemon` on what it wrote, and watch the
real daemon process renew its 36 s certificate while it keeps serving and reporting.

The manager is a real ManagerServer in this process (SQLite, the wall clock),
issuing 36 s node certificates with an intermediate of the fleet root; the
token is made through FleetService.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from daemon_helpers import eventually, short_tmp
from enroll_helpers import enroll_settings, run_enroll, serial_of, served_serial, token_request
from fleet_harness import operator_stub
from manager_harness import manager_config, running_manager
from manager_proc import free_port
from sqlalchemy import select

from fleet.tls import TLSConfig
from fleet.v1 import common_pb2, fleet_pb2, fleet_pb2_grpc
from manager.server import ManagerServer
from manager.storage.schema import metric_batches, node_certificates

REPO = Path(__file__).resolve().parents[2]
LIFETIME = 36.0
"""Seconds each certificate lasts: renewal ~22 s after it is issued."""


@dataclass
class Fleet:
    manager: ManagerServer
    op: fleet_pb2_grpc.FleetServiceStub
    token: str
    pin: str
    manager_side: TLSConfig
    """A manager certificate, to dial the daemon's port as the manager does."""

    async def node(self) -> fleet_pb2.Node:
        """web-1, or an empty Node while it is not known."""
        nodes = (await self.op.ListNodes(fleet_pb2.FleetServiceListNodesRequest())).nodes
        return next((n for n in nodes if n.node_id == "web-1"), fleet_pb2.Node())

    async def column(self, column: Any) -> list[int | str]:
        """A column of web-1's rows in its table, in order."""
        query = select(column).where(column.table.c.node_id == "web-1").order_by(column)
        async with self.manager.db.engine.connect() as conn:
            return list((await conn.execute(query)).scalars())


@pytest.fixture
async def fleet(pki: Any, tmp_path: Path) -> AsyncIterator[Fleet]:
    """A real manager issuing 36 s certificates with an intermediate; a token for web-1."""
    listen = f"127.0.0.1:{free_port()}"  # known before it starts: enrollment answers it
    settings = enroll_settings(
        pki.ca, tmp_path / "issuer", manager_address=listen, node_cert_days=LIFETIME / 86400
    )
    config = manager_config(
        pki,
        f"sqlite+aiosqlite:///{tmp_path / 'm.db'}",
        tmp_path / "state",
        server={"listen": listen},
        enroll=settings,
    )
    async with (
        running_manager(config, time.time) as manager,
        operator_stub(pki, manager.port) as op,
    ):
        made = await op.CreateJoinToken(token_request(node_name="web-1"))
        yield Fleet(manager, op, made.token, made.ca_hash, pki.issue("manager", "m9"))


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
            f"127.0.0.1:{manager.enroll_port}",
            "--token",
            fleet.token,
            "--ca-hash",
            fleet.pin,
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

        def expiry_ms() -> int:
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
            return int(cert.not_valid_after_utc.timestamp() * 1000)

        first_expiry = expiry_ms()
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
            node = await eventually(
                fleet.node, lambda n: n.status == common_pb2.NODE_STATUS_ONLINE, within=30
            )
            assert node.cert_expire_time == first_expiry
            stream = await eventually(
                lambda: asyncio.sleep(0, manager.control_streams.get("web-1")), bool
            )
            assert await asyncio.to_thread(served_serial, port, fleet.manager_side) == first_serial

            # Renewed (the manager records it), then the daemon's new stream says hello with
            # the new certificate: RegisterNode stores the expiry of the certificate its caller
            # presented, so the old one would show the old expiry again.
            await eventually(
                lambda: asyncio.sleep(0, manager.control_streams.get("web-1")),
                lambda s: s is not None and s is not stream,
                within=LIFETIME,
            )
            new_expiry = expiry_ms()
            assert new_expiry > first_expiry
            node = await fleet.node()
            assert node.cert_expire_time == new_expiry
            assert node.status == common_pb2.NODE_STATUS_ONLINE

            assert daemon.poll() is None, "renewed without a restart"
            issued = await fleet.column(node_certificates.c.serial)
            assert format(serial_of(cert_file), "x") in issued
            assert format(first_serial, "x") in issued
            assert key_file.read_bytes() != first_key
            assert oct(key_file.stat().st_mode & 0o777) == "0o600"
            # Served within a second (the daemon's port looks at its files that often).
            await eventually(
                lambda: asyncio.to_thread(served_serial, port, fleet.manager_side),
                lambda served: served == serial_of(cert_file),
                within=5.0,
            )
            live = await fleet.op.ListAgents(
                fleet_pb2.FleetServiceListAgentsRequest(node_id="web-1", live=True)
            )
            assert list(live.errors) == [], "the daemon answered over its stream"

            body = await asyncio.to_thread(metrics, mport)
            assert 'fleet_daemon_certificate_renewals_total{outcome="success"} 1.0' in body
            assert 'fleet_daemon_certificate_renewals_total{outcome="failure"} 0.0' in body
            assert "fleet_daemon_manager_reconnects_total 0.0" in body
            gauge = re.search(
                r"^fleet_daemon_certificate_expiry_timestamp_seconds (\S+)$", body, re.M
            )
            assert gauge is not None
            assert float(gauge.group(1)) * 1000 == new_expiry

            before = len(await fleet.column(metric_batches.c.sequence))
            stored = await eventually(
                lambda: fleet.column(metric_batches.c.sequence), lambda s: len(s) >= before + 2
            )
            assert stored == list(range(int(stored[0]), int(stored[-1]) + 1))
            maps = await asyncio.to_thread(Path(f"/proc/{daemon.pid}/maps").read_text)
            assert "cryptography" not in maps
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(daemon.wait, 30)
        log = (root / "daemon.err").read_text()
        assert code == 0, log
        assert "Traceback" not in log
        assert "certificate of node/web-1 renewed" in log
