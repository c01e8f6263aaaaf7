"""`fleet-manager serve` as a real process: SIGTERM, systemd notify, two replicas."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from fleet.tls import TLSConfig, channel_credentials, channel_options
from fleet.v1 import common_pb2, manager_pb2, manager_pb2_grpc

FLEET_MANAGER = [sys.executable, "-m", "manager.cli"]


def free_port() -> int:
    """A port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(pki: Any, directory: Path, database_url: str, *, liveness: str = "") -> Path:
    """A manager config with its own cert and ports; returns its path."""
    tls: TLSConfig = pki.issue("manager", directory.name, ips=("127.0.0.1",))
    port, mport = free_port(), free_port()
    path = directory / "manager.toml"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'state_dir = "{directory / "state"}"\n'
        f'[server]\nlisten = "127.0.0.1:{port}"\nmetrics_listen = "127.0.0.1:{mport}"\n'
        "shutdown_grace_seconds = 5.0\n"
        f'[tls]\nca_file = "{tls.ca_file}"\ncert_file = "{tls.cert_file}"\n'
        f'key_file = "{tls.key_file}"\n'
        f'[database]\nurl = "{database_url}"\n'
        f"[liveness]\n{liveness}\n"
    )
    return path


class Manager:
    """A running `fleet-manager serve` child process."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        text = config.read_text()
        self.port = int(text.split('listen = "127.0.0.1:')[1].split('"')[0])
        self.metrics_port = int(text.split('metrics_listen = "127.0.0.1:')[1].split('"')[0])
        self.log = config.parent / "manager.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*FLEET_MANAGER, "serve", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )

    async def wait_serving(self, limit: float = 30) -> None:
        """Wait until /metrics answers (it starts after the gRPC server)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"manager exited {self.proc.returncode}: {self.log.read_text()}"
                )
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.scrape)
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"manager did not start: {self.log.read_text()}")

    def scrape(self) -> dict[str, float]:
        """The manager's /metrics as {sample: value}."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    async def terminate(self, limit: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, limit)

    def kill(self) -> None:
        """Make sure the process is gone (test cleanup)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@asynccontextmanager
async def node(
    pki: Any, name: str, port: int
) -> AsyncIterator[manager_pb2_grpc.ManagerServiceStub]:
    """A registered node's ManagerService stub."""
    tls = pki.issue("node", name)
    async with aio.secure_channel(
        f"127.0.0.1:{port}",
        channel_credentials(tls),
        options=channel_options(f"manager.{pki.trust_domain}"),
    ) as channel:
        stub = manager_pb2_grpc.ManagerServiceStub(channel)
        await stub.RegisterNode(
            manager_pb2.RegisterNodeRequest(
                node_id=name, hostname=name, ip="127.0.0.1", os="linux", arch="x86_64"
            )
        )
        yield stub


async def test_sigterm_loses_nothing_acknowledged(pki: Any, tmp_path: Path) -> None:
    """Batches acked before/while SIGTERM drains are all in the database after exit 0."""
    db = tmp_path / "m" / "state" / "manager.db"
    manager = Manager(write_config(pki, tmp_path / "m", f"sqlite+aiosqlite:///{db}"))
    acked: list[int] = []
    try:
        await manager.wait_serving()
        async with node(pki, "web-1", manager.port) as stub:
            hb = await stub.Heartbeat(
                manager_pb2.HeartbeatRequest(node_id="web-1", timestamp=int(time.time() * 1000))
            )
            assert hb.success
            heartbeat_ms = int(time.time() * 1000)

            refused = 0
            counter = iter(range(1, 1_000_000))

            async def sender() -> None:
                nonlocal refused
                while True:  # until the manager refuses: then it is shutting down
                    seq = next(counter)
                    now = int(time.time() * 1000)
                    req = manager_pb2.ReportMetricsRequest(
                        node_id="web-1",
                        sequence=seq,
                        metrics=[
                            common_pb2.MetricData(
                                type="cpu",
                                timestamp=now,
                                values={f"v{i}": float(i) for i in range(100)},
                            )
                        ],
                    )
                    try:
                        resp = await stub.ReportMetrics(req, timeout=10)
                    except grpc.aio.AioRpcError:
                        refused += 1
                        return
                    assert resp.accepted == 100
                    acked.append(seq)

            senders = [asyncio.ensure_future(sender()) for _ in range(8)]
            while len(acked) < 50:  # noqa: ASYNC110 - wait for traffic to flow
                await asyncio.sleep(0.01)
            assert await manager.terminate() == 0
            await asyncio.gather(*senders)
            assert refused == 8  # every sender saw the shutdown mid-stream
    finally:
        manager.kill()
    assert acked, "no batch was acknowledged before the shutdown"
    with sqlite3.connect(db) as conn:
        stored = {r[0] for r in conn.execute("select sequence from metric_batches")}
        samples = conn.execute("select count(*) from metric_samples").fetchone()[0]
        last_seen = conn.execute("select last_seen_ms from nodes").fetchone()[0]
    assert set(acked) <= stored
    assert samples == 100 * len(stored)
    assert last_seen >= heartbeat_ms - 1000  # the heartbeat map was flushed at shutdown
    assert "Traceback" not in manager.log.read_text()


