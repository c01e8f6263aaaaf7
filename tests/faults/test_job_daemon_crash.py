"""kill -9 a real fleet-daemon while a job's step runs, and start it again."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

from daemon_helpers import client_channel, short_tmp
from faultkit import DaemonProc, kill_marked, marked

from fleet.v1 import daemon_pb2, daemon_pb2_grpc, jobs_pb2

FINAL = {jobs_pb2.JOB_TARGET_STATE_FAILED, jobs_pb2.JOB_TARGET_STATE_SUCCESS}


async def test_daemon_kill9_during_a_job_readopts_the_step(pki: Any) -> None:
    """The step outlives the crash, is re-adopted (not run again), its exit code is recorded
    once, the next step runs, and the output has every line exactly once."""
    marker = f"fltjob-{secrets.token_hex(4)}"
    ticker = "echo start; for i in $(seq 1 20); do echo tick $i; sleep 0.1; done; exit 3"
    request = daemon_pb2.StartJobRequest(
        job_id="crash-1",
        steps=[
            jobs_pb2.JobStep(command=jobs_pb2.JobCommand(argv=["/bin/sh", "-c", ticker, marker])),
            jobs_pb2.JobStep(
                command=jobs_pb2.JobCommand(argv=["echo", "cleanup"]),
                when=jobs_pb2.STEP_WHEN_ALWAYS,
            ),
        ],
    )
    with short_tmp() as root:
        daemon = DaemonProc(root, pki.issue("node", "n1"), body="[jobs]\ngrace_seconds = 1.0\n")
        try:
            await daemon.wait_ready(daemon.start())
            async with client_channel(
                pki.issue("manager", "m"), daemon.port, "n1", pki.trust_domain
            ) as channel:
                stub = daemon_pb2_grpc.DaemonServiceStub(channel)
                reply = await stub.StartJob(request, timeout=5)
                assert reply.state == jobs_pb2.JOB_TARGET_STATE_RUNNING
                output = root / "state" / "jobs" / "crash-1" / "output"
                deadline = time.monotonic() + 20
                while b"tick 3" not in output.read_bytes():
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                before = marked(marker)
                assert len(before) == 1

                daemon.kill9()
                await asyncio.sleep(0.3)
                assert marked(marker) == before, "the step must survive the daemon"

                await daemon.wait_ready(daemon.start())
                state = 0
                deadline = time.monotonic() + 30
                while state not in FINAL:
                    assert time.monotonic() < deadline, "the job never ended"
                    await asyncio.sleep(0.1)
                    try:
                        state = (await stub.StartJob(request, timeout=5)).state
                    except Exception:  # the daemon may not serve yet
                        continue
                out = b"".join(
                    [
                        r.data
                        async for r in stub.ReadJobOutput(
                            daemon_pb2.ReadJobOutputRequest(job_id="crash-1"), timeout=5
                        )
                    ]
                )
        finally:
            daemon.stop()
            kill_marked(marker)
        expected = ["start", *(f"tick {i}" for i in range(1, 21)), "cleanup"]
        assert out.decode().splitlines() == expected
        record = json.loads((root / "state" / "jobs" / "crash-1" / "state.json").read_text())
        assert state == jobs_pb2.JOB_TARGET_STATE_FAILED
        assert (record["state"], record["exit_code"]) == ("FAILED", 3)
        assert [(s["state"], s["exit_code"]) for s in record["steps"]] == [
            ("FAILED", 3),
            ("SUCCESS", 0),
        ]
