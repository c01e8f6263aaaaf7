"""Database faults under load: SQLite locked by another process; a PRIVATE PostgreSQL restarted.

Load = simulated daemons (bench/fleetsim.py: the real ManagerLink, which keeps
and retries batches) plus a probe registering a new node every 100 ms. The
manager must answer UNAVAILABLE meanwhile (no other error), never crash, serve
again without a restart, and lose no acknowledged batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from faultkit import ManagerProc, free_port
from grpc import aio

from bench.fleetsim import FleetSim, SimSettings
from fleet.retry import Backoff
from fleet.tls import channel_credentials, channel_options
from fleet.v1 import manager_pb2, manager_pb2_grpc

LIVENESS = "min_ttl_seconds = 1.0\njitter = 0.0\ngrace_seconds = 30.0\n"
DATABASE = "[database]\nbusy_timeout_ms = 200\nretry_timeout_seconds = 0.5\n"
FAULT_SECONDS = 5.0


class Probe:
    """Registers a fresh node every 100 ms and records (time, status code name)."""

    def __init__(self, pki: Any, address: str) -> None:
        tls = pki.issue("node", "probe")
        self.channel = aio.secure_channel(
            address,
            channel_credentials(tls),
            options=channel_options(f"manager.{pki.trust_domain}"),
        )
        self.stub = manager_pb2_grpc.ManagerServiceStub(self.channel)
        self.results: list[tuple[float, str]] = []

    async def run(self) -> None:
        """Until cancelled: RegisterNode(probe) with a 3 s deadline, every 100 ms."""
        while True:
            try:
                await self.stub.RegisterNode(
                    manager_pb2.RegisterNodeRequest(
                        node_id="probe", hostname="probe", ip="127.0.0.1", os="linux", arch="x86_64"
                    ),
                    timeout=3,
                )
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            self.results.append((time.time(), code))
            await asyncio.sleep(0.1)


async def _under_fault(
    pki: Any,
    manager: ManagerProc,
    fault: Callable[[], Awaitable[tuple[float, float]]],
    refusal: str = "UNAVAILABLE",
) -> dict[str, Any]:
    """Run fleet + probe, apply `fault` (returns its start/end times), check recovery;
    `refusal` is the one status the probe may get meanwhile."""
    settings = SimSettings(
        addresses=(manager.address,),
        metrics_interval=0.5,
        rpc_timeout=5.0,
        reconnect=Backoff(initial=0.2, maximum=1.0),
    )
    pid = manager.popen.pid if manager.popen else 0
    probe = Probe(pki, manager.address)
    async with FleetSim(pki.ca, settings, seed=3) as fleet:
        await fleet.start(20)
        await fleet.wait_connected(60)
        task = asyncio.create_task(probe.run())
        try:
            await asyncio.sleep(2.0)
            t_start, t_end = await fault()
            await fleet.wait_connected(60)
            # Everything buffered during the fault reaches the database.
            deadline = time.monotonic() + 60
            while any(s.buffered for s in fleet.nodes.values()):
                assert time.monotonic() < deadline, "buffers did not drain after the fault"
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await probe.channel.close()
        acked = {n: set(s.acked) for n, s in fleet.nodes.items()}
        dropped = sum(s.dropped for s in fleet.nodes.values())
        failures = dict(fleet.record.failures)
    during = Counter(code for t, code in probe.results if t_start <= t <= t_end)
    after_ok = [t for t, code in probe.results if t > t_end and code == "OK"]
    assert after_ok, f"never served again after the fault: {probe.results[-5:]}"
    recovered = after_ok[0] - t_end
    codes = {code for _, code in probe.results}
    assert codes <= {"OK", refusal}, f"only {refusal} may be answered: {codes}"
    assert during[refusal] > 0, f"the probe never saw {refusal} meanwhile: {during}"
    assert manager.alive, "the manager died"
    assert manager.popen is not None
    assert manager.popen.pid == pid, "served again without a restart"
    assert not manager.crashed(), manager.log.read_text()[-3000:]
    assert dropped == 0
    return {
        "acked": acked,
        "during": dict(during),
        "recovered": recovered,
        "fault": t_end - t_start,
        "fleet_failures": failures,
    }


@asynccontextmanager
async def _sqlite_lock(path: Path) -> AsyncIterator[None]:
    """Another process holds BEGIN EXCLUSIVE on the SQLite file while inside."""
    script = textwrap.dedent(f"""
        import sqlite3, sys
        conn = sqlite3.connect({str(path)!r}, isolation_level=None, timeout=30)
        conn.execute("BEGIN EXCLUSIVE")
        print("locked", flush=True)
        sys.stdin.readline()
        conn.execute("ROLLBACK")
    """)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert proc.stdin is not None
    try:
        assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"locked"
        yield
    finally:
        proc.stdin.write(b"\n")
        await proc.stdin.drain()
        assert await proc.wait() == 0


def _stored_once(rows: list[tuple[str, int, int]], acked: dict[str, set[int]]) -> int:
    """Check every acked batch is stored exactly once; returns how many were acked."""
    counts = {(n, int(v)): c for n, v, c in rows}
    twice = [k for k, c in counts.items() if c > 1]
    assert not twice, f"batches stored twice: {twice[:5]}"
    lost = [(n, s) for n, seqs in acked.items() for s in seqs if (n, s) not in counts]
    assert not lost, f"acknowledged batches lost: {lost[:5]}"
    return sum(len(s) for s in acked.values())


_BATCH_COUNTS = (
    "SELECT node_id, value, COUNT(*) FROM metric_samples WHERE name = 'batch' "
    "GROUP BY node_id, value"
)


async def test_sqlite_locked_by_another_process_answers_unavailable_then_recovers(
    pki: Any, tmp_path: Path
) -> None:
    """SQLite file locked 5 s under load: UNAVAILABLE meanwhile, no crash, serves again, no loss."""
    manager = ManagerProc(
        tmp_path / "m",
        pki.issue("manager", "m1", ips=("127.0.0.1",)),
        liveness=LIVENESS,
    )
    manager.config.write_text(manager.config.read_text().replace("[database]\n", DATABASE))
    manager.start()
    try:
        await manager.wait_serving()

        async def lock() -> tuple[float, float]:
            async with _sqlite_lock(manager.db):
                t0 = time.time()
                await asyncio.sleep(FAULT_SECONDS)
            return t0, time.time()

        out = await _under_fault(pki, manager, lock)
        rows = await asyncio.to_thread(manager.query, _BATCH_COUNTS)
        n = _stored_once(rows, out["acked"])
    finally:
        manager.stop()
    print(
        f"\nSQLite locked {out['fault']:.1f}s under 20 nodes: probe answers meanwhile "
        f"{out['during']}; served again {out['recovered']:.2f}s after the lock was released; "
        f"{n} acked batches all stored once; daemon-side failures {out['fleet_failures']}"
    )


# --- a private PostgreSQL instance ---------------------------------------------


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


class PrivatePostgres:
    """initdb + pg_ctl as the postgres user in a temp dir, on a free port (never the shared one)."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="fleet-pg-", dir="/tmp"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *argv: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def init_and_start(self) -> None:
        self._as_postgres(
            str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"
        )
        self.start()

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts,
            "-l", str(self.dir / "pg.log"), "-w", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Any:
    """A private PostgreSQL server for this test only (skips without the binaries)."""
    bin_dir = _pg_bin()
    if bin_dir is None:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail("PostgreSQL binaries (/usr/lib/postgresql/*/bin) are required under CI")
        pytest.skip("PostgreSQL binaries not found under /usr/lib/postgresql/*/bin")
    pg = PrivatePostgres(bin_dir)
    try:
        pg.init_and_start()
        yield pg
    finally:
        pg.destroy()


