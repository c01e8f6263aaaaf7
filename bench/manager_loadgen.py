"""Load generator of bench/manager_ingest.py: runs as its own process.

    python bench/manager_loadgen.py '<json spec>'

Simulates nodes, each with its own node certificate and connection to the
manager (identity is per connection, as with real daemons), and prints one
JSON object of results. Modes: `saturate` (back-to-back heartbeats over a
few channels), `metrics` (ReportMetrics as fast as acknowledged), `hold`
(N nodes at the interval the manager hands out, growing step by step).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import json
import os
import random
import resource
import sqlite3
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fleet.pki import CertificateAuthority  # noqa: E402
from fleet.v1 import common_pb2, manager_pb2, manager_pb2_grpc  # noqa: E402

NOFILE = 200_000


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


def _issue(ca: CertificateAuthority, name: str) -> tuple[bytes, bytes]:
    issued = ca.issue("node", name)
    return issued.key_pem, issued.cert_pem


def _issue_many(ca_dir: str, names: list[str]) -> list[tuple[bytes, bytes]]:
    ca = CertificateAuthority.load(Path(ca_dir) / "ca.pem", Path(ca_dir) / "ca-key.pem")
    return [_issue(ca, name) for name in names]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


@dataclass
class NodeConn:
    name: str
    channel: aio.Channel
    stub: manager_pb2_grpc.ManagerServiceStub
    sequence: int = 0
    interval: float = 10.0


class LoadGen:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        ca_dir = Path(spec["ca_dir"])
        self.ca = CertificateAuthority.load(ca_dir / "ca.pem", ca_dir / "ca-key.pem")
        self.root = (ca_dir / "ca.pem").read_bytes()
        self.target = f"127.0.0.1:{spec['port']}"
        self.server_name = f"manager.{self.ca.trust_domain}"
        self.nodes: list[NodeConn] = []
        self.issued: dict[str, tuple[bytes, bytes]] = {}
        """Certificates issued ahead of time: (key, cert) PEM by node name."""

    def issue_ahead(self, names: list[str]) -> None:
        """Issue certificates for `names` on every core, before any node runs.

        Issuing takes ~0.5 ms of CPU each; done on the event loop while a step
        ramps up, it stalled the running nodes' heartbeats for seconds.
        """
        ca_dir = Path(self.spec["ca_dir"])
        workers = os.cpu_count() or 1
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            parts = [names[i::workers] for i in range(workers)]
            for part, pems in zip(
                parts, pool.map(_issue_many, [str(ca_dir)] * workers, parts), strict=True
            ):
                self.issued.update(zip(part, pems, strict=True))

    def connect(self, name: str) -> NodeConn:
        key_pem, cert_pem = self.issued.pop(name, None) or _issue(self.ca, name)
        creds = grpc.ssl_channel_credentials(self.root, key_pem, cert_pem)
        channel = aio.secure_channel(
            self.target, creds, options=[("grpc.ssl_target_name_override", self.server_name)]
        )
        return NodeConn(name, channel, manager_pb2_grpc.ManagerServiceStub(channel))

    async def close(self) -> None:
        await asyncio.gather(*(n.channel.close() for n in self.nodes))

    async def register(
        self,
        nodes: list[NodeConn],
        concurrency: int = 64,
        on_registered: Any = None,
    ) -> int:
        sem = asyncio.Semaphore(concurrency)
        errors = 0

        async def one(n: NodeConn) -> None:
            nonlocal errors
            async with sem:
                for _ in range(20):
                    try:
                        resp = await n.stub.RegisterNode(
                            manager_pb2.RegisterNodeRequest(
                                node_id=n.name,
                                hostname=f"{n.name}.bench",
                                ip="127.0.0.1",
                                os="linux",
                                arch="x86_64",
                                labels={"bench": "yes"},
                                daemon_version="bench",
                                daemon_address="127.0.0.1:1",
                            ),
                            timeout=60,
                        )
                        n.interval = resp.heartbeat_interval_ms / 1000
                        if on_registered is not None:
                            on_registered(n)  # a daemon starts heartbeating at once
                        return
                    except grpc.aio.AioRpcError:
                        await asyncio.sleep(0.5)
                errors += 1

        await asyncio.gather(*(one(n) for n in nodes))
        return errors

    # -- saturation: back-to-back heartbeats over a few channels
    async def saturate(self) -> dict[str, Any]:
        spec = self.spec
        self.nodes = [self.connect(f"sat-{i:04d}") for i in range(spec["channels"])]
        if spec["register"]:
            await self.register(self.nodes)
        lat: list[float] = []
        errors = 0
        warm_until = time.perf_counter() + spec["warmup"]
        end = warm_until + spec["seconds"]

        async def worker(n: NodeConn) -> None:
            nonlocal errors
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    return
                try:
                    await n.stub.Heartbeat(
                        manager_pb2.HeartbeatRequest(
                            node_id=n.name, timestamp=int(time.time() * 1000)
                        )
                    )
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                t1 = time.perf_counter()
                if t0 >= warm_until:
                    lat.append(t1 - t0)

        await asyncio.gather(*(worker(n) for n in self.nodes for _ in range(spec["inflight"])))
        await self.close()
        return {
            "rate": len(lat) / spec["seconds"],
            "p50_ms": _pct(lat, 0.5) * 1000,
            "p99_ms": _pct(lat, 0.99) * 1000,
            "errors": errors,
            "calls": len(lat),
        }

    # -- metrics: batches of `batch` samples as fast as they are acknowledged
    async def metrics(self) -> dict[str, Any]:
        spec = self.spec
        self.nodes = [self.connect(f"met-{i:04d}") for i in range(spec["channels"])]
        await self.register(self.nodes)
        per_point = 50
        points = max(1, spec["batch"] // per_point)
        stored = 0
        exhausted = 0
        warm_until = time.perf_counter() + spec["warmup"]
        end = warm_until + spec["seconds"]

        async def worker(n: NodeConn) -> None:
            nonlocal stored, exhausted
            while time.perf_counter() < end:
                n.sequence += 1
                now = int(time.time() * 1000)
                req = manager_pb2.ReportMetricsRequest(
                    node_id=n.name,
                    sequence=n.sequence,
                    metrics=[
                        common_pb2.MetricData(
                            type="cpu",
                            timestamp=now - j,
                            values={f"core{k}": float(k) for k in range(per_point)},
                        )
                        for j in range(points)
                    ],
                )
                try:
                    resp = await n.stub.ReportMetrics(req)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        exhausted += 1
                        await asyncio.sleep(0.05)
                    continue
                if warm_until <= time.perf_counter() < end:
                    stored += resp.accepted

        await asyncio.gather(*(worker(n) for n in self.nodes for _ in range(spec["inflight"])))
        await self.close()
        return {
            "samples_per_s": stored / spec["seconds"],
            "exhausted": exhausted,
            "batch": points * per_point,
        }

    # -- hold: N nodes at their handed-out interval, growing step by step
    async def hold(self) -> dict[str, Any]:
        spec = self.spec
        steps: list[dict[str, Any]] = []
        lat: list[float] = []
        errors = 0
        measuring = False
        tasks: list[asyncio.Task[None]] = []
        rng = random.Random(1)

        async def node_loop(n: NodeConn) -> None:
            nonlocal errors
            await asyncio.sleep(rng.uniform(0, n.interval))
            next_metrics = time.monotonic() + rng.uniform(0, spec["metrics_interval"])
            while True:
                t0 = time.perf_counter()
                try:
                    resp = await n.stub.Heartbeat(
                        manager_pb2.HeartbeatRequest(
                            node_id=n.name, timestamp=int(time.time() * 1000)
                        ),
                        timeout=30,
                    )
                    n.interval = resp.heartbeat_interval_ms / 1000
                    if measuring:
                        lat.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError:
                    if measuring:
                        errors += 1
                if time.monotonic() >= next_metrics:
                    next_metrics += spec["metrics_interval"]
                    n.sequence += 1
                    now = int(time.time() * 1000)
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await n.stub.ReportMetrics(
                            manager_pb2.ReportMetricsRequest(
                                node_id=n.name,
                                sequence=n.sequence,
                                metrics=[
                                    common_pb2.MetricData(type=t, timestamp=now, values={"v": 1.0})
                                    for t in ("cpu", "memory", "disk", "network")
                                ],
                            ),
                            timeout=30,
                        )
                await asyncio.sleep(max(0.0, n.interval - (time.perf_counter() - t0)))

        lag: list[float] = []

        async def ticker() -> None:
            """The load generator's own event-loop lag: tells client stalls from server ones."""
            while True:
                t0 = time.perf_counter()
                await asyncio.sleep(0.01)
                if measuring:
                    lag.append(time.perf_counter() - t0 - 0.01)

        tasks.append(asyncio.create_task(ticker()))

        async def run_step(target: int) -> dict[str, Any]:
            nonlocal errors, measuring
            new = [self.connect(f"node-{i:06d}") for i in range(len(self.nodes), target)]
            t_reg = time.perf_counter()
            reg_errors = await self.register(
                new, on_registered=lambda n: tasks.append(asyncio.create_task(node_loop(n)))
            )
            reg_s = time.perf_counter() - t_reg
            self.nodes.extend(new)
            # reach steady state: every new node heartbeated once at its interval
            await asyncio.sleep(max(n.interval for n in new) if new else 0)
            lat.clear()
            lag.clear()
            errors = 0
            gc.collect()
            gc.freeze()  # the load generator's own long-lived objects: keep GC pauses short
            # The empty-handler reference has no /metrics and no database.
            mport = spec.get("metrics_port")
            before = await asyncio.to_thread(_scrape, mport) if mport else {}
            # CPU of both processes and of the machine over the window: shows
            # whether a miss is a saturated machine (the two processes share 2
            # cores) and whether anything else was running.
            manager_pid = spec.get("manager_pid")
            cpu0 = (
                _cpu_seconds(manager_pid) if manager_pid else 0.0,
                _cpu_seconds(),
                _machine_busy_seconds(),
            )
            t_window = time.perf_counter()
            measuring = True
            await asyncio.sleep(spec["hold"])
            measuring = False
            window = time.perf_counter() - t_window
            cpu1 = (
                _cpu_seconds(manager_pid) if manager_pid else 0.0,
                _cpu_seconds(),
                _machine_busy_seconds(),
            )
            after = await asyncio.to_thread(_scrape, mport) if mport else {}
            # cumulative: a node dropped while the step ramped up counts too
            offline = await asyncio.to_thread(_false_offline, spec["db"]) if "db" in spec else 0
            step = {
                "nodes": target,
                "interval_s": statistics.mean(n.interval for n in self.nodes),
                "hb_per_s": len(lat) / spec["hold"],
                "p50_ms": _pct(lat, 0.5) * 1000,
                "p99_ms": _pct(lat, 0.99) * 1000,
                "client_lag_p99_ms": _pct(lag, 0.99) * 1000,
                "server_handler_p99_ms": _bucket_p99(
                    before, after, "fleet_manager_rpc_duration_seconds", 'method="Heartbeat"'
                ),
                "server_lag_p99_ms": _bucket_p99(
                    before, after, "fleet_manager_event_loop_lag_seconds"
                ),
                "manager_cores": (cpu1[0] - cpu0[0]) / window,
                "loadgen_cores": (cpu1[1] - cpu0[1]) / window,
                "machine_cores": (cpu1[2] - cpu0[2]) / window,
                "errors": errors,
                "register_errors": reg_errors,
                "register_s": reg_s,
                "marked_offline": offline,
            }
            step["ok"] = (
                step["p99_ms"] < 50
                and errors == 0
                and reg_errors == 0
                and step["marked_offline"] == 0
            )
            return step

        self.issue_ahead([f"node-{i:06d}" for i in range(max(spec["steps"], default=0))])
        try:
            for target in spec["steps"]:
                try:
                    step = await run_step(target)
                except Exception as exc:  # e.g. out of file descriptors: report, stop
                    step = {"nodes": target, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
                steps.append(step)
                print(json.dumps({"progress": step}), file=sys.stderr, flush=True)
                # One noisy step (other work on the machine) must not end the
                # search; two failures in a row, or one that could not run, do.
                if "error" in step or (len(steps) > 1 and not (step["ok"] or steps[-2]["ok"])):
                    break
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.close()
        return {"steps": steps}


def _cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        cpu = [int(v) for v in f.readline().split()[1:]]
    idle = cpu[3] + cpu[4]  # idle + iowait
    return (sum(cpu[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _scrape(port: int) -> dict[str, float]:
    """The manager's /metrics samples as {"name{labels}": value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def _bucket_p99(
    before: dict[str, float], after: dict[str, float], name: str, label: str = ""
) -> float:
    """Upper bound (ms) of the bucket of histogram `name` holding the p99 of the interval.

    Only bucket lines containing `label` (e.g. 'method="Heartbeat"') count.
    """
    buckets = []
    for key, value in after.items():
        if key.startswith(f"{name}_bucket{{") and label in key:
            le = key.split('le="')[1].split('"')[0]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets.append((bound, value - before.get(key, 0.0)))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return float("nan")
    return next(b for b, n in buckets if n >= 0.99 * total) * 1000


def _false_offline(db: str) -> int:
    """NODE_OFFLINE events of simulated fleet nodes (all of them keep heartbeating).

    The saturation and metrics phases' nodes go silent afterwards and are
    rightly marked offline; only `node-*` ones count as false.
    """
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        row = conn.execute(
            "select count(*) from events where kind = 'NODE_OFFLINE' and node_id like 'node-%'"
        ).fetchone()
    finally:
        conn.close()
    return int(row[0])


def run_loadgen(spec: dict[str, Any]) -> None:
    _raise_nofile()
    gen = LoadGen(spec)
    result = asyncio.run(getattr(gen, spec["mode"])())
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    run_loadgen(json.loads(sys.argv[1]))
