"""Starting a job hands the job driver the nodes it read: the first targets go out
without the driver reading the nodes again, unless a change came after that read.

The real manager on SQLite and simulated daemons (`bench.sim`) over mTLS. Which read
the driver used is seen from where it sent the target: the handed read gives the node
an address where nothing listens, so a target sent by it is unreachable there.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from fleet_harness import operator_stub
from google.protobuf import json_format
from manager_harness import manager_config, running_manager

from bench.sim import SimFleet
from fleet.v1 import fleet_pb2, jobs_pb2
from manager.server import ManagerServer
from manager.service.job_control import new_job_id
from manager.service.job_driver import NodesRead
from manager.storage import NodeReach
from manager.storage.jobs import JobRecord, JobRepository, JobTargetRecord, JobTx

NOWHERE = "127.0.0.1:1"
"""An address nothing listens on."""


async def _store_job(manager: ManagerServer, node_id: str) -> tuple[JobRecord, JobTargetRecord]:
    """A one-target job `true`, stored as RunJob stores it (not yet driven)."""
    spec = jobs_pb2.JobSpec(
        steps=[jobs_pb2.JobStep(command=jobs_pb2.JobCommand(argv=["true"]))], node_ids=[node_id]
    )
    now = time.time()
    record = JobRecord(
        id=new_job_id(now),
        name="",
        spec=json_format.MessageToJson(spec, indent=None, sort_keys=True),
        actor="operator/test",
        created_ms=int(now * 1000),
    )
    target = JobTargetRecord(record.id, node_id, idx=0, updated_ms=int(now * 1000))

    async def body(tx: JobTx) -> None:
        await tx.add_job(record, [target])

    await JobRepository(manager.db).run(body)
    return record, target


async def _target(manager: ManagerServer, job_id: str, node_id: str) -> JobTargetRecord:
    """The target once the driver sent it (ended, or back to PENDING unreachable)."""
    repo = JobRepository(manager.db)
    async with asyncio.timeout(20):
        while True:
            _, targets = await repo.job_with_targets(job_id)
            t = targets[node_id]
            if t.state == "SUCCESS" or t.attempts:
                return t
            await asyncio.sleep(0.05)


async def test_the_driver_sends_by_the_nodes_the_job_read(pki: Any, tmp_path: Path) -> None:
    config = manager_config(pki, f"sqlite+aiosqlite:///{tmp_path / 'manager.db'}", tmp_path / "st")
    async with running_manager(config, clock=time.time) as manager:
        sims = await SimFleet.start(pki.ca, tmp_path / "sims", count=1, answer_wait=2.0)
        try:
            await sims.register_all(f"127.0.0.1:{manager.port}")
            node = sims.nodes[0].node_id
            driver = manager.job_driver
            async with asyncio.timeout(20):
                while not driver.leading:  # noqa: ASYNC110  # no event for it
                    await asyncio.sleep(0.02)

            # A read newer than the driver's and than any change: it is used as is.
            record, target = await _store_job(manager, node)
            read = NodesRead(
                [NodeReach(node, NOWHERE, "online", int(time.time() * 1000), False)],
                time.monotonic(),
            )
            driver.adopt(record, [target], read)
            sent = await _target(manager, record.id, node)
            assert sent.state == "PENDING"
            assert NOWHERE in sent.last_error, sent

            # A change told after the read began: the driver reads the nodes itself.
            record, target = await _store_job(manager, node)
            read = NodesRead(
                [NodeReach(node, NOWHERE, "online", int(time.time() * 1000), False)],
                time.monotonic(),
            )
            driver.nodes_changed()
            driver.adopt(record, [target], read)
            sent = await _target(manager, record.id, node)
            assert sent.state == "SUCCESS", sent
        finally:
            await sims.close()


async def test_run_job_reaches_its_nodes(pki: Any, tmp_path: Path) -> None:
    """Through RunJob: the targets go where the nodes registered (the handed read)."""
    config = manager_config(pki, f"sqlite+aiosqlite:///{tmp_path / 'manager.db'}", tmp_path / "st")
    async with (
        running_manager(config, clock=time.time) as manager,
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
            for n in sims.nodes:
                t = await _target(manager, reply.job.id, n.node_id)
                assert t.state == "SUCCESS", t
                assert n.servicer.jobs[reply.job.id].starts == 1
        finally:
            await sims.close()
