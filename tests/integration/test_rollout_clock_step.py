"""A rollout across a step of the manager's wall clock, with a real manager and `bench.sim`
daemons over mTLS: its deadlines count the time that passed, not the step."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

from fleet_harness import FAST_POOL, operator_stub, selector
from manager_harness import manager_config

from bench.sim import SimFleet
from fleet.v1 import common_pb2, desired_pb2, fleet_pb2
from manager.server import ManagerServer


def definition(version: str) -> desired_pb2.Definition:
    return desired_pb2.Definition(
        name="web",
        selector=selector("env=prod"),
        agent=common_pb2.AgentSpec(argv=["/usr/bin/web"], version=version),
        update=desired_pb2.UpdatePolicy(
            min_healthy_time_seconds=0.0,
            healthy_deadline_seconds=60.0,
            progress_deadline_seconds=120.0,
        ),
    )


async def test_a_forward_step_does_not_fail_a_batch_whose_node_is_not_healthy_yet(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """+1 h on the manager's clock while a node of the batch has not reported the new
    revision yet: the rollout goes on (it was FAILED at once, "not healthy within 1m")."""
    offset = [0.0]
    config = dataclasses.replace(
        manager_config(pki, database_url, tmp_path / "state"), pool=FAST_POOL
    )
    manager = ManagerServer(config, clock=lambda: time.time() + offset[0], monotonic=time.monotonic)
    await manager.start()
    fleet = await SimFleet.start(pki.ca, tmp_path / "sims")
    try:
        async with operator_stub(pki, manager.port) as stub:

            async def rollout() -> desired_pb2.Rollout:
                reply = await stub.GetRollout(fleet_pb2.FleetServiceGetRolloutRequest(name="web"))
                return reply.rollout

            async def until(ok: Any) -> desired_pb2.Rollout:
                async with asyncio.timeout(20):
                    while not ok(r := await rollout()):  # noqa: ASYNC110  # polls the manager
                        await asyncio.sleep(0.05)
                return r

            node = await fleet.add("p0", labels={"env": "prod"}, agents=())
            await node.register(f"127.0.0.1:{manager.port}", pki.trust_domain)
            apply = fleet_pb2.FleetServiceApplyDefinitionsRequest
            await stub.ApplyDefinitions(apply(definitions=[definition("1.0")]))
            await until(lambda r: r.state == desired_pb2.ROLLOUT_STATE_SUCCESSFUL)
            # An older daemon, slow to report: revision 2 runs, the manager does not know yet.
            sim = node.servicer
            sim.answer_states, sim.report_delay = False, 600.0
            await stub.ApplyDefinitions(apply(definitions=[definition("2.0")]))
            await until(
                lambda r: r.target_revision == 2 and r.state == desired_pb2.ROLLOUT_STATE_RUNNING
            )
            async with asyncio.timeout(20):
                while "web" not in sim.pushed or sim.pushed["web"].revision != 2:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            offset[0] = 3600.0
            await manager.convergence.run_once()
            r = await rollout()
            assert r.state == desired_pb2.ROLLOUT_STATE_RUNNING, r.reason
    finally:
        await fleet.close()
        await manager.stop(1.0)
