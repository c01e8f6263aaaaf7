"""Jobs benchmark: `true` on N daemons vs the same StartJob calls gathered, and output ingest.

    python bench/jobs.py            # N = 500, max_concurrency 100; ingest 200 x 1 MiB
    python bench/jobs.py --smoke    # N = 6, max_concurrency 2; ingest 3 x 256 KiB, 64 KiB chunks
    python bench/jobs.py --profile /tmp/jobs.prof  # cProfile the manager: .dispatch, .ingest

Three processes: this one (the operator's client, the reference's channels,
the timing), a real manager (ManagerServer: mTLS, SQLite WAL under a temp
dir, production defaults but for `[jobs] max_output_bytes`, sized so the
ingest is not cut) as a child, and the N simulated daemons in one more
child (`python -m bench.sim serve`: real gRPC servers with their own
`node/<id>` certificates; open-file limit raised to 20,000). Every simulated
daemon registers with the manager with its own certificate, and runs a job
as the daemon does as far as the manager can tell (`SimDaemon.StartJob`):
StartJob is idempotent per job id; asked with `accept_end` (as the manager
asks) it waits up to the daemon's default `[jobs] answer_wait_seconds` for
the job to end, and a job whose argv is `true` ends at once, so the answer
carries its end (SUCCESS, exit 0, its step) and nothing is reported; a job
that outlasts the wait is answered RUNNING and its end reported with
ReportJobStatus over the node's own mTLS channel, retried while unreachable.

dispatch (rounds alternate, each side after a short pause):

- fleet: `RunJob(true on every node, max_concurrency)` as fleetctl sends
  it, timed from just before the call to the job's `ended_at` (the
  manager's clock, same host: the moment the last target's result was
  stored and the job derived finished; WatchJob only says when to look).
  Includes validation, resolving the selector, storing the job and its N
  targets, audit and event, N StartJob calls through the pool at most
  max_concurrency at a time, the N reports stored, the job's end.
- reference: the same N StartJob calls (same steps and `accept_end`, a
  fresh job id per round) made with one `asyncio.gather` over N grpc.aio
  channels opened and connected beforehand (the pool's channel arguments,
  the manager's certificate), with no window. The simulated daemons answer
  them exactly as the fleet's (the end on the answer), so the reference is
  the gather; were an end reported instead, it would be timed until that
  report was answered (the manager refuses it: an unknown job). Only the
  fleet side includes the database, the window and the decisions.

ingest: one job on M daemons whose command runs until told; once all M
targets are RUNNING, every daemon uploads SIZE bytes of output with
UploadJobOutput as the daemon does (chunks of CHUNK bytes, one at a time
per target, each from the acknowledged offset; all M targets at once),
timed from the first chunk sent to the last acknowledged (acknowledged
means stored; the simulated output is made before the timer starts).
MiB/s against plain `sqlite3.executemany` of the same chunks, M at a
time per transaction, into a table of the same shape (job id, node id,
offset, data; WAL, synchronous=NORMAL as the manager's) in a fresh file,
from this process. The stored bytes are checked per target,
and one target's stored output is read back and compared.

Exits 1 if a check fails (a target not SUCCESS, a daemon started twice, a
byte missing).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import gc
import json
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from grpc import aio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fanout import Child, pool_config  # noqa: E402
from bench.gcstats import GcTimer  # noqa: E402
from bench.sim import output_chunks  # noqa: E402
from fleet.pki import CertificateAuthority, Identity  # noqa: E402
from fleet.tls import TLSConfig, channel_credentials, channel_options  # noqa: E402
from fleet.v1 import (  # noqa: E402
    common_pb2,
    daemon_pb2,
    daemon_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    jobs_pb2,
)
from manager.config import (  # noqa: E402
    DatabaseConfig,
    LivenessConfig,
    ManagerConfig,
    ServerConfig,
    TLSFiles,
)
from manager.gc_tuning import settle_gc  # noqa: E402
from manager.pool.channel import channel_args  # noqa: E402
from manager.server import ManagerServer  # noqa: E402

if TYPE_CHECKING:
    from fleet.v1.daemon_pb2_grpc import DaemonServiceAsyncStub
    from fleet.v1.fleet_pb2_grpc import FleetServiceAsyncStub

NOFILE = 20_000
"""Open-file limit of the manager child (the simulated daemons' asks for the same)."""
SPEC_LIMIT = 64 * 1024 * 1024
"""Longest JSON line read from stdin."""
SETTLE = 0.5
"""Seconds of quiet before each timed round."""
MiB = 1024 * 1024
LABELS = {"bench": "jobs"}
ENDED = frozenset(
    {
        jobs_pb2.JOB_STATE_SUCCESS,
        jobs_pb2.JOB_STATE_FAILED,
        jobs_pb2.JOB_STATE_PARTIAL,
        jobs_pb2.JOB_STATE_CANCELLED,
    }
)
SUCCESS = jobs_pb2.JOB_TARGET_STATE_SUCCESS
ANSWERED = ("OK", "answered")
"""How a simulated daemon's job end reached the manager: reported and acknowledged, or
carried by the StartJob answer."""
RUNNING = jobs_pb2.JOB_TARGET_STATE_RUNNING
HELD = "/usr/bin/bench-output"
"""A command the simulated daemons run until told (the ingest's job)."""


def raise_nofile() -> None:
    """Raise this process's open-file limit to NOFILE (within the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def steps(argv: list[str]) -> list[jobs_pb2.JobStep]:
    """One step running `argv`."""
    return [jobs_pb2.JobStep(command=jobs_pb2.JobCommand(argv=argv))]


# --- the manager child ----------------------------------------------------------------------


def manager_config(root: Path, tls: TLSConfig, n: int, max_output: int) -> ManagerConfig:
    """The benchmark manager: mTLS on 127.0.0.1:0, SQLite under `root`, a pool for n."""
    config = ManagerConfig(
        state_dir=root / "state",
        server=ServerConfig(listen="127.0.0.1:0", metrics_listen=""),
        tls=TLSFiles(ca_file=tls.ca_file, cert_file=tls.cert_file, key_file=tls.key_file),
        database=DatabaseConfig(url=f"sqlite+aiosqlite:///{root / 'manager.db'}"),
        # The simulated nodes never heartbeat; keep them online for the run.
        liveness=LivenessConfig(failover_grace_seconds=3600.0),
        pool=pool_config(n),
    )
    # The ingest's targets must not be cut at the default bound.
    jobs = config.jobs
    if jobs.max_output_bytes < max_output:
        config = dataclasses.replace(
            config, jobs=dataclasses.replace(jobs, max_output_bytes=max_output)
        )
    return config


async def serve_manager() -> None:
    """--manager-child: a ManagerServer in this process.

    stdin: {"root", "ca", "cert", "key", "n", "max_output"}; answers {"port"}.
    Then "profile on" / "profile off" / "profile <file>" start cProfile,
    pause it, or stop it and dump what it gathered there (and start afresh);
    "gc" answers the cyclic GC's collections and seconds so far, and the job driver's
    passes and the job updates' commits so far; EOF stops the manager.
    """
    raise_nofile()
    profiler = cProfile.Profile()
    gc_timer = GcTimer()
    gc_timer.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=SPEC_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec = json.loads(await reader.readline())
    tls = TLSConfig(Path(spec["ca"]), Path(spec["cert"]), Path(spec["key"]))
    config = manager_config(Path(spec["root"]), tls, int(spec["n"]), int(spec["max_output"]))
    manager = ManagerServer(config)
    await manager.start()
    settle_gc()  # as fleet-manager does once started (manager/cli.py)
    try:
        _emit({"port": manager.port})
        while line := await reader.readline():
            command, _, arg = line.decode().strip().partition(" ")
            if command == "gc":
                _emit(
                    {
                        "gc": gc_timer.count,
                        "seconds": gc_timer.seconds,
                        "passes": manager.job_driver.passes,
                        "commits": manager.job_updates.commits,
                    }
                )
            elif command == "profile":
                if arg == "on":
                    profiler.enable()
                elif arg == "off":
                    profiler.disable()
                else:
                    profiler.disable()
                    profiler.dump_stats(arg)
                    profiler = cProfile.Profile()
                _emit({"profile": arg})
    finally:
        await manager.stop(1.0)


def _emit(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# --- the driver -----------------------------------------------------------------------------


async def run_job(
    stub: FleetServiceAsyncStub, spec: jobs_pb2.JobSpec
) -> tuple[float, float, jobs_pb2.Job]:
    """RunJob and follow it to its end: (wall time before the call, wall time the end was
    seen, the ended job with its targets)."""
    t0 = time.time()
    reply = await stub.RunJob(fleet_pb2.FleetServiceRunJobRequest(spec=spec), timeout=120)
    job = await ended(stub, reply.job.id)
    return t0, time.time(), job


async def ended(stub: FleetServiceAsyncStub, job_id: str) -> jobs_pb2.Job:
    """The job once it ended, with every target (WatchJob says when; GetJob reads it)."""
    request = fleet_pb2.FleetServiceWatchJobRequest(job_id=job_id)
    async for msg in stub.WatchJob(request, timeout=600):
        if msg.job.state in ENDED and msg.job.ended_at:
            break
    reply = await stub.GetJob(fleet_pb2.FleetServiceGetJobRequest(job_id=job_id), timeout=60)
    return reply.job


def timeline(job: jobs_pb2.Job, t0: float) -> str:
    """Where a fleet round's time went, in ms after the RunJob call (the daemons'
    clocks for the targets' starts and ends, the manager's for ended_at; one host)."""
    starts = sorted(t.started_at for t in job.targets if t.started_at)
    ends = [t.ended_at for t in job.targets if t.ended_at]
    if not starts or not ends:
        return "no target times"

    def at(ms: int) -> str:
        return f"{ms - t0 * 1000:.0f}"

    hundredth = starts[min(99, len(starts) - 1)]
    return (
        f"first StartJob at the daemon {at(starts[0])}, 100th {at(hundredth)},"
        f" last {at(starts[-1])}; last target end {at(max(ends))}; job ended_at {at(job.ended_at)}"
    )


def first_start(job: jobs_pb2.Job, t0: float) -> float:
    """Seconds from the RunJob call to the first StartJob at a daemon (its clock)."""
    return min((t.started_at for t in job.targets if t.started_at), default=0) / 1000 - t0


def target_states(job: jobs_pb2.Job) -> dict[str, int]:
    """How many targets ended in each state, by name."""
    out: dict[str, int] = {}
    for t in job.targets:
        name = jobs_pb2.JobTargetState.Name(t.state).removeprefix("JOB_TARGET_STATE_")
        out[name] = out.get(name, 0) + 1
    return out


async def reference_round(
    stubs: list[DaemonServiceAsyncStub], sims: Child, job_id: str
) -> tuple[float, float, float]:
    """The same StartJob calls as one bare gather; (seconds until the last report was
    answered, seconds until the gather returned, seconds until the first StartJob
    reached a daemon, by its clock)."""
    # As the manager's driver asks: an end may come with the answer.
    request = daemon_pb2.StartJobRequest(job_id=job_id, steps=steps(["/bin/true"]), accept_end=True)
    t0 = time.time()
    answers = await asyncio.gather(*(s.StartJob(request, timeout=120) for s in stubs))
    t_gather = time.time() - t0
    if any(a.state not in (RUNNING, SUCCESS) for a in answers):
        raise RuntimeError("reference: a StartJob was not answered RUNNING or SUCCESS")
    deadline = time.monotonic() + 120
    while True:
        stats = await asyncio.to_thread(sims.ask, f"jobs {job_id}")
        if sum(stats["reports"].values()) >= len(stubs) and "" not in stats["reports"]:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"reference: the reports did not all arrive: {stats}")
        await asyncio.sleep(0.05)
    # Every end came with its answer: the gather is the whole of it.
    first = stats["first_started_at"] / 1000 - t0
    return max(stats["last_report_at"] - t0, t_gather), t_gather, first


def raw_sqlite_rate(path: Path, chunks: list[tuple[str, int, bytes]], per_tx: int) -> float:
    """MiB/s of plain executemany of (node, offset, data) chunks, `per_tx` per transaction."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(
        "CREATE TABLE job_output (job_id TEXT NOT NULL, node_id TEXT NOT NULL,"
        " offset INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (job_id, node_id, offset))"
    )
    rows = [("bench-job", node, offset, data) for node, offset, data in chunks]
    t0 = time.perf_counter()
    for i in range(0, len(rows), per_tx):
        with conn:
            conn.executemany(
                "INSERT INTO job_output (job_id, node_id, offset, data) VALUES (?, ?, ?, ?)",
                rows[i : i + per_tx],
            )
    elapsed = time.perf_counter() - t0
    conn.close()
    return sum(len(c[2]) for c in chunks) / MiB / elapsed


