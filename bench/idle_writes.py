"""Event-loop CPU per agent-state report and per metric batch, each written alone.

    python bench/idle_writes.py [--nodes 2000] [--writes 400] [--gap 0.02] [--smoke]

What an idle fleet's manager does all the time (bench/connect.py, issue 15): a
report or a batch now and then, each its own transaction. The services
themselves (`AgentStates`, `MetricsService` with its `MetricWriter`) on an
SQLite file in /dev/shm with `--nodes` registered nodes, called one at a time
`--gap` seconds apart; printed: the event loop's thread CPU (`time.thread_time`)
and the process's per write, and the loop's CPU per iteration of the same
loop without the write (the harness: building the snapshot, the sleep).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.sim import SimDaemon  # noqa: E402
from manager.service.agents import AgentStates, snapshot_records  # noqa: E402
from manager.service.heartbeats import HeartbeatBuffer  # noqa: E402
from manager.service.liveness import LivenessPolicy  # noqa: E402
from manager.service.metrics import MetricsService  # noqa: E402
from manager.service.model import MetricPoint, Registration  # noqa: E402
from manager.service.registry import NodeRegistry  # noqa: E402
from manager.storage.db import Database  # noqa: E402
from manager.storage.desired import DesiredStateRepository  # noqa: E402
from manager.storage.metrics import MetricStore  # noqa: E402
from manager.storage.nodes import NodeRepository  # noqa: E402
from manager.storage.writer import MetricWriter  # noqa: E402


async def run(nodes: int, writes: int, gap: float) -> None:
    where = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="bench-idle-writes-"))
    db = await Database.open(f"sqlite+aiosqlite:///{where / 'manager.db'}")
    try:
        await db.migrate()
        repo = NodeRepository(db)
        registry = NodeRegistry(
            repo,
            HeartbeatBuffer(repo),
            policy=LivenessPolicy(),
            max_clock_skew=300,
            clock=time.time,
        )
        daemons = [SimDaemon(f"n{i:05d}") for i in range(nodes)]
        for d in daemons:
            await registry.register(
                Registration(
                    node_id=d.node_id,
                    hostname=d.node_id,
                    ip="127.0.0.1",
                    os="linux",
                    arch="x86_64",
                    labels={"sim": "idle"},
                    daemon_version="bench",
                    agent_version="bench",
                    daemon_address="",
                    jobs_disabled=False,
                    cert_not_after_ms=0,
                )
            )
        agents = AgentStates(registry, DesiredStateRepository(db), clock=time.time)
        for d in daemons:  # every node's first snapshot
            states, errors = snapshot_records(d.agent_states(), received_ms=int(time.time() * 1000))
            await agents.sync(d.node_id, states, update_errors=errors)
        rng = random.Random(1)

        def changed_snapshot() -> tuple[SimDaemon, object]:
            d = rng.choice(daemons)
            info = rng.choice(list(d.agents.values()))  # an agent restarts by itself
            info.restart_count += 1
            info.pid += 1
            return d, snapshot_records(d.agent_states(), received_ms=int(time.time() * 1000))

        t0 = time.thread_time()
        for _ in range(writes):
            changed_snapshot()
            await asyncio.sleep(gap)
        harness = (time.thread_time() - t0) / writes
        print(f"harness alone: loop {1e3 * harness:.3f} ms per iteration")
        for _ in range(2):
            commits = agents.commits
            t0, p0 = time.thread_time(), time.process_time()
            for _ in range(writes):
                d, (states, errors) = changed_snapshot()  # type: ignore[misc]
                await agents.sync(d.node_id, states, update_errors=errors)
                await asyncio.sleep(gap)
            loop, proc = (time.thread_time() - t0) / writes, (time.process_time() - p0) / writes
            print(
                f"agent-state reports: {writes} in {agents.commits - commits} commits; "
                f"loop {1e3 * loop:.3f} ms per report (less the harness: "
                f"{1e3 * (loop - harness):.3f}), process {1e3 * proc:.3f} ms"
            )
        store = MetricStore(db)
        writer = MetricWriter(store, linger_seconds=0.05)
        writer.start()
        service = MetricsService(
            registry, writer, store, raw_retention_ms=3_600_000, max_samples=10_000, clock=time.time
        )
        sequence = dict.fromkeys((d.node_id for d in daemons), 1)
        for _ in range(2):
            commits = writer.commits
            t0, p0 = time.thread_time(), time.process_time()
            for _ in range(writes):
                node_id = rng.choice(daemons).node_id
                seq = sequence[node_id]
                sequence[node_id] += 1
                point = MetricPoint(
                    type="sim",
                    timestamp_ms=int(time.time() * 1000),
                    values={"batch": float(seq), "v0": 0.0},
                    agent_id="",
                )
                await service.ingest(node_id, seq, [point])
                await asyncio.sleep(gap)
            loop, proc = (time.thread_time() - t0) / writes, (time.process_time() - p0) / writes
            print(
                f"metric batches: {writes} in {writer.commits - commits} commits; "
                f"loop {1e3 * loop:.3f} ms per batch, process {1e3 * proc:.3f} ms"
            )
        await writer.stop()
    finally:
        await db.close()
        shutil.rmtree(where, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--writes", type=int, default=400)
    parser.add_argument("--gap", type=float, default=0.02, help="seconds between writes")
    parser.add_argument("--smoke", action="store_true", help="20 nodes, 10 writes (the tests' run)")
    args = parser.parse_args()
    if args.smoke:
        args.nodes, args.writes, args.gap = 20, 10, 0.001
    asyncio.run(run(args.nodes, args.writes, args.gap))


if __name__ == "__main__":
    main()
