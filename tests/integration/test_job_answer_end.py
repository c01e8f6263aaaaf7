"""A fast job's end on the StartJob answer: the real daemon against the real manager.

The daemon (`DaemonServer`: job engine, reporter, manager link) and the
manager (`ManagerServer` on SQLite) are the real ones, over mTLS, on both
transports: DaemonService dialled by the manager, and the daemon's control
stream. A lost answer is the control stream blackholed (`BlackholeProxy`)
while the daemon answers, then dropped: the manager asks again over the
next stream and the daemon answers the same end from the job's directory.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import BlackholeProxy, daemon_config, short_tmp
from fleet_harness import operator_stub
from manager_harness import manager_config, running_manager

from bench.sim import SimFleet, SimNode
from daemon.config import JobsConfig, ManagerLinkConfig
from daemon.jobs.engine import ANSWERED
from daemon.server import DaemonServer
from fleet.retry import Backoff
from fleet.v1 import common_pb2, fleet_pb2, fleet_pb2_grpc, jobs_pb2
from manager.server import ManagerServer
from manager.storage.jobs import JobRecord, JobRepository, JobTargetRecord, JobTx

NODE = "n1"
S = jobs_pb2


@dataclass
class Env:
    manager: ManagerServer
    stub: fleet_pb2_grpc.FleetServiceStub
    daemon: DaemonServer
    proxy: BlackholeProxy
    """Between the daemon and the manager (the daemon's link and control stream)."""


async def until(probe: Callable[[], Any], within: float = 20.0) -> Any:
    """Poll another component's state until `probe()` is true."""
    async with asyncio.timeout(within):
        while not (got := probe()):  # noqa: ASYNC110  # no event to wait on
            await asyncio.sleep(0.02)
    return got


@asynccontextmanager
async def fleet(
    pki: Any, tmp: Path, transport: str, jobs: JobsConfig | None = None
) -> AsyncIterator[Env]:
    """A manager and daemon n1 linked through a proxy. `transport`: "dialled" (no control
    stream: the manager dials the daemon) or "stream" (no listen port: the stream only)."""
    url = f"sqlite+aiosqlite:///{tmp / 'manager.db'}"
    proxy = BlackholeProxy()
    await proxy.start()
    async with (
        running_manager(manager_config(pki, url, tmp / "state"), clock=time.time) as manager,
        operator_stub(pki, manager.port) as stub,
    ):
        proxy.target_port = manager.port
        link = ManagerLinkConfig(
            addresses=(f"127.0.0.1:{proxy.port}",),
            rpc_timeout_seconds=2.0,
            reconnect=Backoff(initial=0.05, maximum=0.3),
            control_stream=transport == "stream",
        )
        with short_tmp() as root:
            cfg = daemon_config(
                root,
                pki.issue("node", NODE),
                (),
                manager=link,
                jobs=jobs or JobsConfig(grace_seconds=1.0),
                **({"listen": ""} if transport == "stream" else {}),
            )
            daemon = DaemonServer(cfg)
            await daemon.start()
            try:
                request = fleet_pb2.FleetServiceGetNodeRequest(node_id=NODE)

                async def online() -> bool:
                    try:
                        reply = await stub.GetNode(request)
                    except Exception:
                        return False
                    return bool(reply.node.status == common_pb2.NODE_STATUS_ONLINE)

                async with asyncio.timeout(20):
                    while not await online():  # noqa: ASYNC110  # the manager's view
                        await asyncio.sleep(0.05)
                if transport == "stream":
                    await until(lambda: manager.control_streams.get(NODE) is not None)
                yield Env(manager, stub, daemon, proxy)
            finally:
                await daemon.stop(1.0)
                await proxy.close()


async def run(env: Env, *argv: str) -> str:
    spec = jobs_pb2.JobSpec(
        steps=[jobs_pb2.JobStep(command=jobs_pb2.JobCommand(argv=list(argv)))], node_ids=[NODE]
    )
    reply = await env.stub.RunJob(fleet_pb2.FleetServiceRunJobRequest(spec=spec))
    return str(reply.job.id)


async def finished(env: Env, job_id: str) -> jobs_pb2.Job:
    async with asyncio.timeout(30):
        async for msg in env.stub.WatchJob(fleet_pb2.FleetServiceWatchJobRequest(job_id=job_id)):
            if msg.job.ended_at:
                break
    reply = await env.stub.GetJob(fleet_pb2.FleetServiceGetJobRequest(job_id=job_id))
    job: jobs_pb2.Job = reply.job
    return job


async def stored_output(env: Env, job_id: str) -> bytes:
    request = fleet_pb2.FleetServiceReadJobOutputRequest(job_id=job_id, node_id=NODE)
    return b"".join([m.data async for m in env.stub.ReadJobOutput(request)])


async def finished_events(env: Env, job_id: str) -> list[str]:
    """The JOB_TARGET_FINISHED events of `job_id`."""
    request = fleet_pb2.FleetServiceWatchEventsRequest(
        kinds=[fleet_pb2.EVENT_KIND_JOB_TARGET_FINISHED]
    )
    return [
        m.event.message async for m in env.stub.WatchEvents(request) if job_id in m.event.message
    ]


@pytest.mark.parametrize("transport", ["dialled", "stream"])
async def test_a_fast_command_ends_with_its_answer(
    pki: Any, tmp_path: Path, transport: str
) -> None:
    """`echo hi`: its end and output come with the StartJob answer and are stored; one
    JOB_TARGET_FINISHED event; the daemon never calls ReportJobStatus nor uploads. (A
    wait of 5 s: on a loaded host the step may take longer than the default 0.2 s.)"""
    jobs = JobsConfig(grace_seconds=1.0, answer_wait_seconds=5.0)
    async with fleet(pki, tmp_path, transport, jobs) as env:
        job_id = await run(env, "/bin/sh", "-c", "echo hi; echo oops >&2; exit 3")
        job = await finished(env, job_id)
        (target,) = job.targets
        assert target.state == S.JOB_TARGET_STATE_FAILED
        assert target.exit_code == 3
        assert target.started_at
        assert target.ended_at >= target.started_at
        assert [s.exit_code for s in target.steps] == [3]
        assert target.output_stored_bytes == len(b"hi\noops\n")
        assert await stored_output(env, job_id) == b"hi\noops\n"
        assert len(await finished_events(env, job_id)) == 1
        reporter = env.daemon.job_reporter
        assert reporter.reports == 0, "the end came with the answer: nothing to report"
        assert reporter.uploaded_bytes == 0
        record = env.daemon.jobs.record(job_id)
        assert record.settled
        assert record.extra[ANSWERED] == record.version
        assert not env.daemon.jobs.jobs(), "an answered job leaves the daemon's memory"


@pytest.mark.parametrize("transport", ["dialled", "stream"])
async def test_a_slow_command_is_answered_running_and_reports_its_end(
    pki: Any, tmp_path: Path, transport: str
) -> None:
    """A command longer than answer_wait_seconds: answered RUNNING, its end reported."""
    jobs = JobsConfig(grace_seconds=1.0, answer_wait_seconds=0.1)
    async with fleet(pki, tmp_path, transport, jobs) as env:
        job_id = await run(env, "/bin/sh", "-c", "sleep 0.8; echo done")
        job = await finished(env, job_id)
        (target,) = job.targets
        assert target.state == S.JOB_TARGET_STATE_SUCCESS
        assert await stored_output(env, job_id) == b"done\n"
        assert len(await finished_events(env, job_id)) == 1
        assert env.daemon.job_reporter.reports >= 1
        assert ANSWERED not in env.daemon.jobs.record(job_id).extra


async def test_output_too_long_for_the_answer_is_uploaded_then_reported(
    pki: Any, tmp_path: Path
) -> None:
    """A fast command with 100 KiB of output (over 64 KiB): the end waits for the upload,
    so the manager never sees the target ended without its output."""
    async with fleet(pki, tmp_path, "dialled") as env:
        job_id = await run(env, "/bin/sh", "-c", "head -c 102400 /dev/zero | tr '\\0' x")
        job = await finished(env, job_id)
        (target,) = job.targets
        assert target.state == S.JOB_TARGET_STATE_SUCCESS
        assert target.output_stored_bytes == 102400
        assert await stored_output(env, job_id) == b"x" * 102400
        assert env.daemon.job_reporter.reports >= 1
        assert len(await finished_events(env, job_id)) == 1


async def test_a_start_job_whose_answer_was_lost_is_answered_again_and_stored_once(
    pki: Any, tmp_path: Path
) -> None:
    """The answer carrying the end goes into a cut stream (the daemon counts it told);
    the stream drops, the manager sends StartJob again over the next one, and the
    daemon answers the same end from the job's directory: stored once, one event,
    nothing reported, the command run once."""
    jobs = JobsConfig(grace_seconds=1.0, answer_wait_seconds=3.0)
    async with fleet(pki, tmp_path, "stream", jobs) as env:
        marks = tmp_path / "runs"
        job_id = await run(env, "/bin/sh", "-c", f"sleep 0.7; echo ran >> {marks}; echo hi")
        held = await until(lambda: env.daemon.jobs.jobs())
        env.proxy.cut()  # the answer, due when the command ends, is lost
        record = held[0].record
        await until(lambda: record.settled)
        assert record.extra[ANSWERED] == record.version
        env.proxy.mend()  # both ends see the stream drop; the daemon reconnects
        job = await finished(env, job_id)
        (target,) = job.targets
        assert target.state == S.JOB_TARGET_STATE_SUCCESS
        assert await stored_output(env, job_id) == b"hi\n"
        assert len(await finished_events(env, job_id)) == 1
        assert marks.read_text() == "ran\n", "the command ran once"
        assert env.daemon.job_reporter.reports == 0


def ended(node: SimNode, job_id: str) -> bool:
    job = node.servicer.jobs.get(job_id)
    return job is not None and job.ended.is_set()


async def test_ends_waiting_for_their_commit_are_not_sent_again(pki: Any, tmp_path: Path) -> None:
    """Answers with ends free their window slots before their commit; a re-read of the job
    meanwhile (the driver's safety reload, a poke) must not send those targets again.
    The commits are held back by another writer holding SQLite's write lock."""
    db_file = tmp_path / "manager.db"
    config = manager_config(pki, f"sqlite+aiosqlite:///{db_file}", tmp_path / "state")
    async with (
        running_manager(config, clock=time.time) as manager,
        operator_stub(pki, manager.port) as stub,
    ):
        sims = await SimFleet.start(pki.ca, tmp_path / "sims", count=3, answer_wait=2.0)
        try:
            await sims.register_all(f"127.0.0.1:{manager.port}")
            spec = jobs_pb2.JobSpec(
                steps=[jobs_pb2.JobStep(command=jobs_pb2.JobCommand(argv=["sleep", "0.3"]))],
                node_ids=[n.node_id for n in sims.nodes],
            )
            reply = await stub.RunJob(fleet_pb2.FleetServiceRunJobRequest(spec=spec))
            job_id = reply.job.id
            # Every target sent (the driver's pass is over); their ends come at 0.3 s.
            await until(lambda: all(job_id in n.servicer.jobs for n in sims.nodes))
            blocker = sqlite3.connect(db_file, isolation_level=None)
            try:
                blocker.execute("BEGIN IMMEDIATE")  # before the ends are answered (0.3 s)
                await until(lambda: all(ended(n, job_id) for n in sims.nodes))
                await asyncio.sleep(0.2)  # the answers are in, their commits wait
                manager.job_driver.poke(job_id)  # re-read the job from the database
                await asyncio.sleep(0.5)
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            async with asyncio.timeout(20):
                request = fleet_pb2.FleetServiceWatchJobRequest(job_id=job_id)
                async for msg in stub.WatchJob(request):
                    if msg.job.ended_at:
                        break
            got = await stub.GetJob(fleet_pb2.FleetServiceGetJobRequest(job_id=job_id))
            assert {t.state for t in got.job.targets} == {S.JOB_TARGET_STATE_SUCCESS}
            starts = {n.node_id: n.servicer.jobs[job_id].starts for n in sims.nodes}
            assert starts == dict.fromkeys(starts, 1), "no target was sent twice"
            assert {n.servicer.jobs[job_id].reported for n in sims.nodes} == {"answered"}
        finally:
            await sims.close()


async def test_a_read_older_than_a_commit_sends_nothing_again(pki: Any, tmp_path: Path) -> None:
    """A re-read of a live job (the safety reload, a poke) whose rows were read before
    some answers' commits landed, installed after them, must not put those targets back
    to PENDING: they would be sent again. The read is made stale by hand (the targets as
    RunJob stored them), since which of the read and the commit finishes first is up to
    the database thread; one node is down so that the job stays live."""
    config = manager_config(pki, f"sqlite+aiosqlite:///{tmp_path / 'manager.db'}", tmp_path / "st")
    async with (
        running_manager(config, clock=time.time) as manager,
        operator_stub(pki, manager.port) as stub,
    ):
        sims = await SimFleet.start(pki.ca, tmp_path / "sims", count=4, answer_wait=2.0)
        try:
            await sims.register_all(f"127.0.0.1:{manager.port}")
            down = sims.nodes[3]
            await down.stop()  # its target stays PENDING (unreachable): the job stays live
            spec = jobs_pb2.JobSpec(
                steps=[jobs_pb2.JobStep(command=jobs_pb2.JobCommand(argv=["true"]))],
                node_ids=[n.node_id for n in sims.nodes],
            )
            reply = await stub.RunJob(fleet_pb2.FleetServiceRunJobRequest(spec=spec))
            job_id = reply.job.id
            up = sims.nodes[:3]
            repo = JobRepository(manager.db)

            async def read(tx: JobTx) -> tuple[JobRecord | None, dict[str, JobTargetRecord]]:
                return await tx.job(job_id), await tx.targets(job_id)

            async def stored() -> tuple[JobRecord | None, dict[str, JobTargetRecord]]:
                return await repo.run(read, write=False)

            async with asyncio.timeout(20):
                while {(await stored())[1][n.node_id].state for n in up} != {"SUCCESS"}:  # noqa: ASYNC110  # the database has no event
                    await asyncio.sleep(0.05)
            record, targets = await stored()
            assert record is not None
            assert not record.ended_ms
            stale = {
                n: JobTargetRecord(job_id, n, idx=t.idx, stage=t.stage) for n, t in targets.items()
            }
            manager.job_driver._install(record, stale)  # as if read before those commits
            manager.job_driver.poke()
            await asyncio.sleep(1.0)  # a few passes of the driver
            starts = {n.node_id: n.servicer.jobs[job_id].starts for n in up}
            assert starts == dict.fromkeys(starts, 1), "no target was sent twice"
        finally:
            await sims.close()


class TickingClock:
    """The wall clock, 2 ms further on at every reading: two readings never share a
    millisecond, so equal stored times were taken by the same reading (one commit)."""

    def __init__(self) -> None:
        self.readings = 0

    def __call__(self) -> float:
        self.readings += 1
        return time.time() + self.readings * 0.002


async def test_a_job_ends_in_the_commit_of_its_last_end(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """The last target's end carried by its StartJob answer and the job's end are stored in
    one commit (one clock reading: the job's ended_at is that target's updated time), with
    one JOB_FINISHED event, on both databases."""
    config = manager_config(pki, database_url, tmp_path / "state")
    async with (
        running_manager(config, clock=TickingClock()) as manager,
        operator_stub(pki, manager.port) as stub,
    ):
        sims = await SimFleet.start(pki.ca, tmp_path / "sims", count=3, answer_wait=2.0)
        try:
            await sims.register_all(f"127.0.0.1:{manager.port}")
            spec = jobs_pb2.JobSpec(
                steps=[jobs_pb2.JobStep(command=jobs_pb2.JobCommand(argv=["true"]))],
                node_ids=[n.node_id for n in sims.nodes],
            )
            reply = await stub.RunJob(fleet_pb2.FleetServiceRunJobRequest(spec=spec))
            job_id = reply.job.id
            async with asyncio.timeout(20):
                request = fleet_pb2.FleetServiceWatchJobRequest(job_id=job_id)
                async for msg in stub.WatchJob(request):
                    if msg.job.ended_at:
                        break

            async def read(tx: JobTx) -> tuple[JobRecord | None, dict[str, JobTargetRecord]]:
                return await tx.job(job_id), await tx.targets(job_id)

            record, targets = await JobRepository(manager.db).run(read, write=False)
            assert record is not None
            assert record.state == "SUCCESS"
            assert {t.state for t in targets.values()} == {"SUCCESS"}
            assert record.ended_ms == max(t.updated_ms for t in targets.values())
            events = fleet_pb2.FleetServiceWatchEventsRequest(
                kinds=[fleet_pb2.EVENT_KIND_JOB_FINISHED]
            )
            finished = [m async for m in stub.WatchEvents(events) if job_id in m.event.message]
            assert len(finished) == 1
            assert "finished: SUCCESS (3 SUCCESS)" in finished[0].event.message
        finally:
            await sims.close()
