"""Jobs across a step of the manager's wall clock: the lost-node rule counts time passed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fleet_harness import operator_stub
from job_helpers import command, job_daemons
from manager_harness import FakeClock, manager_config, running_manager

from fleet.v1 import fleet_pb2, jobs_pb2
from manager.server import ManagerServer

S = jobs_pb2


async def target(stub: Any, job_id: str) -> jobs_pb2.JobTarget:
    reply = await stub.GetJob(fleet_pb2.FleetServiceGetJobRequest(job_id=job_id))
    (only,) = reply.job.targets
    return only  # type: ignore[no-any-return]


async def until(stub: Any, job_id: str, ok: Any) -> jobs_pb2.JobTarget:
    """The job's target once `ok(its state)` (polls the manager: no event to wait on)."""
    async with asyncio.timeout(10):
        while not ok((t := await target(stub, job_id)).state):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return t


async def a_pass(manager: ManagerServer, stub: Any, job_id: str) -> None:
    """Wait until the job driver made a whole pass that began after this call (poke it,
    and again once that pass began: the next one starts only after it ended), or the
    target is not RUNNING any more."""
    driver = manager.job_driver
    before = driver.passes
    for n in (1, 2):
        driver.poke()
        async with asyncio.timeout(10):
            while driver.passes < before + n:
                if (await target(stub, job_id)).state != S.JOB_TARGET_STATE_RUNNING:
                    return
                await asyncio.sleep(0.01)


async def test_a_forward_step_of_the_wall_clock_does_not_fail_a_running_target(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """+1 h on the manager's clock: a target RUNNING under a 60 s timeout is not "lost"
    (FAILED while its node still runs it); 60 s + the 120 s grace of time later it is."""
    clock = FakeClock()
    config = manager_config(pki, database_url, tmp_path / "state")
    async with (
        running_manager(config, clock, monotonic=clock.monotonic) as manager,
        operator_stub(pki, manager.port) as stub,
        job_daemons(pki, manager.port) as start,
    ):
        await start("r-1", hold=True)
        reply = await stub.RunJob(
            fleet_pb2.FleetServiceRunJobRequest(
                spec=command("sleep", "1000", node_ids=["r-1"], timeout_seconds=60)
            )
        )
        job_id = reply.job.id
        await until(stub, job_id, lambda state: state == S.JOB_TARGET_STATE_RUNNING)
        clock.step(3600)
        await a_pass(manager, stub, job_id)
        still = await target(stub, job_id)
        assert still.state == S.JOB_TARGET_STATE_RUNNING, still.reason
        clock.advance(181)
        manager.job_driver.poke()
        lost = await until(stub, job_id, lambda state: state != S.JOB_TARGET_STATE_RUNNING)
        assert lost.state == S.JOB_TARGET_STATE_FAILED
        assert "past the timeout of 60s plus 120s" in lost.reason