def cpu(child: Child) -> float:
    """CPU seconds (user + system) of that child process so far."""
    t = child.process.cpu_times()
    return float(t.user + t.system)


def main_thread_cpu(child: Child) -> float:
    """CPU seconds of that child's main thread (the manager's event loop) so far."""
    pid = child.process.pid
    for t in child.process.threads():
        if t.id == pid:
            return float(t.user_time + t.system_time)
    return 0.0


async def ingest(
    stub: FleetServiceAsyncStub,
    manager: Child,
    sims: Child,
    nodes: list[str],
    size: int,
    chunk: int,
    profile: str = "",
) -> tuple[float, list[str]]:
    """The ingest round: MiB/s stored by the manager; problems found."""
    problems: list[str] = []
    spec = jobs_pb2.JobSpec(name="bench-ingest", steps=steps([HELD]), node_ids=nodes)
    reply = await stub.RunJob(fleet_pb2.FleetServiceRunJobRequest(spec=spec), timeout=120)
    job_id = reply.job.id

    async def running() -> int:
        got = await stub.GetJob(fleet_pb2.FleetServiceGetJobRequest(job_id=job_id), timeout=60)
        return sum(t.state == RUNNING for t in got.job.targets)

    deadline = time.monotonic() + 120
    while await running() < len(nodes):
        if time.monotonic() > deadline:
            raise RuntimeError("ingest: the targets did not all start")
        await asyncio.sleep(0.1)
    await asyncio.sleep(SETTLE)
    upload = {"job_id": job_id, "nodes": nodes, "size": size, "chunk": chunk}
    if profile:
        await asyncio.to_thread(manager.ask, "profile on")
    cpu0 = (cpu(manager), cpu(sims))
    answer = await asyncio.to_thread(sims.ask, f"upload {json.dumps(upload)}")
    if profile:
        await asyncio.to_thread(manager.ask, f"profile {profile}")
    seconds = answer["t1"] - answer["t0"]
    used = (cpu(manager) - cpu0[0], cpu(sims) - cpu0[1])
    print(
        f"ingest: {seconds:.2f}s; CPU seconds meanwhile: manager {used[0]:.2f},"
        f" simulated daemons (uploading) {used[1]:.2f}",
        flush=True,
    )
    if answer["acked"] != size * len(nodes):
        problems.append(f"ingest: {answer['acked']} bytes acknowledged of {size * len(nodes)}")
    job = await ended(stub, job_id)
    stored = {t.node_id: (t.output_stored_bytes, t.output_truncated) for t in job.targets}
    short = {n: s for n, s in stored.items() if s != (size, False)}
    if short or job.state != jobs_pb2.JOB_STATE_SUCCESS:
        problems.append(f"ingest: job {job.state}, targets stored not {size} bytes: {short}")
    # One target read back: the stored bytes are the uploaded bytes.
    want = b"".join(d for _, d in output_chunks(nodes[0], size, chunk))
    got = bytearray()
    request = fleet_pb2.FleetServiceReadJobOutputRequest(job_id=job_id, node_id=nodes[0])
    async for msg in stub.ReadJobOutput(request, timeout=120):
        got += msg.data
    if bytes(got) != want:
        problems.append(f"ingest: {nodes[0]}'s stored output differs ({len(got)} bytes)")
    return size * len(nodes) / MiB / seconds, problems


