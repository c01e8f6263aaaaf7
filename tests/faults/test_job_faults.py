"""Jobs under crashes: daemon kill -9, manager kill -9 during an upload, a replica failover.

Real `fleet-manager` processes (SQLite, or two replicas on PostgreSQL) and
real `fleet-daemon` processes whose jobs are real process groups. What the
operator reads back through FleetService decides:

- the daemon killed with SIGKILL while a job prints a numbered line every
  50 ms and started again: the job's process lived on (the same pid before
  and after, re-adopted), the stored output has every number exactly once
  and in order, and the target's result was recorded once (one
  job-target-finished event);
- the manager killed with SIGKILL while a job's output is being uploaded
  and started again on the same database: the stored output is byte for
  byte what the job wrote (no chunk lost, none stored twice);
- the manager killed with SIGKILL while its StartJob waits for a fast job's
  end (the end on the answer): the end and output are stored once after
  the restart, and the command ran once;
- two replicas on PostgreSQL, the one driving jobs killed while
  the job runs on three nodes one at a time: the other finishes the job,
  and every target ran exactly once (each run appends a line to a file the
  test reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from faultkit import DaemonProc, ManagerProc, eventually, kill_marked, marked, operator_stub
from grpc import aio

from fleet.tls import TLSConfig
from fleet.v1 import common_pb2, fleet_pb2, fleet_pb2_grpc, jobs_pb2

# Lax enough that a daemon down for a second or two is never marked offline.
LIVENESS = (
    "min_ttl_seconds = 2.0\njitter = 0.1\ngrace_seconds = 5.0\n"
    "failover_grace_seconds = 15.0\nsweep_interval_seconds = 0.2\n"
)
ENDED = {
    jobs_pb2.JOB_STATE_SUCCESS,
    jobs_pb2.JOB_STATE_FAILED,
    jobs_pb2.JOB_STATE_PARTIAL,
    jobs_pb2.JOB_STATE_CANCELLED,
}
SUCCESS = jobs_pb2.JOB_TARGET_STATE_SUCCESS
RUNNING = jobs_pb2.JOB_TARGET_STATE_RUNNING


def _daemon(
    root: Path, tls: TLSConfig, addresses: list[str], labels: dict[str, str], jobs: str = ""
) -> DaemonProc:
    """A daemon whose config adds `jobs` (TOML lines) to its [jobs] table."""
    root.mkdir(parents=True)
    quoted = ", ".join(f'"{a}"' for a in addresses)
    label_lines = "".join(f'{k} = "{v}"\n' for k, v in labels.items())
    body = (
        f"[manager]\naddresses = [{quoted}]\nrpc_timeout_seconds = 3.0\n"
        "metrics_interval_seconds = 2.0\nreconnect = { initial = 0.2, maximum = 1.0 }\n"
        f"[jobs]\nmax_concurrent = 4\ngrace_seconds = 1.0\n{jobs}"
        f"[labels]\n{label_lines}"
    )
    return DaemonProc(root, tls, body=body)


@dataclasses.dataclass
class _OneNode:
    """A manager on SQLite, daemon n1 online on it, and operator alice."""

    manager: ManagerProc
    daemon: DaemonProc
    operator: TLSConfig
    domain: str

    def stub(self) -> contextlib.AbstractAsyncContextManager[fleet_pb2_grpc.FleetServiceStub]:
        """A FleetService client of the manager (open a new one after a restart)."""
        return operator_stub(self.operator, self.manager, self.domain)


@contextlib.asynccontextmanager
async def _one_node(
    pki: Any, tmp_path: Path, marker: str, labels: dict[str, str], jobs: str = ""
) -> AsyncIterator[_OneNode]:
    """Start both, wait until n1 is online; at the end stop both and the marked jobs."""
    manager = ManagerProc(
        tmp_path / "m", pki.issue("manager", "m1", ips=("127.0.0.1",)), liveness=LIVENESS
    )
    daemon = _daemon(tmp_path / "d", pki.issue("node", "n1"), [manager.address], labels, jobs)
    env = _OneNode(manager, daemon, pki.issue("operator", "alice"), pki.trust_domain)
    manager.start()
    try:
        await manager.wait_serving()
        await daemon.wait_ready(daemon.start())
        async with env.stub() as stub:
            await eventually(lambda: _online(stub), lambda up: up == {"n1"}, within=30)
        yield env
    finally:
        daemon.stop()
        kill_marked(marker)
        manager.stop()


async def _online(stub: fleet_pb2_grpc.FleetServiceStub) -> set[str]:
    try:
        reply = await stub.ListNodes(fleet_pb2.FleetServiceListNodesRequest(), timeout=5)
    except aio.AioRpcError:
        return set()
    return {n.node_id for n in reply.nodes if n.status == common_pb2.NODE_STATUS_ONLINE}


def _leader(m: ManagerProc) -> float:
    """fleet_jobs_leader of that replica (-1: not answering)."""
    try:
        return m.scrape().get("fleet_jobs_leader", -1.0)
    except OSError:
        return -1.0


async def _run(stub: fleet_pb2_grpc.FleetServiceStub, argv: list[str], **spec: Any) -> str:
    js = jobs_pb2.JobSpec(steps=[jobs_pb2.JobStep(command=jobs_pb2.JobCommand(argv=argv))], **spec)
    reply = await stub.RunJob(fleet_pb2.FleetServiceRunJobRequest(spec=js), timeout=30)
    return reply.job.id


async def _job(stub: fleet_pb2_grpc.FleetServiceStub, job_id: str) -> jobs_pb2.Job | None:
    try:
        reply = await stub.GetJob(fleet_pb2.FleetServiceGetJobRequest(job_id=job_id), timeout=5)
    except aio.AioRpcError:
        return None  # the manager is restarting
    return reply.job


async def _ended(
    stub: fleet_pb2_grpc.FleetServiceStub, job_id: str, within: float = 60
) -> jobs_pb2.Job:
    job = await eventually(
        lambda: _job(stub, job_id),
        lambda j: j is not None and j.ended_at > 0 and j.state in ENDED,
        within=within,
        every=0.2,
    )
    assert job is not None
    return job


async def _output(stub: fleet_pb2_grpc.FleetServiceStub, job_id: str, node_id: str) -> bytes:
    request = fleet_pb2.FleetServiceReadJobOutputRequest(job_id=job_id, node_id=node_id)
    return b"".join([m.data async for m in stub.ReadJobOutput(request, timeout=30)])


async def _finished_events(
    stub: fleet_pb2_grpc.FleetServiceStub, job_id: str
) -> list[fleet_pb2.Event]:
    """The stored job-target-finished events of this job."""
    request = fleet_pb2.FleetServiceWatchEventsRequest(
        kinds=[fleet_pb2.EVENT_KIND_JOB_TARGET_FINISHED]
    )
    return [
        m.event
        async for m in stub.WatchEvents(request, timeout=30)
        if job_id in m.event.attributes.values() or job_id in m.event.message
    ]


async def test_daemon_killed_during_a_job_readopts_it_and_loses_no_output(
    pki: Any, tmp_path: Path
) -> None:
    """kill -9 of the daemon while its job prints `line <i>` every 50 ms, started again a
    second later: the same process finishes, every line stored once in order, one result."""
    marker = f"job-readopt-{time.time_ns()}"
    lines = 100  # 5 s: still running when the daemon is back, unless the machine is loaded
    script = f'i=0; while [ $i -lt {lines} ]; do echo "line $i"; i=$((i+1)); sleep 0.05; done'
    async with _one_node(pki, tmp_path, marker, {"f": "d"}) as env, env.stub() as stub:
        job_id = await _run(stub, ["/bin/sh", "-c", script, marker], node_ids=["n1"])
        await eventually(
            lambda: _output(stub, job_id, "n1"), lambda out: b"line 5\n" in out, within=30
        )
        before = marked(marker)
        assert len(before) == 1, before
        t_kill = time.time()
        env.daemon.kill9()
        assert marked(marker) == before, "the job's process outlives its daemon"
        await asyncio.sleep(1.0)
        await env.daemon.wait_ready(env.daemon.start())
        down = time.time() - t_kill
        # Still running (re-adopted) or ended while the daemon was down (a loaded
        # machine): never a second process. The output below proves it ran once.
        assert set(marked(marker)) <= set(before), "re-adopted, not started again"
        job = await _ended(stub, job_id)
        (t,) = job.targets
        assert t.state == SUCCESS, t
        out = (await _output(stub, job_id, "n1")).decode()
        assert out.splitlines() == [f"line {i}" for i in range(lines)], out
        assert t.output_stored_bytes == t.output_bytes == len(out.encode())
        # Reports after the restart must not record the result again.
        await asyncio.sleep(2.0)
        events = await _finished_events(stub, job_id)
        assert len(events) == 1, events
        assert (await _job(stub, job_id)) == job
        assert not marked(marker)
        assert not env.manager.crashed()
    print(
        f"\ndaemon kill -9 during a job: down {down:.1f}s, process {before[0]} re-adopted, "
        f"{lines} lines stored once in order, one job-target-finished event"
    )


async def test_manager_killed_during_an_upload_loses_and_duplicates_no_chunk(
    pki: Any, tmp_path: Path
) -> None:
    """kill -9 of the manager while a job's output (~300 KiB over ~4 s) is uploaded, started
    again on the same database: the stored output is exactly what the job wrote."""
    marker = f"job-upload-{time.time_ns()}"
    batches, per_batch = 40, 60
    pad = "x" * 100
    script = (
        f"b=0; while [ $b -lt {batches} ]; do i=0; while [ $i -lt {per_batch} ]; do "
        f'echo "batch $b line $i {pad}"; i=$((i+1)); done; b=$((b+1)); sleep 0.1; done'
    )
    expected = "".join(
        f"batch {b} line {i} {pad}\n" for b in range(batches) for i in range(per_batch)
    ).encode()
    async with _one_node(pki, tmp_path, marker, {"f": "u"}) as env:
        async with env.stub() as stub:
            job_id = await _run(stub, ["/bin/sh", "-c", script, marker], node_ids=["n1"])

            async def stored() -> int:
                job = await _job(stub, job_id)
                return job.targets[0].output_stored_bytes if job and job.targets else 0

            # Mid-upload: some output stored, the job still writing.
            at_kill = await eventually(stored, lambda n: n > 20_000, within=30, every=0.05)
        assert marked(marker), "the job still runs at the kill"
        t_kill = time.time()
        env.manager.kill9()
        await asyncio.sleep(1.0)
        env.manager.start()
        await env.manager.wait_serving()
        down = time.time() - t_kill
        async with env.stub() as stub:
            job = await _ended(stub, job_id)
            (t,) = job.targets
            assert t.state == SUCCESS, t
            out = await _output(stub, job_id, "n1")
        assert len(out) == len(expected), (len(out), len(expected))
        assert out == expected
        assert (t.output_bytes, t.output_stored_bytes, t.output_truncated) == (
            len(expected),
            len(expected),
            False,
        )
        assert not env.manager.crashed()
    print(
        f"\nmanager kill -9 during an upload: {at_kill} of {len(expected)} bytes stored "
        f"at the kill, down {down:.1f}s; all {len(expected)} stored once, in order"
    )


async def test_manager_killed_while_an_answer_carrying_the_end_waits(
    pki: Any, tmp_path: Path
) -> None:
    """kill -9 of the manager while its StartJob waits for a job's end (the daemon's
    answer_wait_seconds = 3, the command takes 1 s), started again on the same database.
    The answer never left (its call died with the manager), so the end reaches the new
    manager by its StartJob asked again or by the daemon's report, whichever comes
    first: stored once (one job-target-finished), the output once, the command run once."""
    marker = f"job-answer-{time.time_ns()}"
    runs = tmp_path / "runs"
    wait = "answer_wait_seconds = 3.0\n"
    async with _one_node(pki, tmp_path, marker, {"f": "a"}, jobs=wait) as env:
        async with env.stub() as stub:
            script = f"echo ran >> {runs}; sleep 1; echo hi"
            job_id = await _run(stub, ["/bin/sh", "-c", script, marker], node_ids=["n1"])

            async def running() -> bool:
                return bool(marked(marker))

            await eventually(running, bool, within=10, every=0.02)
        env.manager.kill9()  # the StartJob is still waiting for the end
        await asyncio.sleep(1.5)
        env.manager.start()
        await env.manager.wait_serving()
        async with env.stub() as stub:
            job = await _ended(stub, job_id)
            (t,) = job.targets
            assert t.state == SUCCESS, t
            assert await _output(stub, job_id, "n1") == b"hi\n"
            assert len(await _finished_events(stub, job_id)) == 1
        assert runs.read_text() == "ran\n", "the command ran once"
        assert not env.manager.crashed()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_replica_failover_during_a_job_runs_no_target_twice(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """Two replicas on PostgreSQL; three daemons run a job one at a time (2 s each); the
    replica driving jobs (fleet_jobs_leader) is killed while the second target runs: the other
    finishes the job, every target SUCCESS, each ran exactly once."""
    marker = f"job-failover-{time.time_ns()}"
    runs = tmp_path / "runs"
    runs.touch()
    replicas = [
        ManagerProc(
            tmp_path / name,
            pki.issue("manager", name, ips=("127.0.0.1",)),
            database_url=database_url,
            liveness=LIVENESS,
        )
        for name in ("ma", "mb")
    ]
    operator = pki.issue("operator", "alice")
    # $PWD is the target's job directory: one per daemon and job.
    script = f'echo "$PWD" >> {runs}; echo start; sleep 2; echo end'
    nodes = ["n1", "n2", "n3"]
    daemons: list[DaemonProc] = []
    for m in replicas:
        m.start()
    try:
        for m in replicas:
            await m.wait_serving()
        await eventually(
            lambda: asyncio.to_thread(lambda: sorted(_leader(m) for m in replicas)),
            lambda v: v == [0.0, 1.0],
            within=30,
            every=0.2,
        )
        # The replica driving jobs dies; operators use the other one (any replica may).
        victim, survivor = sorted(replicas, key=_leader, reverse=True)
        for n in nodes:
            addresses = [victim.address, survivor.address]
            daemons.append(_daemon(tmp_path / n, pki.issue("node", n), addresses, {}))
        for d in daemons:
            await d.wait_ready(d.start())
        async with operator_stub(operator, survivor, pki.trust_domain) as stub:
            await eventually(lambda: _online(stub), lambda up: up == set(nodes), within=30)
            job_id = await _run(
                stub, ["/bin/sh", "-c", script, marker], node_ids=nodes, max_concurrency="1"
            )

            async def succeeded() -> int:
                job = await _job(stub, job_id)
                return sum(t.state == SUCCESS for t in job.targets) if job else 0

            await eventually(succeeded, lambda n: n >= 1, within=30, every=0.05)
            await eventually(
                lambda: asyncio.sleep(0, marked(marker)), lambda p: len(p) == 1, within=10
            )
            t_kill = time.time()
            victim.kill9()
            job = await _ended(stub, job_id, within=90)
            finished_in = time.time() - t_kill
            led = _leader(survivor)
            assert {t.node_id: t.state for t in job.targets} == dict.fromkeys(nodes, SUCCESS), job
            for n in nodes:
                out = (await _output(stub, job_id, n)).decode()
                assert out.splitlines() == ["start", "end"], (n, out)
        ran = runs.read_text().splitlines()
        assert len(ran) == len(set(ran)) == len(nodes), ran
        assert led == 1.0, "the survivor drives jobs now"
        assert survivor.alive
        assert not survivor.crashed()
        print(
            f"\nreplica failover during a job: the survivor finished it {finished_in:.1f}s "
            f"after the kill; {len(nodes)} targets, each ran once"
        )
    finally:
        for d in daemons:
            d.stop()
        kill_marked(marker)
        for m in replicas:
            m.stop()
