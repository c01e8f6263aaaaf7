"""How long a fast command takes to end on a real daemon, from StartJob: what the
daemon's `[jobs] answer_wait_seconds` must cover for its end to ride on the answer.

    python bench/job_answer.py            # 40 jobs one at a time, then 40 at once
    python bench/job_answer.py -n 100 --argv /bin/true

A real `DaemonServer` (its own CA and certificates, state under a temp dir,
`max_concurrent` = n, `answer_wait_seconds` = 5 so every answer waits for the end),
called as the manager calls it: StartJob with `accept_end`. Prints the time until
each answer (which then carries the end) and the percentiles, sequential and
concurrent.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grpc import aio  # noqa: E402

from daemon.config import DaemonConfig, JobsConfig, ManagerLinkConfig  # noqa: E402
from daemon.server import DaemonServer  # noqa: E402
from fleet.pki import CertificateAuthority, Identity  # noqa: E402
from fleet.tls import channel_credentials, channel_options  # noqa: E402
from fleet.v1 import daemon_pb2, daemon_pb2_grpc, jobs_pb2  # noqa: E402


def percentiles(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=100, method="inclusive")
    return (
        f"p50 {q[49] * 1000:.0f} ms  p90 {q[89] * 1000:.0f} ms  p99 {q[98] * 1000:.0f} ms"
        f"  max {max(xs) * 1000:.0f} ms"
    )


async def run(n: int, argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="fleet-answer-") as tmp:
        root = Path(tmp)
        ca = CertificateAuthority.create()
        node = ca.issue("node", "n1", ips=("127.0.0.1",)).write(root / "node")
        manager = ca.issue("manager", "m1").write(root / "manager")
        cfg = DaemonConfig(
            tls=node,
            node_id="n1",
            listen="127.0.0.1:0",
            advertise="",
            state_dir=root / "state",
            run_dir=root / "run",
            log_dir=root / "log",
            metrics_listen="",
            manager=ManagerLinkConfig(addresses=("127.0.0.1:1",)),  # no manager: no reports
            jobs=JobsConfig(max_concurrent=n, answer_wait_seconds=5.0),
        )
        daemon = DaemonServer(cfg)
        await daemon.start()
        name = Identity("node", "n1", ca.trust_domain).server_name
        channel = aio.secure_channel(
            f"127.0.0.1:{daemon.port}",
            channel_credentials(manager),
            options=channel_options(name),
        )
        stub = daemon_pb2_grpc.DaemonServiceStub(channel)
        step = jobs_pb2.JobStep(command=jobs_pb2.JobCommand(argv=argv))
        problems = 0

        async def one(job_id: str) -> float:
            nonlocal problems
            request = daemon_pb2.StartJobRequest(job_id=job_id, steps=[step], accept_end=True)
            t0 = time.perf_counter()
            reply = await stub.StartJob(request, timeout=30)
            took = time.perf_counter() - t0
            if not reply.HasField("end"):
                problems += 1
            return took

        try:
            await one("warm-up")
            sequential = [await one(f"seq-{i}") for i in range(n)]
            concurrent = await asyncio.gather(*(one(f"par-{i}") for i in range(n)))
        finally:
            await channel.close()
            await daemon.stop(1.0)
    print(f"{argv}: StartJob with accept_end until the answer carrying the end")
    print(f"  {n} one at a time: {percentiles(sequential)}")
    print(f"  {n} at once:       {percentiles(list(concurrent))}")
    if problems:
        print(f"CHECK FAILED: {problems} answers without an end")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=40, help="jobs per series (default 40)")
    parser.add_argument("--argv", nargs="+", default=["/bin/echo", "hi"], help="the command")
    args = parser.parse_args()
    return asyncio.run(run(args.n, args.argv))


if __name__ == "__main__":
    sys.exit(main())
