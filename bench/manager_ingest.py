"""Manager ingest benchmark: heartbeats, metrics, and the largest fleet held.

    python bench/manager_ingest.py            # full run (several minutes)
    python bench/manager_ingest.py --smoke    # tiny run, seconds

Runs `fleet-manager serve` as its own process (mTLS, SQLite under a temp
dir) and drives it from a separate load-generator process
(bench/manager_loadgen.py) that simulates nodes, each with its own node
certificate and connection (identity is per connection, as with real
daemons). In the same run it measures the
references: an empty-handler grpc.aio server with the same mTLS settings,
and raw `sqlite3.executemany` into the same table layout on the same disk.

Prints (and with --json writes) heartbeats/s and p50/p99 at saturation with
the ratio to the reference, metric samples stored/s with the ratio to raw
executemany, and the largest N held at a 10 s heartbeat interval with
p99 < 50 ms and no node falsely marked offline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from grpc import aio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fleet.pki import CertificateAuthority  # noqa: E402
from fleet.tls import TLSConfig, server_credentials  # noqa: E402
from fleet.v1 import manager_pb2, manager_pb2_grpc  # noqa: E402

NOFILE = 200_000
FD_HEADROOM = 200
"""Descriptors a manager needs besides its nodes' sockets (database, listeners, logs)."""


def _raise_nofile() -> int:
    """Raise the open-file limit as far as allowed (one socket per node)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (NOFILE, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
            return want
        except (ValueError, OSError):
            continue
    return soft


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- reference: an empty-handler server with the same mTLS settings -----------


class _Empty(manager_pb2_grpc.ManagerServiceServicer):
    def __init__(self, interval_ms: int) -> None:
        self.interval_ms = interval_ms

    async def Heartbeat(self, request: Any, context: Any) -> Any:
        return manager_pb2.HeartbeatResponse(success=True, heartbeat_interval_ms=self.interval_ms)

    async def ReportMetrics(self, request: Any, context: Any) -> Any:
        return manager_pb2.ReportMetricsResponse(success=True, accepted=len(request.metrics))

    async def RegisterNode(self, request: Any, context: Any) -> Any:
        return manager_pb2.RegisterNodeResponse(
            success=True, heartbeat_interval_ms=self.interval_ms
        )


def run_reference(port: int, tls_dir: Path, interval_ms: int) -> None:
    async def serve() -> None:
        tls = TLSConfig(tls_dir / "ca.pem", tls_dir / "manager.pem", tls_dir / "manager-key.pem")
        server = aio.server(options=[("grpc.so_reuseport", 0)])
        manager_pb2_grpc.add_ManagerServiceServicer_to_server(_Empty(interval_ms), server)
        server.add_secure_port(f"127.0.0.1:{port}", server_credentials(tls))
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(1)

    asyncio.run(serve())


# --- orchestration -------------------------------------------------------------


@dataclass
class Results:
    hb_rate: float = 0.0
    hb_p50_ms: float = 0.0
    hb_p99_ms: float = 0.0
    ref_rate: float = 0.0
    ref_p50_ms: float = 0.0
    ref_p99_ms: float = 0.0
    samples_per_s: float = 0.0
    raw_samples_per_s: float = 0.0
    largest_n: int = 0
    steps: list[dict[str, Any]] = field(default_factory=list)
    ref_steps: list[dict[str, Any]] = field(default_factory=list)


class _NotListening(Exception):
    """The server exited before listening: most likely another process took its port first."""


def _listens(pid: int, port: int) -> bool:
    """Whether process `pid` itself listens on `port`.

    A successful connect is not proof: the port was free when picked, and
    another test's process may have taken it before the server bound it.
    """
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _NotListening(f"process exited with {proc.returncode} before listening on {port}")
        if _listens(proc.pid, port):
            return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port} after {timeout}s")


def _loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("manager_loadgen.py")), json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"load generator failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def raw_sqlite_rate(path: Path, rows: int, batch: int) -> float:
    """Rows/s of plain executemany into metric_samples' layout (WAL, synchronous=NORMAL)."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(
        "CREATE TABLE metric_samples (id INTEGER PRIMARY KEY AUTOINCREMENT, node_id TEXT,"
        " agent_id TEXT, type TEXT, name TEXT, ts_ms INTEGER, value REAL)"
    )
    conn.execute("CREATE INDEX ix ON metric_samples (node_id, type, ts_ms)")
    now = int(time.time() * 1000)
    data = [
        (f"met-{i % 64:04d}", "", "cpu", f"core{i % 50}", now - i, float(i)) for i in range(batch)
    ]
    done = 0
    t0 = time.perf_counter()
    while done < rows:
        with conn:
            conn.executemany(
                "INSERT INTO metric_samples (node_id, agent_id, type, name, ts_ms,"
                " value) VALUES (?, ?, ?, ?, ?, ?)",
                data,
            )
        done += batch
    elapsed = time.perf_counter() - t0
    conn.close()
    return done / elapsed