async def test_postgres_restart_under_load_unavailable_then_recovers(
    pki: Any, tmp_path: Path, private_postgres: PrivatePostgres
) -> None:
    """Private PostgreSQL restarted (fast, 5 s down) under load: UNAVAILABLE, recovery, no loss."""
    pg = private_postgres
    manager = ManagerProc(
        tmp_path / "m",
        pki.issue("manager", "m1", ips=("127.0.0.1",)),
        database_url=pg.url,
        liveness=LIVENESS,
    )
    manager.config.write_text(manager.config.read_text().replace("[database]\n", DATABASE))
    manager.start()
    try:
        await manager.wait_serving()

        async def restart() -> tuple[float, float]:
            t0 = time.time()
            await asyncio.to_thread(pg.stop, "fast")  # pg_ctl restart -m fast, held down longer
            await asyncio.sleep(FAULT_SECONDS)
            await asyncio.to_thread(pg.start)
            return t0, time.time()

        out = await _under_fault(pki, manager, restart)
        conn = await asyncpg.connect(pg.url.replace("postgresql+asyncpg", "postgresql"))
        try:
            rows = [tuple(r) for r in await conn.fetch(_BATCH_COUNTS)]
        finally:
            await conn.close()
        n = _stored_once(rows, out["acked"])
    finally:
        manager.stop()
    print(
        f"\nPostgreSQL stopped (-m fast) for {out['fault']:.1f}s under 20 nodes: probe answers "
        f"meanwhile {out['during']}; served again {out['recovered']:.2f}s after it was back; "
        f"{n} acked batches all stored once; daemon-side failures {out['fleet_failures']}"
    )