async def test_ready_and_stopping_are_sent_to_notify_socket(pki: Any, tmp_path: Path) -> None:
    """Under systemd the manager sends READY=1 once serving, watchdog pings, and STOPPING=1."""
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.setblocking(False)
    db = tmp_path / "m" / "state" / "manager.db"
    manager = Manager(
        write_config(pki, tmp_path / "m", f"sqlite+aiosqlite:///{db}"),
        env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"},
    )
    loop = asyncio.get_running_loop()
    try:
        messages = []
        while not any("READY=1" in m for m in messages):
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 30)
            messages.append(data.decode())
        await manager.wait_serving()  # READY came when it really serves
        while not any("WATCHDOG=1" in m for m in messages):  # every 0.2 s
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
            messages.append(data.decode())
        assert await manager.terminate() == 0
        while not any("STOPPING=1" in m for m in messages):
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)
            messages.append(data.decode())
    finally:
        manager.kill()
        sock.close()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_two_managers_on_one_postgres_both_serve_and_one_sweeps(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """Two replicas serve; exactly one holds the sweeper lock; a silent node goes offline once."""
    liveness = (
        "min_ttl_seconds = 1.0\njitter = 0.0\ngrace_seconds = 0.5\n"
        "failover_grace_seconds = 1.0\nsweep_interval_seconds = 0.2\n"
    )
    a = Manager(write_config(pki, tmp_path / "a", database_url, liveness=liveness))
    b = Manager(write_config(pki, tmp_path / "b", database_url, liveness=liveness))
    try:
        await a.wait_serving()
        await b.wait_serving()
        async with node(pki, "via-a", a.port), node(pki, "via-b", b.port):
            pass  # both replicas accept registrations; then both nodes go silent
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ma, mb = a.scrape(), b.scrape()
            offline = ma.get("fleet_manager_nodes_marked_offline_total", 0) + mb.get(
                "fleet_manager_nodes_marked_offline_total", 0
            )
            if offline >= 2:
                break
            await asyncio.sleep(0.2)
        leaders = (ma["fleet_sweeper_leader"], mb["fleet_sweeper_leader"])
        assert sorted(leaders) == [0.0, 1.0]
        # Exactly one sweeper acted: all offline markings come from the leader, once each.
        leader, follower = (ma, mb) if leaders[0] == 1.0 else (mb, ma)
        assert leader["fleet_manager_nodes_marked_offline_total"] == 2
        assert follower["fleet_manager_nodes_marked_offline_total"] == 0
        # The follower takes over when the leader stops.
        stopped, other = (a, b) if leaders[0] == 1.0 else (b, a)
        assert await stopped.terminate() == 0
        deadline = time.monotonic() + 20
        while other.scrape()["fleet_sweeper_leader"] != 1.0:
            assert time.monotonic() < deadline, "the other replica never took the sweeper lock"
            await asyncio.sleep(0.2)
    finally:
        for m in (a, b):
            with contextlib.suppress(subprocess.TimeoutExpired):
                await m.terminate()
            m.kill()
    import asyncpg

    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        events = await conn.fetch("select node_id from events where kind = 'NODE_OFFLINE'")
    finally:
        await conn.close()
    assert sorted(r["node_id"] for r in events) == ["via-a", "via-b"]