@contextlib.contextmanager
def _process(command: Callable[[int], list[str]], attempts: int = 3) -> Iterator[tuple[int, int]]:
    """Run `command(port)` on a free port until the block ends (SIGTERM, then kill).

    Yields (port, pid). A server that exits before listening is started
    again on another port (the picked port can be taken in between).
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Raised here and inherited: a preexec_fn would run Python between fork and exec in
    # a process with threads (gRPC's), which can deadlock or abort the child.
    _raise_nofile()
    for attempt in range(attempts):
        port = _free_port()
        proc = subprocess.Popen(command(port), env=env)
        try:
            _wait_port(port, proc)
            break
        except _NotListening as exc:
            if attempt == attempts - 1:
                raise SystemExit(f"{exc} ({attempts} attempts)") from None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    try:
        yield port, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Bench:
    """One run: a CA, certificates, and a fresh manager (and database) per phase."""

    def __init__(self, tmp: Path, smoke: bool) -> None:
        self.tmp = tmp
        self.smoke = smoke
        ca = CertificateAuthority.create()
        ca.write(tmp / "ca")
        mgr = ca.issue("manager", "bench", hostnames=("localhost",), ips=("127.0.0.1",))
        self.tls = mgr.write(tmp / "tls", stem="manager")
        self.phase = 0

    @contextlib.contextmanager
    def manager(self) -> Iterator[tuple[int, int, Path, int]]:
        """A fresh `fleet-manager serve` on a new SQLite file.

        Yields (port, metrics port, db, pid).
        """
        self.phase += 1
        state = self.tmp / f"state-{self.phase}"
        interval = 1.0 if self.smoke else 10.0
        cfg = self.tmp / f"manager-{self.phase}.toml"
        tls = self.tls
        ports: dict[str, int] = {}

        def command(port: int) -> list[str]:
            ports.update(port=port, metrics=_free_port())
            cfg.write_text(f"""
