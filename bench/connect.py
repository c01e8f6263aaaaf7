"""Control-channel benchmark: N nodes on Connect streams against one manager process.

    python bench/connect.py --nodes 2000 --procs 4 --hold 60
    python bench/connect.py --smoke          # tiny run, seconds

The manager (`fleet-manager serve`, SQLite) and, in the same run, a bare
grpc.aio reference server (Connect answers the hello, then only reads; same
mTLS and keepalive) each get N nodes from `--procs` load-generator processes
(this file with --loadgen): every node its own certificate and connection
(bench/connect_sim.ConnectNode), metrics every --metrics-interval s, a state
change now and then. During the hold, FleetService.ListAgents to random nodes
through the manager's pool measures command latency. Then the manager is
killed (-9) and restarted, and the time for all nodes to be welcomed again
is measured. Prints (and with --json writes) manager and reference CPU per
1,000 nodes and RSS per connection, command p50/p99, reconnect time and
NODE_OFFLINE events during the hold (false offline).

    python bench/connect.py --replicas 2 --nodes 1000 --procs 2 --hold 60
    python bench/connect.py --replicas 2 --smoke   # tiny, needs PostgreSQL

With `--replicas 2` two manager processes share a fresh PostgreSQL database
(`--postgres`, default $FLEET_TEST_POSTGRES_URL) with `[cluster]
advertise_address` set; half the nodes connect to each (`--procs` load
generators per replica). Commands go to replica A for random nodes: those
streaming to A run locally, the others are relayed to B (ReplicaService).
Reported: local and relayed command p50/p99, each replica's CPU per 1,000
of its nodes against the reference holding as many, the stream-directory
writes, false offline. No kill -9 phase in this mode.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import resource
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grpc import aio  # noqa: E402

from bench.connect_sim import ConnectNode  # noqa: E402
from fleet.keepalive import keepalive_args  # noqa: E402
from fleet.pki import CertificateAuthority  # noqa: E402
from fleet.retry import Backoff  # noqa: E402
from fleet.tls import (  # noqa: E402
    TLSConfig,
    channel_credentials,
    channel_options,
    server_credentials,
)
from fleet.v1 import fleet_pb2, fleet_pb2_grpc, manager_pb2, manager_pb2_grpc  # noqa: E402
from manager.config import ControlConfig  # noqa: E402

KEEPALIVE, KEEPALIVE_TIMEOUT = 30.0, 10.0
LOOPBACK_HOSTS = 64
"""The nodes dial the manager at 127.0.0.1 .. 127.0.0.64 (it listens on 0.0.0.0, its
default), as many hosts would: towards one address and port the kernel has one range of
ephemeral ports (~28,000) for every connection and TIME_WAIT, and each connect() of a
reconnect storm searched it (perf: ~40% of the machine's CPU in __inet_hash_connect)."""
DEFAULT_POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- the reference: a bare server holding idle streams ----------------------------------


class _Bare(manager_pb2_grpc.ManagerServiceServicer):
    async def Connect(self, request_iterator: Any, context: Any) -> Any:
        async for message in request_iterator:
            body = message.WhichOneof("body")
            if body == "hello":
                welcome = manager_pb2.RegisterNodeResponse(success=True)
                yield manager_pb2.ConnectResponse(reply_to=message.id, welcome=welcome)
            elif body == "metrics":
                yield manager_pb2.ConnectResponse(
                    reply_to=message.id, metrics=manager_pb2.ReportMetricsResponse(success=True)
                )
            elif body == "agent_states":
                yield manager_pb2.ConnectResponse(
                    reply_to=message.id,
                    agent_states=manager_pb2.SyncAgentStatesResponse(success=True),
                )


def run_reference(port: int, files: list[str]) -> None:
    """Serve the bare reference until SIGTERM (files: CA, certificate, key)."""

    async def serve() -> None:
        tls = TLSConfig(*(Path(f) for f in files))
        server = aio.server(
            options=[
                *keepalive_args(KEEPALIVE, KEEPALIVE_TIMEOUT),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
                ("grpc.keepalive_permit_without_calls", 1),
            ]
        )
        manager_pb2_grpc.add_ManagerServiceServicer_to_server(_Bare(), server)
        server.add_secure_port(f"127.0.0.1:{port}", server_credentials(tls))
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(1)

    asyncio.run(serve())


# --- a load generator: a slice of the nodes ----------------------------------------------


async def _loadgen(spec: dict[str, Any]) -> None:
    """Hold spec["ids"] nodes; print "connected" lines; on stdin "since T" print when every
    node was welcomed after T; on EOF stop."""
    _raise_nofile()
    ca = CertificateAuthority.load(Path(spec["ca_cert"]), Path(spec["ca_key"]))
    root = Path(spec["root"])
    rng = random.Random(spec["seed"])
    nodes = []
    port = spec["address"].rsplit(":", 1)[1]
    for i, node_id in enumerate(spec["ids"]):
        tls = ca.issue("node", node_id, ips=("127.0.0.1",)).write(root / node_id)
        address = spec["address"]
        if spec.get("spread_hosts"):  # 127.0.0.1 .. 127.0.0.<spread_hosts>
            address = f"127.0.0.{1 + (spec['seed'] + i) % spec['spread_hosts']}:{port}"
        nodes.append(
            ConnectNode(
                node_id,
                tls,
                ca.trust_domain,
                (address,),
                metrics_interval=spec["metrics_interval"],
                state_change_interval=spec["state_change_interval"],
                keepalive=(KEEPALIVE, KEEPALIVE_TIMEOUT),
                # The daemon's own: 0.5 s to 30 s with full jitter, 10 s call deadlines.
                reconnect=Backoff(initial=0.5, maximum=spec["backoff_max"]),
                rpc_timeout=spec["rpc_timeout"],
                rng=random.Random(rng.random()),
            )
        )
    for node in nodes:
        node.start()
        await asyncio.sleep(spec["spread"] / max(1, len(nodes)))
    await asyncio.gather(*(n.connected.wait() for n in nodes))
    print(json.dumps({"connected": len(nodes)}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        # "since T [within W]": report once every node was welcomed after T, or at T + W
        # with how many were (so a reconnect that does not finish still has its figures).
        words = line.split()
        since = float(words[1])
        until = since + float(words[3]) if len(words) > 3 else float("inf")

        while True:  # polled: the nodes share no event
            if all(_back(n, since) for n in nodes) or time.time() >= until:
                break
            await asyncio.sleep(0.2)
        returned = [n for n in nodes if _back(n, since)]
        last = max((n.record.welcomes[-1] for n in returned), default=None)
        attempts = sum(1 for n in nodes for t in n.record.attempts if t >= since)
        dials = sum(1 for n in nodes for t in n.record.dials if t >= since)
        failed = sum(1 for n in nodes for t in n.record.failed_dials if t >= since)
        ended = [(e, why) for n in nodes for t, e, why in n.record.ended_at if t >= since]
        ends = collections.Counter(e for e, _ in ended)
        why = dict(ended)  # one example of each (the last)
        ages = collections.Counter(a for n in nodes for t, a in n.record.ages if t >= since)
        # Each node's first welcome since the kill, by whole second after it (the rate).
        rate = collections.Counter(
            int(min(t for t in n.record.welcomes if t >= since) - since) for n in returned
        )
        line = {
            "welcomed_by": last,
            "welcomed": len(returned),
            "all": len(returned) == len(nodes),
            "attempts": attempts,
            "dials": dials,
            "failed_dials": failed,
        }
        print(
            json.dumps({**line, "ends": ends, "why": why, "ages": ages, "per_second": rate}),
            flush=True,
        )
    await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)


def _back(node: ConnectNode, since: float) -> bool:
    """Whether `node` was welcomed again after `since`."""
    return bool(node.record.welcomes) and node.record.welcomes[-1] >= since


# --- the manager under cProfile (--profile) ----------------------------------------------


def run_profiled_manager(out: str, argv: list[str]) -> None:
    """`fleet-manager` with cProfile of its main thread (the event loop) between SIGUSR1
    (start) and SIGUSR2 (stop, write `out`), so only the hold is profiled."""
    import cProfile

    profile = cProfile.Profile()
    if os.environ.get("BENCH_PROFILE_FROM_START"):  # the restart after kill -9
        profile.enable()

    def begin(*_: Any) -> None:
        profile.enable()

    def end(*_: Any) -> None:
        profile.disable()
        profile.dump_stats(out)

    signal.signal(signal.SIGUSR1, begin)
    signal.signal(signal.SIGUSR2, end)
    from manager.cli import app

    app(argv, standalone_mode=False)


# --- orchestration ------------------------------------------------------------------------


class _Gens:
    """The load-generator processes of one target."""

    def __init__(self, spec: dict[str, Any], ids: list[str], procs: int) -> None:
        self.lines: list[dict[str, Any]] = []
        """Every line read, parsed."""
        self.procs = []
        for i in range(procs):
            part = {**spec, "ids": ids[i::procs], "seed": i}
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--loadgen", json.dumps(part)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )

    def read_all(self, key: str, within: float | None = None) -> list[Any]:
        """Each generator's next line's `key`; SystemExit if one is not there `within` s."""
        deadline = None if within is None else time.monotonic() + within
        out = []
        for p in self.procs:
            assert p.stdout is not None
            if deadline is not None:
                ready, _, _ = select.select([p.stdout], [], [], max(0, deadline - time.monotonic()))
                if not ready:
                    raise SystemExit(
                        f"a load generator's nodes were not all {key} within {within:g} s "
                        "(the machine could not keep up; see the figures above)"
                    )
            line = p.stdout.readline()
            if not line:
                raise SystemExit(f"a load generator exited ({p.wait()})")
            self.lines.append(json.loads(line))
            out.append(self.lines[-1][key])
        return out

    def ask(self, line: str) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(line + "\n")
            p.stdin.flush()

    def stop(self) -> None:
        for p in self.procs:
            if p.stdin is not None:
                p.stdin.close()
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def _machine_busy() -> float:
    """Core-seconds every process on the machine has used since boot (not idle)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq + t.steal)


def _thread_cpu(pid: int, tid: int) -> float:
    for t in psutil.Process(pid).threads():
        if t.id == tid:
            return float(t.user_time + t.system_time)
    return 0.0


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


async def _commands(
    address: str, operator: TLSConfig, td: str, ids: list[str], seconds: float, rate: float
) -> list[tuple[str, float]]:
    """Live ListAgents to random nodes through the manager's pool (down the nodes' streams,
    or relayed) for `seconds`; (node, latency s) of each that answered. A node the
    manager could not ask is a SystemExit: the figures would not be what they say."""
    channel = aio.secure_channel(
        address, channel_credentials(operator), options=channel_options(f"manager.{td}")
    )
    stub = fleet_pb2_grpc.FleetServiceStub(channel)
    lat: list[tuple[str, float]] = []
    end = time.monotonic() + seconds
    rng = random.Random(1)
    if rate <= 0:  # idle: the manager only holds the streams and stores their batches
        await asyncio.sleep(seconds)
    while rate > 0 and time.monotonic() < end:
        t0 = time.monotonic()
        node = rng.choice(ids)
        reply = await stub.ListAgents(
            fleet_pb2.FleetServiceListAgentsRequest(node_id=node, live=True), timeout=30
        )
        if reply.errors:
            raise SystemExit(f"live ListAgents of {node} failed: {reply.errors[0].message}")
        lat.append((node, time.monotonic() - t0))
        await asyncio.sleep(max(0.0, 1 / rate - (time.monotonic() - t0)))
    await channel.close()
    return lat


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000 if s else 0.0


def _reference(
    tls: TLSConfig, spec: dict[str, Any], ids: list[str], procs: int, hold: float
) -> dict[str, Any]:
    """The bare server holding `ids` idle streams for `hold` s: its CPU per 1,000 and RSS."""
    ref_port = _free_port()
    files = (tls.ca_file, tls.cert_file, tls.key_file)
    ref = subprocess.Popen(
        [sys.executable, __file__, "--reference", str(ref_port), *map(str, files)]
    )
    time.sleep(2)
    gens = _Gens({**spec, "address": f"127.0.0.1:{ref_port}"}, ids, procs)
    try:
        gens.read_all("connected")
        cpu0 = _cpu(ref.pid)
        time.sleep(hold)
        return {
            "ref_cpu_per_1000": (_cpu(ref.pid) - cpu0) / hold / len(ids) * 1000,
            "ref_rss_mb": _rss(ref.pid) / 2**20,
        }
    finally:
        gens.stop()
        ref.terminate()
        ref.wait(30)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    _raise_nofile()
    ca = CertificateAuthority.create()
    ca_cert, ca_key = ca.write(work / "ca")
    manager_tls = ca.issue("manager", "m1", ips=("127.0.0.1",)).write(work / "manager")
    operator = ca.issue("operator", "bench").write(work / "operator")
    ids = [f"cn-{i:05d}" for i in range(args.nodes)]
    spec = {
        "ca_cert": str(ca_cert),
        "ca_key": str(ca_key),
        "root": str(work / "nodes"),
        "metrics_interval": args.metrics_interval,
        "state_change_interval": args.state_change_interval,
        "spread": args.spread,
        "backoff_max": 30.0,
        "rpc_timeout": 10.0,
    }
    out: dict[str, Any] = {"nodes": args.nodes, "procs": args.procs}

    # The reference first: same nodes, same keepalive, nothing but idle streams.
    out.update(_reference(manager_tls, spec, ids, args.procs, args.hold))

    port = _free_port()
    state = work / "mstate"
    config = work / "manager.toml"
    config.write_text(
        f'state_dir = "{state}"\n[server]\nlisten = "0.0.0.0:{port}"\nmetrics_listen = ""\n'
        + f'[tls]\nca_file = "{manager_tls.ca_file}"\ncert_file = "{manager_tls.cert_file}"\n'
        f'key_file = "{manager_tls.key_file}"\n'
        f"[control]\nkeepalive_time_seconds = {KEEPALIVE}\n"
        f"keepalive_timeout_seconds = {KEEPALIVE_TIMEOUT}\n"
        + (
            f"max_hellos_per_second = {args.max_hellos_per_second}\n"
            if args.max_hellos_per_second
            else ""
        )
        + '[logging]\nlevel = "warning"\n'
    )
    argv = [sys.executable, "-m", "manager.cli", "serve", "--config", str(config)]
    if args.profile:
        argv = [sys.executable, __file__, "--profiled-manager", str(args.profile.resolve())]
        argv += ["serve", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    manager = subprocess.Popen(argv, env=env)
    time.sleep(3)
    base_rss = _rss(manager.pid)
    gens = _Gens(
        {**spec, "address": f"127.0.0.1:{port}", "spread_hosts": LOOPBACK_HOSTS}, ids, args.procs
    )
    try:
        gens.read_all("connected")
        time.sleep(min(10.0, args.hold / 3))  # the initial snapshots and batches settle
        t_hold = time.time()
        cpu0 = _cpu(manager.pid)
        if args.profile:
            manager.send_signal(signal.SIGUSR1)
        lat = [
            t
            for _, t in asyncio.run(
                _commands(
                    f"127.0.0.1:{port}",
                    operator,
                    ca.trust_domain,
                    ids,
                    args.hold,
                    args.command_rate,
                )
            )
        ]
        out["manager_cpu_per_1000"] = (_cpu(manager.pid) - cpu0) / args.hold / args.nodes * 1000
        if args.profile:
            args.profile.unlink(missing_ok=True)
            manager.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + 60
            while not args.profile.exists() and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(1)  # written by now
        out["manager_rss_per_conn_kb"] = (_rss(manager.pid) - base_rss) / args.nodes / 1024
        out["cpu_ratio_to_ref"] = out["manager_cpu_per_1000"] / max(1e-9, out["ref_cpu_per_1000"])
        out["commands"] = len(lat)
        out["command_p50_ms"] = _pct(lat, 0.5)
        out["command_p99_ms"] = _pct(lat, 0.99)
        with sqlite3.connect(f"file:{state / 'manager.db'}?mode=ro", uri=True) as db:
            out["false_offline"] = db.execute(
                "SELECT COUNT(*) FROM events WHERE kind = 'NODE_OFFLINE' AND ts_ms >= ?",
                (int(t_hold * 1000),),
            ).fetchone()[0]
        _say(f"hold: {json.dumps(out)}")  # kept even if the reconnect below never ends
        if args.kill:
            manager.send_signal(signal.SIGKILL)
            manager.wait()
            t_kill = time.time()
            # The load generators' and the whole machine's CPU from the kill on: what the
            # manager shares the cores with during the reconnect.
            gens_cpu0 = sum(_cpu(p.pid) for p in gens.procs)
            busy0 = _machine_busy()
            if args.profile:  # the restarted manager, from its start to all welcomed
                restart_profile = args.profile.with_suffix(".reconnect.prof")
                argv[3] = str(restart_profile.resolve())
                env["BENCH_PROFILE_FROM_START"] = "1"
            manager = subprocess.Popen(argv, env=env)
            gens.ask(f"since {t_kill} within {args.reconnect_within}")
            try:
                welcomed = gens.read_all("welcomed_by", within=args.reconnect_within + 120)
                out["reconnect_welcomed"] = sum(
                    line["welcomed"] for line in gens.lines[-args.procs :]
                )
                if all(line["all"] for line in gens.lines[-args.procs :]):
                    out["reconnect_all_s"] = max(welcomed) - t_kill
                else:
                    out["reconnect_all_s"] = None
                    out["reconnect_failed"] = (
                        f"{out['reconnect_welcomed']} of {args.nodes} nodes welcomed again "
                        f"within {args.reconnect_within:g} s; the figures below are to then"
                    )
                # Hellos tried and connections opened (a TLS handshake each; a hello
                # retried on a kept connection is not one) since the kill, and the
                # manager's CPU from its start until every node was welcomed.
                out["reconnect_attempts"] = sum(line.get("attempts", 0) for line in gens.lines)
                out["reconnect_connections"] = sum(line.get("dials", 0) for line in gens.lines)
                # Of them, dials that failed before any hello: refused while the manager
                # was down (no handshake), or not connected within the connect timeout.
                out["reconnect_failed_dials"] = sum(
                    line.get("failed_dials", 0) for line in gens.lines
                )
                # How the attempts since the kill ended (the kill's own breaks included).
                ends: collections.Counter[str] = collections.Counter()
                for line in gens.lines:
                    ends.update(line.get("ends", {}))
                out["reconnect_ends"] = dict(ends.most_common())
                # Hellos that ended before a welcome, by how long after their stream opened:
                # at once ("<0.1s") is gRPC core shedding calls the loop has not taken.
                ages: collections.Counter[str] = collections.Counter()
                for line in gens.lines:
                    ages.update(line.get("ages", {}))
                out["reconnect_hello_end_ages"] = dict(sorted(ages.items()))
                # Nodes welcomed again in the busiest second, against the manager's
                # hello ceiling ([control] max_hellos_per_second).
                per_second: collections.Counter[str] = collections.Counter()
                for line in gens.lines:
                    per_second.update(line.get("per_second", {}))
                out["reconnect_peak_welcomes_per_s"] = max(per_second.values(), default=0)
                # The curve: nodes welcomed again in each 10 s after the kill.
                curve: collections.Counter[int] = collections.Counter()
                for second, n in per_second.items():
                    curve[int(second) // 10 * 10] += n
                out["reconnect_welcomes_per_10s"] = dict(sorted(curve.items()))
                out["max_hellos_per_second"] = (
                    args.max_hellos_per_second or ControlConfig().max_hellos_per_second
                )
                out["reconnect_end_examples"] = {
                    e: w for line in gens.lines for e, w in line.get("why", {}).items()
                }
                out["reconnect_manager_cpu_s"] = _cpu(manager.pid)
                # Its event loop's thread (Python) apart from the rest (gRPC core's
                # threads: TLS handshakes, HTTP/2; aiosqlite's thread).
                out["reconnect_manager_loop_cpu_s"] = _thread_cpu(manager.pid, manager.pid)
                out["reconnect_loadgen_cpu_s"] = sum(_cpu(p.pid) for p in gens.procs) - gens_cpu0
                out["reconnect_machine_busy_s"] = _machine_busy() - busy0
                # Nodes marked offline since the kill (the failover grace should cover it).
                with sqlite3.connect(f"file:{state / 'manager.db'}?mode=ro", uri=True) as db:
                    out["reconnect_offline"] = db.execute(
                        "SELECT COUNT(*) FROM events WHERE kind = 'NODE_OFFLINE' AND ts_ms >= ?",
                        (int(t_kill * 1000),),
                    ).fetchone()[0]
                if args.profile:
                    manager.send_signal(signal.SIGUSR2)
                    time.sleep(5)
            except SystemExit as exc:
                out["reconnect_all_s"] = None
                out["reconnect_failed"] = str(exc)
    finally:
        gens.stop()
        manager.terminate()
        manager.wait(30)
    return out


# --- two replicas on PostgreSQL -----------------------------------------------------------


def _pg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _create_database(server_url: str) -> str:
    """A fresh database on the server of `server_url`; its URL."""
    import asyncpg  # only this mode needs PostgreSQL
    from sqlalchemy.engine import make_url

    url = make_url(server_url)
    name = f"fleet_bench_{os.getpid()}_{int(time.time())}"
    admin = await asyncpg.connect(_pg_dsn(url.render_as_string(hide_password=False)), timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return url.set(database=name).render_as_string(hide_password=False)


async def _drop_database(db_url: str) -> None:
    import asyncpg
    from sqlalchemy.engine import make_url

    url = make_url(db_url)
    name = url.database
    admin_url = url.set(database="postgres").render_as_string(hide_password=False)
    admin = await asyncpg.connect(_pg_dsn(admin_url), timeout=5)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def _query(db_url: str, sql: str, *params: Any) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(_pg_dsn(db_url), timeout=5)
    try:
        return list(await conn.fetch(sql, *params))
    finally:
        await conn.close()


def _scrape(port: int) -> dict[str, float]:
    """A manager's /metrics as {sample: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _wait_serving(port: int, proc: subprocess.Popen[bytes], within: float = 120.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"a manager exited ({proc.returncode}) before serving")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit(f"no manager serving on port {port} within {within:g} s")


def _say(text: str) -> None:
    """Progress on stderr (a big run takes many minutes)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run_replicas(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """N nodes split over two manager processes on PostgreSQL; commands on replica A."""
    _raise_nofile()
    server_url = args.postgres or os.environ.get("FLEET_TEST_POSTGRES_URL", DEFAULT_POSTGRES)
    ca = CertificateAuthority.create()
    ca_cert, ca_key = ca.write(work / "ca")
    names = ("m1", "m2")
    tls = {n: ca.issue("manager", n, ips=("127.0.0.1",)).write(work / n) for n in names}
    operator = ca.issue("operator", "bench").write(work / "operator")
    per = args.nodes // 2
    ids = [f"cn-{i:05d}" for i in range(per * 2)]
    halves = {"m1": ids[:per], "m2": ids[per:]}
    spec = {
        "ca_cert": str(ca_cert),
        "ca_key": str(ca_key),
        "root": str(work / "nodes"),
        "metrics_interval": args.metrics_interval,
        "state_change_interval": args.state_change_interval,
        "spread": args.spread,
        "backoff_max": 30.0,
        "rpc_timeout": 10.0,
    }
    out: dict[str, Any] = {"nodes": per * 2, "replicas": 2, "procs_per_replica": args.procs}
    # The reference holds as many streams as one replica does.
    _say(f"reference: {per} nodes")
    ref_spec = {**spec, "spread": args.reference_spread or args.spread}
    out.update(_reference(tls["m1"], ref_spec, halves["m1"], args.procs, args.hold))

    db_url = asyncio.run(_create_database(server_url))
    _say(f"reference done: {out['ref_cpu_per_1000']:.3f} core per 1,000; starting replicas")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ports = {n: _free_port() for n in names}
    metrics_ports = {n: _free_port() for n in names}
    managers: dict[str, subprocess.Popen[bytes]] = {}
    gens: list[_Gens] = []
    try:
        for n in names:
            t = tls[n]
            config = work / f"{n}.toml"
            config.write_text(
                f'state_dir = "{work / n}"\n'
                f'[server]\nlisten = "127.0.0.1:{ports[n]}"\n'
                f'metrics_listen = "127.0.0.1:{metrics_ports[n]}"\n'
                f'[tls]\nca_file = "{t.ca_file}"\ncert_file = "{t.cert_file}"\n'
                f'key_file = "{t.key_file}"\n'
                f'[database]\nurl = "{db_url}"\n'
                f"[control]\nkeepalive_time_seconds = {KEEPALIVE}\n"
                f"keepalive_timeout_seconds = {KEEPALIVE_TIMEOUT}\n"
                f'[cluster]\nadvertise_address = "127.0.0.1:{ports[n]}"\n'
                '[logging]\nlevel = "warning"\n'
            )
            argv = [sys.executable, "-m", "manager.cli", "serve", "--config", str(config)]
            managers[n] = subprocess.Popen(argv, env=env)
            _wait_serving(ports[n], managers[n])  # one after the other: one migrates
        base_rss = {n: _rss(p.pid) for n, p in managers.items()}
        for n in names:
            gens.append(_Gens({**spec, "address": f"127.0.0.1:{ports[n]}"}, halves[n], args.procs))
        _say(f"replicas serving; connecting {per} nodes to each")
        t_connect = time.monotonic()
        for g in gens:
            g.read_all("connected", within=args.connect_within)
        out["connect_all_s"] = time.monotonic() - t_connect
        # Every stream recorded in the directory before commands are timed.
        deadline = time.monotonic() + 120
        while True:
            rows = asyncio.run(
                _query(
                    db_url,
                    "SELECT replica_id, COUNT(*) AS c FROM control_streams GROUP BY replica_id",
                )
            )
            if {r["replica_id"]: r["c"] for r in rows} == dict.fromkeys(names, per):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the stream directory did not fill: {rows}")
            time.sleep(0.5)
        _say(f"all connected after {out['connect_all_s']:.0f} s and recorded; holding")
        time.sleep(min(10.0, args.hold / 3))  # the initial snapshots and batches settle
        writes0 = {n: _scrape(metrics_ports[n]) for n in names}
        t_hold = time.time()
        cpu0 = {n: _cpu(p.pid) for n, p in managers.items()}
        lat = asyncio.run(
            _commands(
                f"127.0.0.1:{ports['m1']}",
                operator,
                ca.trust_domain,
                ids,
                args.hold,
                args.command_rate,
            )
        )
        cpu = {n: (_cpu(p.pid) - cpu0[n]) / args.hold / per * 1000 for n, p in managers.items()}
        after = {n: _scrape(metrics_ports[n]) for n in names}
        local_ids = set(halves["m1"])
        local = [t for node, t in lat if node in local_ids]
        relayed = [t for node, t in lat if node not in local_ids]
        out["manager_cpu_per_1000"] = cpu
        out["cpu_ratio_to_ref"] = {
            n: c / max(1e-9, out["ref_cpu_per_1000"]) for n, c in cpu.items()
        }
        out["manager_rss_per_conn_kb"] = {
            n: (_rss(p.pid) - base_rss[n]) / per / 1024 for n, p in managers.items()
        }
        out["commands_local"] = len(local)
        out["commands_relayed"] = len(relayed)
        out["local_p50_ms"], out["local_p99_ms"] = _pct(local, 0.5), _pct(local, 0.99)
        out["relayed_p50_ms"], out["relayed_p99_ms"] = _pct(relayed, 0.5), _pct(relayed, 0.99)
        key = 'fleet_manager_relayed_commands_total{code="OK"}'
        out["relayed_ok_on_a"] = after["m1"].get(key, 0.0) - writes0["m1"].get(key, 0.0)
        w = "fleet_manager_stream_directory_writes"
        out["directory_writes_at_connect"] = {n: writes0[n].get(w, 0.0) for n in names}
        out["directory_writes_during_hold"] = {
            n: after[n].get(w, 0.0) - writes0[n].get(w, 0.0) for n in names
        }
        out["false_offline"] = asyncio.run(
            _query(
                db_url,
                "SELECT COUNT(*) AS c FROM events WHERE kind = 'NODE_OFFLINE' AND ts_ms >= $1",
                int(t_hold * 1000),
            )
        )[0]["c"]
    finally:
        for g in gens:
            g.stop()
        for p in managers.values():
            p.terminate()
        for p in managers.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        asyncio.run(_drop_database(db_url))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--procs", type=int, default=4, help="load-generator processes")
    parser.add_argument("--hold", type=float, default=60.0, help="seconds measured")
    parser.add_argument("--spread", type=float, default=20.0, help="seconds to start each slice")
    parser.add_argument(
        "--reference-spread",
        type=float,
        help="--replicas 2: the reference's --spread (it only holds idle streams: a big "
        "run need not connect it as slowly as the replicas; default: --spread)",
    )
    parser.add_argument("--metrics-interval", type=float, default=60.0)
    parser.add_argument("--state-change-interval", type=float, default=300.0)
    parser.add_argument(
        "--command-rate", type=float, default=20.0, help="ListAgents per second (0: idle)"
    )
    parser.add_argument(
        "--profile", type=Path, help="cProfile the manager's event loop during the hold to this"
    )
    parser.add_argument(
        "--max-hellos-per-second",
        type=float,
        help="the manager's [control] max_hellos_per_second (default: its own)",
    )
    parser.add_argument("--no-kill", dest="kill", action="store_false")
    parser.add_argument("--smoke", action="store_true", help="a tiny run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--replicas", type=int, choices=(1, 2), default=1, help="manager processes (2: PostgreSQL)"
    )
    parser.add_argument("--postgres", help="PostgreSQL server URL for --replicas 2")
    parser.add_argument(
        "--connect-within",
        type=float,
        default=1800.0,
        help="--replicas 2: give up if not every node is connected within this (s)",
    )
    parser.add_argument(
        "--reconnect-within",
        type=float,
        default=600.0,
        help="after kill -9: give up if not every node is welcomed again within this (s)",
    )
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)
    parser.add_argument("--reference", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--profiled-manager", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profiled_manager:
        run_profiled_manager(args.profiled_manager[0], args.profiled_manager[1:])
        return 0
    if args.loadgen:
        asyncio.run(_loadgen(json.loads(args.loadgen)))
        return 0
    if args.reference:
        run_reference(int(args.reference[0]), args.reference[1:])
        return 0
    if args.smoke:
        args.nodes, args.procs, args.hold, args.spread = 20, 2, 5.0, 1.0
        args.metrics_interval, args.state_change_interval = 2.0, 3.0
        if args.replicas == 2:
            args.procs = 1  # per replica
    # In memory (the managers' databases and logs, 16,000 nodes' keys); removed after
    # a finished run, kept after a failed one for its logs.
    prefix = "bench-replicas-" if args.replicas == 2 else "bench-connect-"
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/dev/shm"))
    try:
        result = run_replicas(args, work) if args.replicas == 2 else run(args, work)
    except BaseException:
        _say(f"kept {work} (logs, databases) for a look; remove it when done")
        raise
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
