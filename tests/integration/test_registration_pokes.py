"""Which registrations wake convergence and the job driver (issue 15, part 4).

A registration pokes both only when it changed what they read: a new node, one back
from offline, one this replica had not seen, changed labels, address or
jobs_disabled. A node reconnecting as it was (every node, after a manager restart)
pokes neither: each poke was a full pass over the fleet. The real manager on SQLite
and PostgreSQL, simulated daemons (`bench.sim`) over mTLS; the periodic safety passes
are pushed out of the test's reach, so what happens is what the pokes did.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fleet_harness import FAST_POOL, operator_stub
from manager_harness import manager_config
from test_desired_state import definition, until

from bench.sim import SimFleet
from fleet.v1 import fleet_pb2, jobs_pb2
from manager.server import ManagerServer
from manager.storage.jobs import JobRepository

NEVER = 3600.0
"""A safety interval no test waits for."""


@asynccontextmanager
async def manager_and_sims(
    pki: Any, tmp_path: Path, database_url: str, count: int
) -> AsyncIterator[tuple[ManagerServer, SimFleet]]:
    config = dataclasses.replace(
        manager_config(pki, database_url, tmp_path / "state"), pool=FAST_POOL
    )
    manager = ManagerServer(config, clock=time.time)
    await manager.start()
    # Only pokes run passes from here (the first pass of each is due at once anyway).
    manager.convergence._safety = NEVER
    manager.job_driver._safety = NEVER
    sims = await SimFleet.start(
        pki.ca, tmp_path / "sims", count=count, labels={"env": "prod"}, agents=()
    )
    try:
        await sims.register_all(f"127.0.0.1:{manager.port}")
        await until(lambda: manager.convergence.leading and manager.job_driver.leading, bool)
        yield manager, sims
    finally:
        await sims.close()
        await manager.stop(1.0)


async def _quiet(manager: ManagerServer) -> int:
    """Convergence's pass count once no pass ran for a second."""
    conv = manager.convergence
    while True:
        before = conv.passes
        await asyncio.sleep(1.0)
        if conv.passes == before:
            return before


async def test_a_node_back_from_offline_gets_its_set_and_job_at_once(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """Offline, a node is skipped by convergence and its job target waits; its
    registration (otherwise as before) sends both at once, not at a safety pass.

    No rollout is live (with replicas one has convergence re-read every second), and
    the job driver re-reads the nodes only when told they changed."""
    async with manager_and_sims(pki, tmp_path, database_url, 2) as (manager, sims):
        manager.job_driver._node_refresh = NEVER
        back, stays = sims.nodes[1], sims.nodes[0]
        async with operator_stub(pki, manager.port) as stub:

            async def label(node_id: str) -> None:
                await stub.UpdateNodeLabels(
                    fleet_pb2.FleetServiceUpdateNodeLabelsRequest(
                        node_id=node_id, set={"tier": "web"}
                    )
                )

            await label(stays.node_id)
            await stub.ApplyDefinitions(
                fleet_pb2.FleetServiceApplyDefinitionsRequest(
                    definitions=[definition(sel="tier=web")]
                )
            )
            await until(lambda: stays.servicer.pushed.get("web"), lambda s: s is not None)
            await until(
                lambda: stub.GetRollout(fleet_pb2.FleetServiceGetRolloutRequest(name="web")),
                lambda r: r.rollout.ended_at > 0,
            )

            now_ms = int(time.time() * 1000)
            await manager.nodes.mark_offline(
                cutoff_ms=now_ms + 1, now_ms=now_ms, only=[back.node_id]
            )
            manager._nodes_went_offline(1)  # as the sweeper does
            await label(back.node_id)  # in scope now, but offline: not pushed
            reply = await stub.RunJob(
                fleet_pb2.FleetServiceRunJobRequest(
                    spec=jobs_pb2.JobSpec(
                        steps=[jobs_pb2.JobStep(command=jobs_pb2.JobCommand(argv=["true"]))],
                        node_ids=[back.node_id],
                    )
                )
            )
        job_id = reply.job.id
        repo = JobRepository(manager.db)

        async def target() -> tuple[str, int]:
            _, targets = await repo.job_with_targets(job_id)
            return targets[back.node_id].state, targets[back.node_id].attempts

        await asyncio.sleep(1.0)  # the passes for the label and the job: it is offline
        assert await target() == ("PENDING", 0)
        assert back.servicer.pushed.get("web") is None

        assert back.servicer.link is not None
        await back.servicer.link.register()  # the same fields as before it went offline
        await until(lambda: back.servicer.pushed.get("web"), lambda s: s is not None, 5.0)
        await until(target, lambda t: t[0] == "SUCCESS", 5.0)


async def test_a_reconnect_as_it_was_runs_no_pass(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """Re-registering unchanged (a reconnect) starts no convergence pass; a changed
    label, and a node registered by another replica since this one started, do."""
    async with manager_and_sims(pki, tmp_path, database_url, 2) as (manager, sims):
        conv = manager.convergence
        node = sims.nodes[0]
        assert node.servicer.link is not None
        before = await _quiet(manager)
        for _ in range(5):
            await node.servicer.link.register()
        await asyncio.sleep(1.0)  # far past the debounce: a poked pass would have run
        assert conv.passes == before

        node.servicer.labels["zone"] = "b"
        await node.servicer.link.register()
        await until(lambda: conv.passes, lambda n: n > before, 5.0)

        # Not in this replica's view (as if another replica registered it since): a pass.
        other = sims.nodes[1]
        assert other.servicer.link is not None
        manager.registry.forget(other.node_id)
        before = await _quiet(manager)
        await other.servicer.link.register()
        await until(lambda: conv.passes, lambda n: n > before, 5.0)
