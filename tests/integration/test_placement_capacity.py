"""Placement by count with real host metrics: where `count = 1` lands, and what requests reserve.

Simulated daemons (bench.sim) register with a real manager over mTLS and
report host metrics through ManagerService.ReportMetrics as a daemon does
(daemon/convert.py names: cpu usage_percent and cores, memory total_bytes and
used_bytes); the manager's HostCapacity reads them back from metric_samples.
On SQLite and on PostgreSQL.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from manager_harness import node_stub
from test_desired_state import definition, desired_env, state, until

from fleet.v1 import common_pb2, desired_pb2, fleet_pb2, manager_pb2

GIB = 1 << 30

HOSTS = {
    # node: (cores, cpu %, memory total, memory used)
    "busy": (4, 80.0, 16 * GIB, 4 * GIB),  # least free CPU: 0.2 of it
    "roomy": (8, 10.0, 32 * GIB, 8 * GIB),  # most room: 0.75 (memory is the scarcer)
    "small": (2, 0.0, 4 * GIB, 2 * GIB),  # 0.5 (memory)
}


async def report_host(pki: Any, port: int, node: str, sequence: int = 1) -> None:
    """One host sample batch as the daemon sends it."""
    cores, cpu, total, used = HOSTS[node]
    now = int(time.time() * 1000)
    async with node_stub(pki, node, port) as stub:
        await stub.ReportMetrics(
            manager_pb2.ReportMetricsRequest(
                node_id=node,
                sequence=sequence,
                metrics=[
                    common_pb2.MetricData(
                        type="cpu", timestamp=now, values={"usage_percent": cpu, "cores": cores}
                    ),
                    common_pb2.MetricData(
                        type="memory",
                        timestamp=now,
                        values={"total_bytes": float(total), "used_bytes": float(used)},
                    ),
                ],
            )
        )


async def landed(env: Any, name: str, where: dict[str, int]) -> None:
    """The rollout of `name` succeeded and its daemons run exactly `where`."""
    await until(lambda: env.rollout(name), lambda r: state(r) == "SUCCESSFUL")
    assert env.revisions(name) == where


def counted(name: str, cpu_millicores: int = 0, **update: Any) -> desired_pb2.Definition:
    d = definition(name, **update)
    d.placement.count = 1
    d.agent.resources.cpu_millicores = cpu_millicores
    return d


async def test_count_one_lands_on_the_node_with_most_room_and_requests_reserve_it(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """count=1 goes to `roomy`; once a 6-core request holds it, the next goes to `small`."""
    async with desired_env(pki, tmp_path, database_url) as env:
        for node in HOSTS:
            await env.add(node, {"env": "prod"})
            await report_host(pki, env.manager.port, node)

        await env.apply(counted("one"))
        await landed(env, "one", {"roomy": 1})

        # 6000m on roomy (8 cores, 0.8 used): 2000m left, 0.25 of it, below small's 0.5.
        await env.apply(counted("big", cpu_millicores=6000))
        await landed(env, "big", {"roomy": 1})
        await env.apply(counted("next", cpu_millicores=500))
        await landed(env, "next", {"small": 1})

        # Nothing else has room for another 6000m: the status says why.
        await env.apply(counted("huge", cpu_millicores=6000))
        reply = await env.stub.GetDefinition(
            fleet_pb2.FleetServiceGetDefinitionRequest(name="huge")
        )
        assert reply.status.unplaced == 1, reply
        assert "lack room for 6000m CPU" in reply.status.unplaced_reason, reply
        assert env.revisions("huge") == {}


async def test_nodes_without_recent_host_metrics_are_used_last(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """A node that never reported is chosen only when no measured node is online."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await env.add("unmeasured", {"env": "prod"})
        await env.add("busy", {"env": "prod"})
        await report_host(pki, env.manager.port, "busy")
        await env.apply(counted("one"))
        await landed(env, "one", {"busy": 1})


async def test_a_count_without_room_waits_for_it_then_succeeds_where_it_appears(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """No node has room for the instance: the rollout stays RUNNING saying why (never
    SUCCESSFUL on no node); a node with room registers, gets it, and the rollout succeeds."""
    async with desired_env(pki, tmp_path, database_url) as env:
        for node in ("busy", "small"):
            await env.add(node, {"env": "prod"})
            await report_host(pki, env.manager.port, node)
        await env.apply(counted("big", cpu_millicores=6000))
        waiting = await until(
            lambda: env.rollout("big"), lambda r: r.reason.startswith("waiting for room")
        )
        assert state(waiting) == "RUNNING", waiting
        assert "1 of 1 instance(s) not placed" in waiting.reason, waiting
        assert "lack room for 6000m CPU" in waiting.reason, waiting

        await env.add("roomy", {"env": "prod"})
        await report_host(pki, env.manager.port, "roomy")
        await landed(env, "big", {"roomy": 1})
        assert (await env.rollout("big")).reason == ""


async def test_a_count_that_never_finds_room_fails_at_its_progress_deadline(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """The rollout fails loudly, naming what placement said."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await env.add("small", {"env": "prod"})
        await report_host(pki, env.manager.port, "small")
        await env.apply(
            counted(
                "big",
                cpu_millicores=6000,
                healthy_deadline_seconds=1.0,
                progress_deadline_seconds=2.0,
            )
        )
        ended = await env.ended("big")
        assert state(ended) == "FAILED", ended
        assert ended.reason.startswith(
            "not every instance of revision 1 was placed within 2s (progress_deadline):"
            " 1 of 1 instance(s) not placed"
        ), ended.reason
        assert env.revisions("big") == {}
