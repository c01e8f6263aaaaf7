"""Fan-out benchmark: a restart of N agents through FleetService vs a bare asyncio.gather.

    python bench/fanout.py            # N = 500 simulated daemons (about a minute)
    python bench/fanout.py --smoke    # N = 6, seconds

N simulated daemons (`bench/sim.py`: in-memory DaemonService, each on its
own 127.0.0.1 port with its own node certificate) run in one child process.
This process runs a real manager (ManagerServer: mTLS, SQLite in a temp
dir); every simulated node registers with it and syncs its agents, as a
daemon does. Then, alternating, it measures:

- fleet: an operator's `OperateAgents(restart web on every node,
  max_concurrency=N, batch_results)` through FleetService (as fleetctl
  sends it), until the end of the stream (resolution from the database,
  audit and events, N pooled calls, N streamed results in batches, the
  summary, the closing audit);
- reference: the same N `DaemonService.OperateAgent(restart web)` calls
  made with one bare `asyncio.gather` over N grpc.aio channels opened (and
  connected) beforehand, with the pool's channel arguments, from this same
  process.

Rounds alternate, each side after a 0.25 s pause (so neither is timed
while the other's trailing work runs). The pool is warmed by one fan-out
first (the reference's channels are pre-opened too), so both measure
steady-state calls; in production the pool opens channels lazily, so a
manager's first fan-out also pays the connections. The manager child, the
simulated daemons' process and this process all take their start-up
objects out of the cyclic GC (gc.freeze) before timing, as fleet-manager
does once started (the manager child also collects as rarely as it does:
`manager.gc_tuning.settle_gc`): otherwise full collections of the one
process that holds all N daemons' servers land in whichever round they
happen to hit.

Prints the median of the rounds and the ratio (the issue's target is
<= 1.25x), and the CPU time of each process per round (less sensitive to
other jobs than wall time). Then checks with the pool's own counters that
every daemon had its own channel and exactly one connection, and with the
daemons' view that no two of them saw the same client connection.
Exits 1 if a check fails or any target was not OK.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from grpc import aio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sim import DEFAULT_AGENTS  # noqa: E402
from fleet.pki import CertificateAuthority, Identity  # noqa: E402
from fleet.tls import TLSConfig, channel_credentials, channel_options  # noqa: E402
from fleet.v1 import (  # noqa: E402
    common_pb2,
    daemon_pb2,
    daemon_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    manager_pb2,
    manager_pb2_grpc,
)
from manager.config import (  # noqa: E402
    DatabaseConfig,
    LivenessConfig,
    ManagerConfig,
    ServerConfig,
    TLSFiles,
)
from manager.gc_tuning import settle_gc  # noqa: E402
from manager.pool import PoolConfig  # noqa: E402
from manager.pool.channel import NODE_ARG, channel_args  # noqa: E402
from manager.server import ManagerServer  # noqa: E402

if TYPE_CHECKING:
    from fleet.v1.daemon_pb2_grpc import DaemonServiceAsyncStub
    from fleet.v1.fleet_pb2_grpc import FleetServiceAsyncStub

RESTART = common_pb2.AGENT_OPERATION_RESTART


class Child:
    """A helper process spoken to in JSON lines: a request on stdin, one answer on stdout."""

    def __init__(self, argv: list[str], spec: dict[str, Any]) -> None:
        self.spawned = time.time()
        """When it was spawned (for its start-up time)."""
        self._proc = subprocess.Popen(
            [sys.executable, *argv], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.process = psutil.Process(self._proc.pid)
        """For its CPU time."""
        self.hello: Any = self.ask(json.dumps(spec))
        """Its answer to the spec (addresses, port)."""

    def ask(self, line: str) -> Any:
        """Send one line, return the JSON line it answers."""
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        self._proc.stdin.write(line.encode() + b"\n")
        self._proc.stdin.flush()
        answer = self._proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"{self._proc.args!r} exited with {self._proc.wait()}")
        return json.loads(answer)

    async def ask_async(self, line: str) -> Any:
        """`ask` off the event loop (simulated daemons in this process must keep serving)."""
        return await asyncio.to_thread(self.ask, line)

    def cpu(self) -> float:
        """Its CPU seconds so far (user + system, every thread)."""
        t = self.process.cpu_times()
        return float(t.user + t.system)

    def close(self) -> None:
        """EOF on stdin stops it; killed if it does not exit within 30 s."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()


def sim_process(nodes: dict[str, TLSConfig], op_delay: float) -> Child:
    """Every simulated daemon, in one child process (`python -m bench.sim serve`)."""
    spec = {
        "op_delay": op_delay,
        "nodes": [
            {"node_id": n, "ca": str(t.ca_file), "cert": str(t.cert_file), "key": str(t.key_file)}
            for n, t in nodes.items()
        ],
    }
    return Child(["-m", "bench.sim", "serve"], spec)


