"""Rollout benchmark: a new revision to N daemons vs the same pushes made directly.

    python bench/rollout.py            # N = 500 simulated daemons, batches of 50
    python bench/rollout.py --smoke    # N = 6, batches of 2, seconds

N simulated daemons (`bench/sim.py`: real gRPC servers with node
certificates that apply PushUpdate as the daemon does and answer with their
agents' new states, RUNNING as a daemon's `start_secs = 0` agent is once
spawned; they report through ManagerService at registration) run in this
process. A real manager
(ManagerServer: mTLS, SQLite in a temp dir) runs in a child process, so its
CPU time is its own (psutil on the child). Every node registers and syncs,
revision 1 of one definition rolls out (this also opens the pool's N
connections), then rounds alternate:

- rollout: `ApplyDefinitions` of the next revision (max_parallel = N/10,
  min_healthy_time = 0) until the rollout is SUCCESSFUL. Timed from just
  before the ApplyDefinitions call to the rollout's `ended_at` (the
  manager's clock, same host; WatchRollout polls every 0.5 s, so its
  arrival time would blur the figure). Includes every pass: scope, the
  step of each batch, node sets, pushes, storing their answers (the
  agents' states) and the judging of them.
- reference: the same N PushUpdate calls (the same spec, version + 1)
  made directly in waves of max_parallel (10 waves of 50), each wave one `asyncio.gather`, in the
  manager process through its own pool (channels already open), asking for
  the same answers (with the agents' states), with no database. The
  simulated daemons do not report these pushes and are put back to their
  state afterwards.

Also reported: the manager's CPU (user + system) per node updated, and,
after the rounds, the reconcile after a manager restart: the manager
process stopped and started again on the same database and port; the time
from spawning it to the end of its first convergence pass over the N nodes,
the length of that pass, and what it pushed (nothing: every node already
runs its set). Exits 1 if a rollout did not succeed or a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import cProfile
import gc
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fanout import Child  # noqa: E402
from bench.gcstats import GcTimer  # noqa: E402
from bench.sim import SimFleet  # noqa: E402
from fleet.pki import CertificateAuthority  # noqa: E402
from fleet.tls import TLSConfig, channel_credentials, channel_options  # noqa: E402
from fleet.v1 import common_pb2, desired_pb2, fleet_pb2, fleet_pb2_grpc  # noqa: E402
from manager.config import (  # noqa: E402
    DatabaseConfig,
    LivenessConfig,
    ManagerConfig,
    ServerConfig,
    TLSFiles,
)
from manager.gc_tuning import settle_gc  # noqa: E402
from manager.pool import PoolConfig  # noqa: E402
from manager.server import ManagerServer  # noqa: E402
from manager.service.convergence import Convergence, PassResult  # noqa: E402
from manager.service.delivery import Pusher  # noqa: E402

if TYPE_CHECKING:
    from fleet.v1.fleet_pb2_grpc import FleetServiceAsyncStub

from grpc import aio  # noqa: E402

NAME = "bench"
WAVES = 10
SPEC_LIMIT = 64 * 1024 * 1024
"""Longest JSON line read from stdin (the reference's targets for 500 nodes are ~30 KiB)."""
SETTLE = 0.5
"""Seconds of quiet before each timed round."""


def agent_spec(version: str) -> common_pb2.AgentSpec:
    """The agent of every revision; only its version changes."""
    return common_pb2.AgentSpec(argv=["/usr/bin/bench", "--port", "80"], version=version)


def definition(version: str, max_parallel: int) -> desired_pb2.Definition:
    """The benchmark's definition: every node labelled bench=rollout."""
    return desired_pb2.Definition(
        name=NAME,
        selector=common_pb2.LabelSelector(match_labels={"bench": "rollout"}),
        agent=agent_spec(version),
        update=desired_pb2.UpdatePolicy(
            max_parallel=str(max_parallel),
            min_healthy_time_seconds=0.0,
            healthy_deadline_seconds=120.0,
            progress_deadline_seconds=300.0,
        ),
    )


# --- the manager child ----------------------------------------------------------------------


def manager_config(root: Path, tls: TLSConfig, n: int, port: int) -> ManagerConfig:
    """The benchmark manager: mTLS on 127.0.0.1:port, SQLite under `root`, a pool for n."""
    return ManagerConfig(
        state_dir=root / "state",
        server=ServerConfig(listen=f"127.0.0.1:{port}", metrics_listen=""),
        tls=TLSFiles(ca_file=tls.ca_file, cert_file=tls.cert_file, key_file=tls.key_file),
        database=DatabaseConfig(url=f"sqlite+aiosqlite:///{root / 'manager.db'}"),
        # The simulated nodes never heartbeat; keep them online for the run.
        liveness=LivenessConfig(failover_grace_seconds=3600.0),
        pool=PoolConfig(max_channels=max(1024, n)),
    )


async def serve_manager() -> None:
    """--manager-child: a ManagerServer in this process.

    stdin: {"root", "ca", "cert", "key", "n", "port"}; answers {"port"}. Then
    "ref <json>" pushes directly through the pool and answers the seconds it
    took; "passes" answers the convergence passes seen (end time, seconds,
    pushed); "gc" the cyclic GC's collections and seconds so far; EOF stops the
    manager.
    """
    begun = time.time()
    profiler = cProfile.Profile()
    gc_timer = GcTimer()
    gc_timer.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=SPEC_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec = json.loads(await reader.readline())
    # Statements SQLite ran while a driver transaction was open (`--statements`): a trace
    # callback on every connection the manager opens (aiosqlite calls sqlite3.connect).
    counted = {"open": 0, "statements": 0, "transactions": 0}
    if spec.get("statements"):
        connect = sqlite3.connect

        def trace(statement: str) -> None:
            if counted["open"]:
                counted["statements"] += 1
                counted["transactions"] += statement.lstrip().upper().startswith("BEGIN")

        def traced_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            conn: sqlite3.Connection = connect(*args, **kwargs)
            conn.set_trace_callback(trace)
            return conn

        sqlite3.connect = traced_connect  # type: ignore[assignment]
    tls = TLSConfig(Path(spec["ca"]), Path(spec["cert"]), Path(spec["key"]))
    manager = ManagerServer(manager_config(Path(spec["root"]), tls, spec["n"], spec["port"]))
    passes: list[dict[str, Any]] = []
    run_once, run_incremental = Convergence.run_once, Convergence.run_incremental
    send = Pusher.send
    # Seconds of the pass in progress spent in desired-state transactions and in push
    # waves (wall time): "tx" those between the waves, "beside" those begun while a wave
    # was out (a batch's answers recorded as the next batch's pushes go out).
    spent = {"tx": 0.0, "push": 0.0, "beside": 0.0, "pushing": 0.0}

    def note(start: float, result: PassResult | None) -> None:
        tx, push, beside = spent["tx"], spent["push"], spent["beside"]
        statements, transactions = counted["statements"], counted["transactions"]
        spent["tx"] = spent["push"] = spent["beside"] = 0.0
        counted["statements"] = counted["transactions"] = 0
        if result is None:  # an incremental pass that found a full one needed
            return
        passes.append(
            {
                "start": start,
                "end": time.time(),
                "stepped": len(result.stepped),
                "pushed": len(result.pushed),
                "undelivered": result.undelivered,
                "incremental": result.incremental,
                "tx": tx,
                "push": push,
                "beside": beside,
                "statements": statements,
                "transactions": transactions,
            }
        )

    async def timed_pass(self: Convergence) -> PassResult:
        # A bench hook: when each convergence pass ran and what it did.
        start = time.time()
        spent["tx"] = spent["push"] = spent["beside"] = 0.0
        counted["statements"] = counted["transactions"] = 0
        result = await run_once(self)
        note(start, result)
        return result

    async def timed_incremental(self: Convergence) -> PassResult | None:
        start = time.time()
        spent["tx"] = spent["push"] = spent["beside"] = 0.0
        counted["statements"] = counted["transactions"] = 0
        result = await run_incremental(self)
        note(start, result)
        return result

    async def timed_send(self: Pusher, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        spent["pushing"] += 1
        try:
            return await send(self, *args, **kwargs)
        finally:
            spent["pushing"] -= 1
            spent["push"] += time.perf_counter() - t

    Convergence.run_once = timed_pass  # type: ignore[method-assign]
    Convergence.run_incremental = timed_incremental  # type: ignore[method-assign]
    Pusher.send = timed_send  # type: ignore[method-assign]
    await manager.start()
    # The driver's own transactions (not the apply's, nor WatchRollout's reads).
    repo = manager.convergence._repo

    def timed(run: Any) -> Any:
        async def timed_run(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            kind = "beside" if spent["pushing"] else "tx"
            counted["open"] += 1
            try:
                return await run(*args, **kwargs)
            finally:
                counted["open"] -= 1
                spent[kind] += time.perf_counter() - t

        return timed_run

    for method in ("run", "run_in_one_hop"):
        if hasattr(repo, method):
            setattr(repo, method, timed(getattr(repo, method)))
    settle_gc()  # as fleet-manager does once started (manager/cli.py)
    try:
        _emit({"port": manager.port, "begun": begun})
        while line := await reader.readline():
            command, _, arg = line.decode().strip().partition(" ")
            if command == "ref":
                _emit(await reference(manager, json.loads(arg)))
            elif command == "passes":
                _emit({"passes": passes})
            elif command == "gc":
                _emit({"gc": gc_timer.count, "seconds": gc_timer.seconds})
            elif command == "profile":  # "profile on" / "profile <file>": cProfile the manager
                if arg == "on":
                    profiler.enable()
                else:
                    profiler.disable()
                    profiler.dump_stats(arg)
                _emit({"profile": arg})
    finally:
        await manager.stop(1.0)


async def reference(manager: ManagerServer, job: dict[str, Any]) -> dict[str, float]:
    """The same pushes as a rollout, made directly: waves of asyncio.gather on the pool;
    the seconds they took and the process's CPU seconds meanwhile (all its threads)."""
    spec = agent_spec(job["version"])
    spec.id = NAME
    spec.revision = job["revision"]
    targets = job["targets"]  # [[node, address, version], ...]
    size = job["wave"]
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(targets), size):
        await asyncio.gather(
            *(
                # As convergence pushes: the answers carry the agents' states.
                manager.pool.push_update(node, address, version, [spec], want_agent_states=True)
                for node, address, version in targets[i : i + size]
            )
        )
    return {"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu}


def _emit(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def manager_child(spec: dict[str, Any]) -> Child:
    """The manager process (`rollout.py --manager-child`), given `spec`."""
    return Child([str(ROOT / "bench" / "rollout.py"), "--manager-child"], spec)


# --- the driver -----------------------------------------------------------------------------


async def apply(stub: FleetServiceAsyncStub, version: str, batch: int) -> int:
    """Apply the next revision; its rollout id."""
    reply = await stub.ApplyDefinitions(
        fleet_pb2.FleetServiceApplyDefinitionsRequest(definitions=[definition(version, batch)]),
        timeout=120,
    )
    (change,) = reply.changes
    return int(change.rollout_id)


async def finished(stub: FleetServiceAsyncStub, rollout_id: int) -> desired_pb2.Rollout:
    """The rollout once it ended (WatchRollout)."""
    request = fleet_pb2.FleetServiceWatchRolloutRequest(name=NAME, rollout_id=rollout_id)
    last = None
    async for msg in stub.WatchRollout(request, timeout=600):
        last = msg.rollout
        if last.ended_at:
            break
    assert last is not None
    return last


def state(r: desired_pb2.Rollout) -> str:
    return desired_pb2.RolloutState.Name(r.state).removeprefix("ROLLOUT_STATE_")


async def reference_round(
    manager: Child, fleet: SimFleet, version: str, revision: int, wave: int
) -> tuple[float, float]:
    """The direct pushes, their seconds and the manager's CPU seconds; the daemons neither
    report them nor keep them."""
    saved = []
    for node in fleet.nodes:
        d = node.servicer
        saved.append(
            (
                d.link,
                d.spec_version,
                dict(d.pushed),
                copy.deepcopy(d.agents),
                list(d.pushes),
                list(d.update_errors),
            )
        )
        d.link = None  # no report: the manager must not see this version
    try:
        targets = [[n.node_id, n.address, n.servicer.spec_version + 1] for n in fleet.nodes]
        job = {"version": version, "revision": revision, "targets": targets, "wave": wave}
        answer = await manager.ask_async(f"ref {json.dumps(job)}")
        seconds = float(answer["seconds"])
        moved = sum(n.servicer.pushed[NAME].revision == revision for n in fleet.nodes)
        if moved != len(fleet.nodes):
            raise RuntimeError(f"reference: {moved} of {len(fleet.nodes)} daemons took the push")
        return seconds, float(answer["cpu"])
    finally:
        for node, (link, v, pushed, agents, pushes, errors) in zip(fleet.nodes, saved, strict=True):
            d = node.servicer
            d.link, d.spec_version, d.pushed, d.agents = link, v, pushed, agents
            d.pushes, d.update_errors = pushes, errors


async def run(
    n: int,
    batch: int,
    rounds: int,
    profile: str = "",
    verbose: bool = False,
    statements: bool = False,
) -> int:
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fleet-rollout-") as tmp:
        root = Path(tmp)
        ca = CertificateAuthority.create()
        td = ca.trust_domain
        mtls = ca.issue("manager", "bench", ips=("127.0.0.1",)).write(root / "manager")
        optls = ca.issue("operator", "bench").write(root / "operator")
        t0 = time.perf_counter()
        fleet = await SimFleet.start(
            ca, root / "nodes", count=n, prefix="sim", labels={"bench": "rollout"}, agents=()
        )
        print(f"{n} simulated daemons up in {time.perf_counter() - t0:.1f}s", flush=True)
        spec = {
            "root": str(root),
            "ca": str(mtls.ca_file),
            "cert": str(mtls.cert_file),
            "key": str(mtls.key_file),
            "n": n,
            "port": 0,
            "statements": statements,
        }
        manager: Child | None = None
        rows: list[tuple[float, float, float, int, int, float, int, float, float]] = []
        restart: dict[str, Any] = {}
        try:
            manager = await asyncio.to_thread(manager_child, spec)
            spec["port"] = manager.hello["port"]
            address = f"127.0.0.1:{spec['port']}"
            t0 = time.perf_counter()
            await fleet.register_all(address)
            print(f"registered and synced in {time.perf_counter() - t0:.1f}s", flush=True)
            channel = aio.secure_channel(
                address, channel_credentials(optls), options=channel_options(f"manager.{td}")
            )
            async with channel:
                stub = fleet_pb2_grpc.FleetServiceStub(channel)
                t0 = time.time()
                first = await finished(stub, await apply(stub, "1", batch))
                print(
                    f"revision 1 ({state(first)}) in {first.ended_at / 1000 - t0:.2f}s "
                    f"(opens {n} pool connections)",
                    flush=True,
                )
                if state(first) != "SUCCESSFUL":
                    problems.append(f"revision 1: {state(first)} ({first.reason})")
                gc.collect()
                gc.freeze()
                revision = 1
                for r in range(rounds):
                    revision += 1
                    version = str(revision)
                    await asyncio.sleep(SETTLE)
                    ref, ref_cpu = await reference_round(manager, fleet, version, revision, batch)
                    await asyncio.sleep(SETTLE)
                    if profile:
                        await manager.ask_async("profile on")
                    gc0 = await manager.ask_async("gc")
                    c0, t0 = manager.cpu(), time.time()
                    rollout = await finished(stub, await apply(stub, version, batch))
                    took = rollout.ended_at / 1000 - t0
                    cpu = manager.cpu() - c0  # includes WatchRollout's polls (a few ms)
                    gc1 = await manager.ask_async("gc")
                    collections = gc1["gc"] - gc0["gc"]
                    gc_ms = (gc1["seconds"] - gc0["seconds"]) * 1000
                    on_it = sum(nd.servicer.pushed[NAME].revision == revision for nd in fleet.nodes)
                    if state(rollout) != "SUCCESSFUL" or on_it != n:
                        problems.append(
                            f"round {r + 1}: rollout {state(rollout)} ({rollout.reason}), "
                            f"{on_it}/{n} daemons on revision {revision}"
                        )
                    if profile:
                        await manager.ask_async(f"profile {profile}")
                    seen = (await manager.ask_async("passes"))["passes"]
                    mine = [p for p in seen if t0 <= p["start"] <= rollout.ended_at / 1000]
                    busy = sum(p["end"] - p["start"] for p in mine)
                    if verbose:
                        for p in mine:
                            print(
                                f"  {'incremental' if p['incremental'] else 'full'} pass at"
                                f" {p['start'] - t0:6.3f}s: {p['end'] - p['start']:.3f}s"
                                f" stepped {p['stepped']} pushed {p['pushed']}"
                                f" (transactions {p['tx'] * 1000:.1f} ms,"
                                f" pushes {p['push'] * 1000:.1f} ms,"
                                f" beside the pushes {p.get('beside', 0.0) * 1000:.1f} ms)"
                                + (
                                    f" {p['transactions']} transactions,"
                                    f" {p['statements']} statements"
                                    if statements
                                    else ""
                                )
                            )
                        inc = [p for p in mine if p["incremental"]]
                        if inc:
                            took_ms = statistics.median(p["end"] - p["start"] for p in inc) * 1000
                            print(
                                f"  incremental passes, medians: {took_ms:.1f} ms, transactions "
                                f"{statistics.median(p['tx'] for p in inc) * 1000:.1f} ms, pushes "
                                f"{statistics.median(p['push'] for p in inc) * 1000:.1f} ms, "
                                f"beside the pushes "
                                f"{statistics.median(p.get('beside', 0.0) for p in inc) * 1000:.1f}"
                                " ms"
                                + (
                                    f", {statistics.median(p['transactions'] for p in inc):.0f}"
                                    f" transactions,"
                                    f" {statistics.median(p['statements'] for p in inc):.0f}"
                                    " statements"
                                    if statements
                                    else ""
                                )
                            )
                    rows.append(
                        (took, ref, cpu, rollout.done, len(mine), busy, collections, gc_ms, ref_cpu)
                    )
                    print(
                        f"round {r + 1}: rollout {took:.3f}s  reference {ref:.3f}s  "
                        f"ratio {took / ref:.2f}x  manager CPU {cpu * 1000 / n:.2f} ms/node "
                        f"(reference {ref_cpu * 1000 / n:.2f})  "
                        f"{len(mine)} passes, {busy:.2f}s in them; cyclic GC {collections}"
                        f" collections {gc_ms:.1f} ms",
                        flush=True,
                    )

            # Restart: same database, same port (the daemons' links reconnect to it).
            manager.close()
            manager = None
            manager = await asyncio.to_thread(manager_child, spec)
            for _ in range(600):
                passes = (await manager.ask_async("passes"))["passes"]
                if passes:
                    break
                await asyncio.sleep(0.05)
            p = passes[0]
            restart = {
                "ready": manager.hello["begun"] - manager.spawned,
                "first_pass_end": p["end"] - manager.spawned,
                "pass": p["end"] - p["start"],
                "pushed": p["pushed"],
                "undelivered": p["undelivered"],
            }
            if p["pushed"] or p["undelivered"]:
                problems.append(f"after the restart the first pass pushed {p['pushed']} nodes")
        finally:
            if manager is not None:
                manager.close()
            await fleet.close()

    print()
    print(f"rollout of a new revision to {n} daemons, max_parallel {batch}, median of {rounds}:")
    print("  rollout (ApplyDefinitions -> SUCCESSFUL)  reference (10 waves of gather)  ratio")
    if rows:
        took = statistics.median(r[0] for r in rows)
        ref = statistics.median(r[1] for r in rows)
        ratio = statistics.median(r[0] / r[1] for r in rows)
        print(f"  {took * 1000:34.0f} ms  {ref * 1000:27.0f} ms  {ratio:4.2f}x")
        print("  (ratio: median of the rounds' rollout/reference ratios; target <= 1.3x)")
        cpu = statistics.median(r[2] for r in rows)
        ref_cpu = statistics.median(r[8] for r in rows)
        print(
            f"manager CPU per node updated: {cpu * 1000 / n:.2f} ms ({cpu:.2f} s per rollout); "
            f"the reference's: {ref_cpu * 1000 / n:.2f} ms ({ref_cpu:.2f} s)"
        )
        print(
            f"manager's cyclic GC per rollout (medians): "
            f"{statistics.median(r[6] for r in rows):.0f} collections, "
            f"{statistics.median(r[7] for r in rows):.1f} ms"
        )
    if restart:
        print(
            f"reconcile after a manager restart ({n} nodes): first pass done "
            f"{restart['first_pass_end']:.2f} s after spawning the manager "
            f"(process start + imports {restart['ready']:.2f} s, the pass itself "
            f"{restart['pass']:.2f} s), pushed {restart['pushed']}"
        )
    for problem in problems:
        print(f"CHECK FAILED: {problem}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="N=6, batches of 2, one round")
    parser.add_argument("-n", type=int, default=500, help="simulated daemons (default 500)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median; default 5)")
    parser.add_argument(
        "--profile", default="", help="cProfile the manager during the rollouts into this file"
    )
    parser.add_argument("--verbose", action="store_true", help="print each convergence pass")
    parser.add_argument(
        "--statements",
        action="store_true",
        help="with --verbose: count the SQL statements and transactions of the driver's"
        " transactions in each pass (a SQLite trace callback: not for timing runs)",
    )
    parser.add_argument("--manager-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.manager_child:
        asyncio.run(serve_manager())
        return 0
    n, rounds = (6, 1) if args.smoke else (args.n, args.rounds)
    batch = max(1, n // WAVES) if not args.smoke else 2
    profile = str(Path(args.profile).resolve()) if args.profile else ""
    return asyncio.run(run(n, batch, rounds, profile, args.verbose, args.statements))


if __name__ == "__main__":
    sys.exit(main())