state_dir = "{state}"
[server]
listen = "127.0.0.1:{port}"
metrics_listen = "127.0.0.1:{ports["metrics"]}"
[tls]
ca_file = "{tls.ca_file}"
cert_file = "{tls.cert_file}"
key_file = "{tls.key_file}"
[liveness]
min_ttl_seconds = {interval}
max_heartbeat_rate = 1000000.0
failover_grace_seconds = 0.0
grace_seconds = {1.0 if self.smoke else 10.0}
[logging]
level = "warning"
""")
            return [sys.executable, "-m", "manager.cli", "serve", "--config", str(cfg)]

        with _process(command) as (port, pid):
            yield port, ports["metrics"], state / "manager.db", pid

    @contextlib.contextmanager
    def reference(self) -> Iterator[tuple[int, int]]:
        """The empty-handler server with the same mTLS settings; yields (port, pid)."""

        def command(port: int) -> list[str]:
            return [
                sys.executable,
                __file__,
                "--reference",
                str(port),
                str(self.tls.ca_file.parent),
                str(1000 if self.smoke else 10_000),
            ]

        with _process(command) as (port, pid):
            yield port, pid


def orchestrate(args: argparse.Namespace) -> Results:
    smoke = args.smoke
    res = Results()
    phases = set(args.phases.split(","))
    with tempfile.TemporaryDirectory(prefix="fleet-bench-", dir=args.tmpdir) as tmp_s:
        tmp = Path(tmp_s)
        bench = Bench(tmp, smoke)
        base = {
            "ca_dir": str(tmp / "ca"),
            "warmup": 0.5 if smoke else 3.0,
            "seconds": 1.0 if smoke else 15.0,
        }
        sat = {
            **base,
            "mode": "saturate",
            "channels": 4 if smoke else 32,
            "inflight": 2 if smoke else 4,
        }
        if "heartbeat" in phases:
            with bench.reference() as (ref_port, _):
                ref = _loadgen({**sat, "port": ref_port, "register": False})
            res.ref_rate, res.ref_p50_ms, res.ref_p99_ms = ref["rate"], ref["p50_ms"], ref["p99_ms"]
            with bench.manager() as (port, _, _, _):
                hb = _loadgen({**sat, "port": port, "register": True})
            res.hb_rate, res.hb_p50_ms, res.hb_p99_ms = hb["rate"], hb["p50_ms"], hb["p99_ms"]
        if "metrics" in phases:
            with bench.manager() as (port, _, db, _):
                met = _loadgen(
                    {
                        **base,
                        "mode": "metrics",
                        "port": port,
                        "channels": 4 if smoke else 16,
                        "inflight": 2 if smoke else 4,
                        "batch": 500,
                    }
                )
            res.samples_per_s = met["samples_per_s"]
            # Raw reference: the same row layout and index, 50,000 rows per
            # executemany transaction (the writer's largest group commit), same disk.
            res.raw_samples_per_s = raw_sqlite_rate(
                db.with_name("raw.db"),
                rows=20_000 if smoke else 2_000_000,
                batch=5_000 if smoke else 50_000,
            )
        if "hold" in phases:
            steps = (
                [int(s) for s in args.steps.split(",")]
                if args.steps
                else ([10, 20] if smoke else [2000, 5000, 10000, 15000, 20000, 25000, 30000])
            )
            # One socket per node in the manager (and in the load generator): a
            # fleet bigger than the open-file limit cannot be held by one process.
            fd_limit = _raise_nofile()
            fits = [n for n in steps if n + FD_HEADROOM <= fd_limit]
            too_big = [
                {
                    "nodes": n,
                    "ok": False,
                    "error": f"needs {n:,} sockets in one process; the open-file limit here is "
                    f"{fd_limit:,} (RLIMIT_NOFILE hard limit; raising it needs CAP_SYS_RESOURCE)",
                }
                for n in steps
                if n not in fits
            ]
            with bench.manager() as (port, mport, db, pid):
                hold = _loadgen(
                    {
                        "ca_dir": str(tmp / "ca"),
                        "mode": "hold",
                        "port": port,
                        "db": str(db),
                        "metrics_port": mport,
                        "manager_pid": pid,
                        "steps": fits,
                        "hold": 2.0 if smoke else args.hold,
                        "metrics_interval": 2.0 if smoke else 60.0,
                    }
                )
            res.steps = hold["steps"] + too_big
            # The same fleet sizes against the empty-handler server: what gRPC
            # and TLS alone cost at that many connections on this machine.
            with bench.reference() as (ref_port, ref_pid):
                ref_hold = _loadgen(
                    {
                        "ca_dir": str(tmp / "ca"),
                        "mode": "hold",
                        "port": ref_port,
                        "manager_pid": ref_pid,
                        "steps": fits,
                        "hold": 2.0 if smoke else args.hold,
                        "metrics_interval": 2.0 if smoke else 60.0,
                    }
                )
            res.ref_steps = ref_hold["steps"]
            res.largest_n = max((s["nodes"] for s in res.steps if s["ok"]), default=0)
    return res


def report(res: Results) -> str:
    hb_ratio = res.hb_rate / res.ref_rate if res.ref_rate else 0.0
    met_ratio = res.samples_per_s / res.raw_samples_per_s if res.raw_samples_per_s else 0.0
    lines = [
        "manager ingest benchmark",
        f"  heartbeats/s at saturation: {res.hb_rate:,.0f} (p50 {res.hb_p50_ms:.2f} ms, "
        f"p99 {res.hb_p99_ms:.2f} ms)",
        f"  empty-handler reference:    {res.ref_rate:,.0f} (p50 {res.ref_p50_ms:.2f} ms, "
        f"p99 {res.ref_p99_ms:.2f} ms)",
        f"  heartbeat ratio:            {hb_ratio:.2f}  (target >= 0.8)",
        f"  metric samples stored/s:    {res.samples_per_s:,.0f}",
        f"  raw sqlite3.executemany/s:  {res.raw_samples_per_s:,.0f}",
        f"  metric ratio:               {met_ratio:.3f}  (target >= 0.25)",
        "  fleet held at the handed-out interval (p99 < 50 ms, no false offline):",
    ]
    for s in res.steps:
        if "error" in s:
            lines.append(f"    N={s['nodes']:>6}: could not run: {s['error']} -> FAIL")
            continue
        lines.append(
            f"    N={s['nodes']:>6}: interval {s['interval_s']:.1f} s, {s['hb_per_s']:,.0f} hb/s, "
            f"p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms "
            f"[server: handler p99 <= {s['server_handler_p99_ms']:g} ms, loop lag p99 <= "
            f"{s['server_lag_p99_ms']:g} ms; client loop lag p99 {s['client_lag_p99_ms']:.1f} ms], "
            f"CPU [manager {s['manager_cores']:.2f}, load generator {s['loadgen_cores']:.2f}, "
            f"whole machine {s['machine_cores']:.2f} of {os.cpu_count()} cores], "
            f"errors {s['errors']}, "
            f"marked offline {s['marked_offline']:.0f}, register {s['register_s']:.1f} s "
            f"-> {'ok' if s['ok'] else 'FAIL'}"
        )
    lines.append(f"  largest N held: {res.largest_n}  (target >= 25,000)")
    if res.ref_steps:
        lines.append("  empty-handler reference at the same sizes (gRPC + mTLS alone):")
    for s in res.ref_steps:
        if "error" in s:
            lines.append(f"    N={s['nodes']:>6}: could not run: {s['error']}")
            continue
        lines.append(
            f"    N={s['nodes']:>6}: {s['hb_per_s']:,.0f} hb/s, p50 {s['p50_ms']:.1f} ms, "
            f"p99 {s['p99_ms']:.1f} ms, CPU [server {s['manager_cores']:.2f}, load generator "
            f"{s['loadgen_cores']:.2f}, whole machine {s['machine_cores']:.2f}], "
            f"errors {s['errors']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, not minutes")
    parser.add_argument("--steps", default="", help="comma-separated fleet sizes to hold")
    parser.add_argument("--hold", type=float, default=30.0, help="seconds measured per step")
    parser.add_argument(
        "--phases", default="heartbeat,metrics,hold", help="which parts to run (comma-separated)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--tmpdir", default=None, help="where the databases go (same disk)")
    parser.add_argument("--reference", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference:
        run_reference(int(args.reference[0]), Path(args.reference[1]), int(args.reference[2]))
        return 0
    res = orchestrate(args)
    print(report(res))
    if args.json:
        args.json.write_text(json.dumps(asdict(res), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