def manager_config(root: Path, tls: TLSConfig, n: int) -> ManagerConfig:
    """The benchmark manager: mTLS on 127.0.0.1:0, SQLite under `root`, a pool for n."""
    return ManagerConfig(
        state_dir=root / "state",
        server=ServerConfig(listen="127.0.0.1:0", metrics_listen=""),
        tls=TLSFiles(ca_file=tls.ca_file, cert_file=tls.cert_file, key_file=tls.key_file),
        database=DatabaseConfig(url=f"sqlite+aiosqlite:///{root / 'manager.db'}"),
        # The simulated nodes never heartbeat; keep them online for the run.
        liveness=LivenessConfig(failover_grace_seconds=3600.0),
        pool=pool_config(n),
    )


def pool_config(n: int) -> PoolConfig:
    """The manager's pool settings for n daemons (the reference's channels use them too)."""
    return PoolConfig(max_channels=max(1024, n))


SPEC_LIMIT = 64 * 1024 * 1024
"""Longest JSON line read from stdin (a 500-node spec is ~100 KiB; asyncio's default is 64 KiB)."""


async def serve_manager() -> None:
    """--manager-child: a ManagerServer in this process, its pool counters on request.

    stdin: {"root", "ca", "cert", "key", "n"}; answers {"port"}. Then each
    "stats" line answers the pool's counters; EOF stops the manager.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=SPEC_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec = json.loads(await reader.readline())
    tls = TLSConfig(Path(spec["ca"]), Path(spec["cert"]), Path(spec["key"]))
    manager = ManagerServer(manager_config(Path(spec["root"]), tls, int(spec["n"])))
    await manager.start()
    settle_gc()  # as fleet-manager does once started (manager/cli.py)
    try:
        _emit({"port": manager.port})
        while line := await reader.readline():
            if line.strip() == b"stats":
                pool = manager.pool
                _emit(
                    {
                        "channels_opened": pool.channels_opened,
                        "connections_opened": pool.connections_opened,
                        "nodes": {
                            node: {
                                "connections": st.connections,
                                "node_arg": dict(st.channel_args).get(NODE_ARG),
                                "local_subchannel_pool": dict(st.channel_args).get(
                                    "grpc.use_local_subchannel_pool"
                                ),
                            }
                            for node, st in pool.stats().items()
                        },
                    }
                )
    finally:
        await manager.stop(1.0)


def _emit(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _channel(address: str, tls: TLSConfig, server_name: str) -> aio.Channel:
    return aio.secure_channel(
        address, channel_credentials(tls), options=channel_options(server_name)
    )


async def register(
    node_id: str, tls: TLSConfig, daemon_address: str, manager_address: str, td: str
) -> None:
    """RegisterNode + SyncAgentStates as the node (its own certificate)."""
    async with _channel(manager_address, tls, f"manager.{td}") as channel:
        stub = manager_pb2_grpc.ManagerServiceStub(channel)
        await stub.RegisterNode(
            manager_pb2.RegisterNodeRequest(
                node_id=node_id,
                hostname=f"{node_id}.sim",
                ip="127.0.0.1",
                os="linux",
                arch="x86_64",
                labels={"bench": "fanout"},
                daemon_address=daemon_address,
                daemon_version="sim",
            ),
            timeout=60,
        )
        states = [
            manager_pb2.AgentState(
                agent_id=a.agent_id, type=a.type, status=common_pb2.AGENT_STATUS_RUNNING
            )
            for a in DEFAULT_AGENTS
        ]
        await stub.SyncAgentStates(
            manager_pb2.SyncAgentStatesRequest(node_id=node_id, states=states), timeout=60
        )


async def fleet_round(stub: FleetServiceAsyncStub, n: int) -> tuple[float, int]:
    """Seconds for one OperateAgents restart of every node's web agent; OK count."""
    # batch_results as fleetctl asks: results that finish together share a message.
    request = fleet_pb2.FleetServiceOperateAgentsRequest(
        agent_id="web", operation=RESTART, max_concurrency=n, batch_results=True
    )
    start = time.perf_counter()
    ok = seen = 0
    async for msg in stub.OperateAgents(request, timeout=120):
        seen += len(msg.results)
        if msg.HasField("summary"):
            ok = msg.summary.ok if seen == msg.summary.total else 0
    return time.perf_counter() - start, ok


async def reference_round(stubs: list[DaemonServiceAsyncStub]) -> tuple[float, int]:
    """Seconds for the same restarts as one bare asyncio.gather over open channels."""
    request = daemon_pb2.OperateAgentRequest(agent_id="web", operation=RESTART)
    start = time.perf_counter()
    answers = await asyncio.gather(*(s.OperateAgent(request, timeout=120) for s in stubs))
    return time.perf_counter() - start, sum(a.success for a in answers)