async def run(
    n: int, concurrency: int, rounds: int, m: int, size: int, chunk: int, profile: str = ""
) -> int:
    raise_nofile()
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fleet-jobs-") as tmp:
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
        manager = sims = None
        ref_channels: list[aio.Channel] = []
        fleet_times: list[float] = []
        ref_times: list[tuple[float, float]] = []
        firsts: list[tuple[float, float]] = []  # first StartJob at a daemon: fleet, reference
        try:
            manager = Child(
                [str(ROOT / "bench" / "jobs.py"), "--manager-child"],
                {
                    "root": str(root),
                    "ca": str(mtls.ca_file),
                    "cert": str(mtls.cert_file),
                    "key": str(mtls.key_file),
                    "n": n,
                    "max_output": 2 * size,
                },
            )
            address = f"127.0.0.1:{manager.hello['port']}"
            sims = Child(
                ["-m", "bench.sim", "serve"],
                {
                    "manager": address,
                    "trust_domain": td,
                    "labels": LABELS,
                    "nodes": [
                        {
                            "node_id": node,
                            "ca": str(t.ca_file),
                            "cert": str(t.cert_file),
                            "key": str(t.key_file),
                        }
                        for node, t in node_tls.items()
                    ],
                },
            )
            addresses: dict[str, str] = sims.hello
            print(
                f"{n} simulated daemons up and registered in {time.perf_counter() - t0:.1f}s",
                flush=True,
            )
            credentials = channel_credentials(mtls)
            for node_id, addr in addresses.items():
                server_name = Identity("node", node_id, td).server_name
                args = channel_args(node_id, server_name, pool_config(n))
                ref_channels.append(aio.secure_channel(addr, credentials, options=args))
            await asyncio.gather(*(c.channel_ready() for c in ref_channels))
            ref_stubs = [daemon_pb2_grpc.DaemonServiceStub(c) for c in ref_channels]
            spec = jobs_pb2.JobSpec(
                name="bench-true",
                steps=steps(["/bin/true"]),
                selector=common_pb2.LabelSelector(match_labels=LABELS),
                max_concurrency=str(concurrency),
            )
            async with aio.secure_channel(
                address, channel_credentials(optls), options=channel_options(f"manager.{td}")
            ) as op_channel:
                stub = fleet_pb2_grpc.FleetServiceStub(op_channel)
                # Warm-up: the pool opens its N connections; the reference's are open.
                w0, _, warm = await run_job(stub, spec)
                warm_ref, _, _ = await reference_round(ref_stubs, sims, "ref-warm")
                print(
                    f"warm-up: fleet {warm.ended_at / 1000 - w0:.3f}s (opens {n} connections),"
                    f" reference {warm_ref:.3f}s",
                    flush=True,
                )
                gc.collect()
                gc.freeze()
                for r in range(rounds):
                    i0 = cpu(manager)
                    await asyncio.sleep(SETTLE)
                    idle_cpu = cpu(manager) - i0
                    if profile:
                        await asyncio.to_thread(manager.ask, "profile on")
                    gc0 = await asyncio.to_thread(manager.ask, "gc")
                    c0, l0, s0 = cpu(manager), main_thread_cpu(manager), cpu(sims)
                    t_start, _, job = await run_job(stub, spec)
                    sims_cpu = cpu(sims) - s0
                    if profile:
                        await asyncio.to_thread(manager.ask, "profile off")
                    took = job.ended_at / 1000 - t_start
                    manager_cpu = cpu(manager) - c0  # WatchJob/GetJob included
                    loop_cpu = main_thread_cpu(manager) - l0
                    gc1 = await asyncio.to_thread(manager.ask, "gc")
                    manager_gc = (gc1["gc"] - gc0["gc"], gc1["seconds"] - gc0["seconds"])
                    passes = gc1["passes"] - gc0["passes"]
                    commits = gc1["commits"] - gc0["commits"]
                    states = target_states(job)
                    if states != {"SUCCESS": n} or job.state != jobs_pb2.JOB_STATE_SUCCESS:
                        problems.append(f"round {r + 1}: job {job.state}, targets {states}")
                    started = await asyncio.to_thread(sims.ask, f"jobs {job.id}")
                    told = started["reports"]  # ends answered or reported, acknowledged
                    if started["starts"] != n or sum(told.get(k, 0) for k in ANSWERED) != n:
                        problems.append(f"round {r + 1}: the daemons saw {started}")
                    await asyncio.sleep(SETTLE)
                    r0, s0 = time.process_time(), cpu(sims)
                    ref, gathered, ref_first = await reference_round(ref_stubs, sims, f"ref-{r}")
                    ref_cpu = time.process_time() - r0
                    ref_sims_cpu = cpu(sims) - s0
                    fleet_times.append(took)
                    ref_times.append((ref, gathered))
                    firsts.append((first_start(job, t_start), ref_first))
                    print(
                        f"round {r + 1}: fleet {took:.3f}s  reference {ref:.3f}s"
                        f" (gather {gathered:.3f}s)  ratio {took / ref:.2f}x"
                        f"  (manager CPU {manager_cpu:.2f}s for the job, {loop_cpu:.2f}s of it its"
                        f" event loop's thread; cyclic GC {manager_gc[0]} collections"
                        f" {manager_gc[1] * 1000:.0f} ms; the reference's CPU {ref_cpu:.2f}s;"
                        f" the simulated daemons' CPU {sims_cpu:.2f}s (fleet),"
                        f" {ref_sims_cpu:.2f}s (reference))",
                        flush=True,
                    )
                    print(
                        f"  fleet's timeline: {timeline(job, t_start)}; the reference's first"
                        f" StartJob at the daemon {ref_first * 1000:.0f} ms after its gather began;"
                        f" the manager's CPU in the"
                        f" {SETTLE:g} s before the round (idle) {idle_cpu:.3f}s; the driver's"
                        f" passes {passes}, the job updates' commits {commits}",
                        flush=True,
                    )
                refused = (await asyncio.to_thread(sims.ask, "jobs ref-*"))["reports"]
                if profile:
                    await asyncio.to_thread(manager.ask, f"profile {profile}.dispatch")
                rate, found = await ingest(
                    stub,
                    manager,
                    sims,
                    list(addresses)[:m],
                    size,
                    chunk,
                    f"{profile}.ingest" if profile else "",
                )
                problems += found
        finally:
            for c in ref_channels:
                await c.close(None)
            if sims is not None:
                sims.close()
            if manager is not None:
                manager.close()
        chunks = [
            (node, o, d) for node in list(node_tls)[:m] for o, d in output_chunks(node, size, chunk)
        ]
        raw = raw_sqlite_rate(root / "raw.db", chunks, m)
        # For context: the same with one transaction per chunk, as each upload is stored.
        raw_one = raw_sqlite_rate(root / "raw1.db", chunks, 1)

    ratio = statistics.median(f / r for f, (r, _) in zip(fleet_times, ref_times, strict=True))
    fleet_med = statistics.median(fleet_times)
    ref_med = statistics.median(r for r, _ in ref_times)
    gather_med = statistics.median(g for _, g in ref_times)
    print()
    print(f"job `true` on {n} daemons, max_concurrency {concurrency}, median of {rounds} round(s):")
    print("  fleet (RunJob -> ended_at)  reference (gather [+ reports])  ratio  gather alone")
    print(
        f"  {fleet_med * 1000:21.0f} ms  {ref_med * 1000:25.0f} ms  {ratio:4.2f}x"
        f"  {gather_med * 1000:9.0f} ms"
    )
    print("  (ratio: median of the rounds' fleet/reference ratios; target <= 1.3x)")
    print(
        "  the first StartJob at a daemon, median:"
        f" fleet {statistics.median(f for f, _ in firsts) * 1000:.0f} ms after the RunJob call,"
        f" reference {statistics.median(r for _, r in firsts) * 1000:.0f} ms after its gather began"
    )
    print(f"  the manager's answers to the reference's reports: {refused}")
    print(f"output ingest, {m} targets x {size // 1024} KiB in {chunk // 1024} KiB chunks:")
    print("  manager (UploadJobOutput)  raw sqlite3.executemany  ratio")
    print(f"  {rate:19.1f} MiB/s  {raw:17.1f} MiB/s  {rate / raw:4.2f}x")
    print("  (target >= 0.3x)")
    print(f"  raw with one transaction per chunk: {raw_one:.1f} MiB/s ({rate / raw_one:.2f}x)")
    for p in problems:
        print(f"CHECK FAILED: {p}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: seconds")
    parser.add_argument("-n", type=int, default=500, help="simulated daemons (default 500)")
    parser.add_argument(
        "--max-concurrency", type=int, default=100, help="the job's window (default 100)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="dispatch rounds (default 5)")
    parser.add_argument(
        "--ingest-targets", type=int, default=200, help="targets uploading (default 200)"
    )
    parser.add_argument(
        "--ingest-bytes", type=int, default=MiB, help="output per target (default 1 MiB)"
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=256 * 1024,
        help="upload chunk size (default 256 KiB, the daemon's)",
    )
    parser.add_argument(
        "--profile",
        default="",
        help="cProfile the manager: the dispatch rounds into FILE.dispatch, the ingest"
        " into FILE.ingest",
        metavar="FILE",
    )
    parser.add_argument("--manager-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.manager_child:
        asyncio.run(serve_manager())
        return 0
    if args.smoke:
        return asyncio.run(run(6, 2, 1, 3, 256 * 1024, 64 * 1024))
    if args.ingest_targets > args.n:
        parser.error("--ingest-targets must not exceed -n")
    return asyncio.run(
        run(
            args.n,
            args.max_concurrency,
            args.rounds,
            args.ingest_targets,
            args.ingest_bytes,
            args.chunk,
            str(Path(args.profile).resolve()) if args.profile else "",
        )
    )


if __name__ == "__main__":
    sys.exit(main())
