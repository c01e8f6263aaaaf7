"""WatchJob through the real manager over mTLS (both databases): the messages replayed
are the stored job, and a change shows while the job runs, well before the watch's
safety-net re-read (`WATCH_FULL_READ`) on SQLite, where it follows the commits."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from grpc import aio
from job_helpers import command, job_env
from manager_harness import node_stub

from fleet.v1 import fleet_pb2, jobs_pb2, manager_pb2

S = jobs_pb2
_SOON = 2.0  # seconds: under WATCH_FULL_READ, so news came from the commits (SQLite)


@pytest.fixture
async def env(pki: Any, tmp_path: Path, database_url: str) -> Any:
    async with job_env(pki, tmp_path, database_url) as running:
        yield running


class Replay:
    """A WatchJob stream applied as a client does: the first job, then the changes."""

    def __init__(self, stub: Any, job_id: str) -> None:
        self.stream = stub.WatchJob(fleet_pb2.FleetServiceWatchJobRequest(job_id=job_id))
        self.job = jobs_pb2.Job()
        self.targets: dict[str, jobs_pb2.JobTarget] = {}
        self.seen: dict[str, list[int]] = {}  # the states shown per target, in order

    async def next(self) -> fleet_pb2.FleetServiceWatchJobResponse:
        msg = await self.stream.read()
        assert msg is not None, "the watch ended"
        self.job = msg.job
        for t in [*msg.job.targets, *msg.targets]:
            self.targets[t.node_id] = t
            self.seen.setdefault(t.node_id, []).append(t.state)
        return msg

    async def until(self, done: Any, within: float) -> None:
        async with asyncio.timeout(within):
            while not done(self):
                await self.next()


async def test_the_watch_replayed_is_the_stored_job_and_closes_at_its_end(env: Any) -> None:
    """Every target's last message equals GetJob's; no state goes back; the stream ends."""
    _, stub, start = env
    for i in range(4):
        await start(f"w-{i}", output=f"out {i}\n".encode() * 50)
    reply = await stub.RunJob(
        fleet_pb2.FleetServiceRunJobRequest(
            spec=command("echo", node_ids=[f"w-{i}" for i in range(4)], max_concurrency="2")
        )
    )
    watch = Replay(stub, reply.job.id)
    await watch.until(lambda w: w.job.ended_at, 20)
    assert await watch.stream.read() is aio.EOF
    stored = (await stub.GetJob(fleet_pb2.FleetServiceGetJobRequest(job_id=reply.job.id))).job
    assert watch.targets == {t.node_id: t for t in stored.targets}
    assert list(watch.job.counts) == list(stored.counts)
    assert watch.job.state == stored.state == S.JOB_STATE_SUCCESS
    for node, shown in watch.seen.items():
        assert shown == sorted(shown, key=_rank), (node, shown)


def _rank(state: int) -> int:
    order = [S.JOB_TARGET_STATE_PENDING, S.JOB_TARGET_STATE_QUEUED, S.JOB_TARGET_STATE_RUNNING]
    return order.index(state) if state in order else len(order)


async def test_output_and_a_partial_cancel_show_while_the_job_runs(env: Any, pki: Any) -> None:
    """A running target's stored output and a cancelled pending target are news within
    `_SOON`; cancelling the rest ends the job and the stream."""
    manager, stub, start = env
    await start("h-1", hold=True, output=b"x" * 1000)
    await start("h-2")
    reply = await stub.RunJob(
        fleet_pb2.FleetServiceRunJobRequest(
            spec=command("sleep", "1000", node_ids=["h-1", "h-2"], max_concurrency="1")
        )
    )
    job_id = reply.job.id
    watch = Replay(stub, job_id)
    await watch.next()
    await watch.until(lambda w: w.targets["h-1"].output_stored_bytes == 1000, _SOON + 1)
    assert watch.targets["h-1"].state == S.JOB_TARGET_STATE_RUNNING
    assert not watch.job.ended_at
    async with node_stub(pki, "h-1", manager.port) as node:  # more output, nothing else
        await node.UploadJobOutput(
            manager_pb2.UploadJobOutputRequest(
                node_id="h-1", job_id=job_id, offset=1000, data=b"y" * 500
            )
        )
    await watch.until(lambda w: w.targets["h-1"].output_stored_bytes == 1500, _SOON)
    await stub.CancelJob(fleet_pb2.FleetServiceCancelJobRequest(job_id=job_id, node_ids=["h-2"]))
    await watch.until(lambda w: w.targets["h-2"].state == S.JOB_TARGET_STATE_CANCELLED, _SOON)
    assert not watch.job.ended_at
    await stub.CancelJob(fleet_pb2.FleetServiceCancelJobRequest(job_id=job_id))
    await watch.until(lambda w: w.job.ended_at, 10)
    assert watch.job.state == S.JOB_STATE_CANCELLED
    assert watch.targets["h-1"].state == S.JOB_TARGET_STATE_CANCELLED
    async with asyncio.timeout(5):
        assert await watch.stream.read() is aio.EOF


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_watch_starts_from_the_rows_this_manager_stored_not_a_read(env: Any) -> None:
    """On SQLite a watch's first message takes the job's targets from what RunJob stored
    and the commits since, not from reading them back: a row changed behind the manager's
    back (here by a raw write) does not show; once a partial cancel made the manager
    forget them, a new watch reads the database and shows it."""
    manager, stub, start = env
    await start("k-1", hold=True)
    await start("k-2", hold=True)
    reply = await stub.RunJob(
        fleet_pb2.FleetServiceRunJobRequest(
            spec=command("sleep", "1000", node_ids=["k-1", "k-2"], max_concurrency="2")
        )
    )
    job_id = reply.job.id
    first = Replay(stub, job_id)
    await first.until(
        lambda w: all(
            w.targets.get(n, S.JobTarget()).state == S.JOB_TARGET_STATE_RUNNING
            for n in ("k-1", "k-2")
        ),
        10,
    )

    def tamper(db: Any) -> None:
        db.execute("UPDATE job_targets SET reason = 'written behind' WHERE job_id = ?", (job_id,))

    await manager.db.run_sqlite(tamper)
    again = Replay(stub, job_id)
    msg = await again.next()
    assert {t.node_id: (t.state, t.reason) for t in msg.job.targets} == {
        n: (first.targets[n].state, first.targets[n].reason) for n in ("k-1", "k-2")
    }
    assert all(t.reason != "written behind" for t in msg.job.targets)
    await stub.CancelJob(fleet_pb2.FleetServiceCancelJobRequest(job_id=job_id, node_ids=["k-2"]))
    read = Replay(stub, job_id)
    msg = await read.next()
    assert {t.node_id: t.reason for t in msg.job.targets}["k-1"] == "written behind"
    await stub.CancelJob(fleet_pb2.FleetServiceCancelJobRequest(job_id=job_id))
    for w in (first, again, read):
        await w.until(lambda w: w.job.ended_at, 10)