SETTLE = 0.25
"""Seconds of quiet before each timed round."""

Cpu = tuple[float, float, float]
"""CPU seconds (user + system) of the driver, the manager and the simulated daemons."""


def cpu_seconds(procs: tuple[psutil.Process, ...]) -> Cpu:
    """Each process's CPU time so far."""
    a, b, c = (p.cpu_times() for p in procs)
    return (a.user + a.system, b.user + b.system, c.user + c.system)


def _minus(after: Cpu, before: Cpu) -> Cpu:
    return (after[0] - before[0], after[1] - before[1], after[2] - before[2])


def _median_cpu(samples: list[Cpu]) -> Cpu:
    return (
        statistics.median(s[0] for s in samples),
        statistics.median(s[1] for s in samples),
        statistics.median(s[2] for s in samples),
    )


def _ms(cpu: Cpu) -> str:
    """The total and its parts, in ms: "total (driver + manager + daemons)"."""
    d, m, s = (round(x * 1000) for x in cpu)
    return f"{round(sum(cpu) * 1000)} ({d} + {m} + {s})"


async def run(n: int, rounds: int, delays: list[float]) -> int:
    with tempfile.TemporaryDirectory(prefix="fleet-fanout-") as tmp:
        root = Path(tmp)
        ca = CertificateAuthority.create()
        td = ca.trust_domain
        t0 = time.perf_counter()
        node_tls = {
            f"sim-{i:04d}": ca.issue("node", f"sim-{i:04d}", ips=("127.0.0.1",)).write(
                root / "nodes" / f"sim-{i:04d}"
            )
            for i in range(n)
        }
        mtls = ca.issue("manager", "bench", ips=("127.0.0.1",)).write(root / "manager")
        optls = ca.issue("operator", "bench").write(root / "operator")
        sims = sim_process(node_tls, delays[0])
        addresses: dict[str, str] = sims.hello
        print(f"{n} simulated daemons up in {time.perf_counter() - t0:.1f}s", flush=True)
        manager = None
        ref_channels: list[aio.Channel] = []
        results: list[tuple[float, list[float], list[float], int, list[Cpu], list[Cpu]]] = []
        try:
            manager = Child(
                [str(ROOT / "bench" / "fanout.py"), "--manager-child"],
                {
                    "root": str(root),
                    "ca": str(mtls.ca_file),
                    "cert": str(mtls.cert_file),
                    "key": str(mtls.key_file),
                    "n": n,
                },
            )
            address = f"127.0.0.1:{manager.hello['port']}"
            sem = asyncio.Semaphore(32)

            async def reg(node_id: str) -> None:
                async with sem:
                    await register(node_id, node_tls[node_id], addresses[node_id], address, td)

            t0 = time.perf_counter()
            await asyncio.gather(*(reg(node) for node in node_tls))
            print(f"registered and synced in {time.perf_counter() - t0:.1f}s", flush=True)

            # Reference channels: opened and connected before anything is timed,
            # with the pool's channel arguments (keepalive, own subchannel pool).
            credentials = channel_credentials(mtls)
            for node_id, addr in addresses.items():
                server_name = Identity("node", node_id, td).server_name
                args = channel_args(node_id, server_name, pool_config(n))
                ref_channels.append(aio.secure_channel(addr, credentials, options=args))
            await asyncio.gather(*(c.channel_ready() for c in ref_channels))
            ref_stubs = [daemon_pb2_grpc.DaemonServiceStub(c) for c in ref_channels]

            async with _channel(address, optls, f"manager.{td}") as op_channel:
                stub = fleet_pb2_grpc.FleetServiceStub(op_channel)
                warm, ok = await fleet_round(stub, n)  # opens the pool's N connections
                warm_ref, _ = await reference_round(ref_stubs)
                # The same GC footing as the manager (frozen after start-up).
                gc.collect()
                gc.freeze()
                print(f"warm-up: fleet {warm:.3f}s (opens {n} connections), ref {warm_ref:.3f}s")
                failures = n - ok
                procs = (psutil.Process(), manager.process, sims.process)
                for delay in delays:
                    sims.ask(f"delay {delay}")
                    times: tuple[list[float], list[float]] = ([], [])
                    cpus: tuple[list[Cpu], list[Cpu]] = ([], [])
                    for r in range(rounds):
                        # A pause before each side lets the other's trailing work
                        # (connection upkeep, the daemons' last answers) settle
                        # instead of landing in this side's time.
                        await asyncio.sleep(SETTLE)
                        c0 = cpu_seconds(procs)
                        f, f_ok = await fleet_round(stub, n)
                        c1 = cpu_seconds(procs)
                        await asyncio.sleep(SETTLE)
                        c2 = cpu_seconds(procs)
                        g, g_ok = await reference_round(ref_stubs)
                        c3 = cpu_seconds(procs)
                        failures += (n - f_ok) + (n - g_ok)
                        times[0].append(f)
                        times[1].append(g)
                        cpus[0].append(_minus(c1, c0))
                        cpus[1].append(_minus(c3, c2))
                        print(
                            f"restart {delay * 1000:g} ms, round {r + 1}: fleet {f:.3f}s  "
                            f"reference {g:.3f}s  ratio {f / g:.2f}x  "
                            f"(CPU {_ms(cpus[0][-1])} vs {_ms(cpus[1][-1])})",
                            flush=True,
                        )
                    peak = sims.ask("stats")["peak"]
                    results.append((delay, *times, peak, *cpus))

            pool = manager.ask("stats")
            daemons = sims.ask("stats")
        finally:
            for c in ref_channels:
                await c.close(None)
            if manager is not None:
                manager.close()
            sims.close()

    problems = []
    if failures:
        problems.append(f"{failures} target(s) not OK")
    # The pool's own counters: one channel and one connection per daemon, each
    # channel with its own subchannel pool and its node id among its arguments.
    stats = pool["nodes"]
    if pool["channels_opened"] != n or len(stats) != n:
        problems.append(f"the pool opened {pool['channels_opened']} channels for {n} daemons")
    if any(st["connections"] != 1 for st in stats.values()):
        problems.append("some daemon needed more than one connection")
    if {st["node_arg"] for st in stats.values()} != set(stats) or any(
        st["local_subchannel_pool"] != 1 for st in stats.values()
    ):
        problems.append("channel arguments are not distinct per daemon")
    # The daemons' view: each saw exactly two client connections, the pool's
    # and the reference's, and served every restart.
    expected_ops = (rounds * len(delays) + 1) * 2
    for node, seen in daemons["nodes"].items():
        if len(seen["ports"]) != 2 or seen["operations"] != expected_ops:
            problems.append(
                f"{node} saw {len(seen['ports'])} client connections and "
                f"{seen['operations']} restarts (want 2 and {expected_ops})"
            )
            break

    print()
    print(f"fan-out restart of {n} agents on {n} daemons, median of {rounds} round(s):")
    print("  simulated restart  fleet (FleetService)  reference (gather)  ratio  peak in flight")
    for delay, fleet_times, ref_times, peak, _, _ in results:
        fleet_med, ref_med = statistics.median(fleet_times), statistics.median(ref_times)
        # Each round runs both back to back, so a round's ratio shares its
        # conditions; the median of those resists a noisy machine best.
        ratio = statistics.median(f / g for f, g in zip(fleet_times, ref_times, strict=True))
        print(
            f"  {delay * 1000:14g} ms  {fleet_med * 1000:17.1f} ms  {ref_med * 1000:15.1f} ms"
            f"  {ratio:4.2f}x  {peak:14d}"
        )
    print("  (ratio: median of the rounds' fleet/reference ratios; target <= 1.25x)")
    # CPU time is much less sensitive than wall time to other jobs on the machine.
    print("CPU time per round, median, ms (driver + manager + daemons); ratio of all rounds':")
    print("  simulated restart  fleet                       reference                   ratio")
    for delay, _, _, _, fleet_cpu, ref_cpu in results:
        f_cpu, r_cpu = _median_cpu(fleet_cpu), _median_cpu(ref_cpu)
        # All rounds' CPU: a round's is only a few 10 ms clock ticks at small N.
        f_all, r_all = sum(map(sum, fleet_cpu)), sum(map(sum, ref_cpu))
        cpu_ratio = f"{f_all / r_all:4.2f}x" if r_all else "-"
        print(f"  {delay * 1000:14g} ms  {_ms(f_cpu):26}  {_ms(r_cpu):26}  {cpu_ratio}")
    print(
        f"  pool counters: {pool['channels_opened']} channels, "
        f"{pool['connections_opened']} connections for {n} daemons, "
        "one subchannel pool and node id per channel; each daemon saw one pool connection"
    )
    for p in problems:
        print(f"CHECK FAILED: {p}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="N=6, one round: seconds")
    parser.add_argument("-n", type=int, default=500, help="simulated daemons (default 500)")
    parser.add_argument(
        "--rounds", type=int, default=15, help="timed rounds of each (median; default 15)"
    )
    parser.add_argument(
        "--delays",
        default="0,0.1",
        help="seconds a simulated restart takes, one measurement each "
        "(default 0 = pure overhead, and 0.1)",
    )
    parser.add_argument("--manager-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.manager_child:
        asyncio.run(serve_manager())
        return 0
    n, rounds = (6, 1) if args.smoke else (args.n, args.rounds)
    delays = [float(d) for d in args.delays.split(",")]
    return asyncio.run(run(n, rounds, delays))


if __name__ == "__main__":
    sys.exit(main())
