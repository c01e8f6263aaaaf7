"""A rollout's healthy_deadline counts from delivery: real manager, real daemons (`bench.sim`
over mTLS), on SQLite and on PostgreSQL.

The node whose push cannot reach it stays online: its daemon's port is closed (nothing
listens there), and the manager's liveness sweep is off in tests (`manager_config`), as
a node whose control stream was just cut stays online until keepalive, timeout and
grace have passed (40 to 70 s by default).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from test_desired_state import definition, desired_env, state, until

from fleet.v1 import common_pb2, desired_pb2, fleet_pb2


async def test_an_undelivered_node_is_not_failed_at_its_healthy_deadline(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """The push to p0 fails while p0 is online: past healthy_deadline the node is still
    UPDATING and the rollout RUNNING, saying p0 is not delivered and why; it fails at
    progress_deadline with that reason (not at 1 s with "not healthy within 1s: it still
    runs revision 1")."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await env.add("p0", {"env": "prod"})
        await env.apply(definition())
        await until(lambda: env.rollout("web"), lambda r: state(r) == "SUCCESSFUL")
        await env.fleet["p0"].stop()  # nothing listens at its address now; p0 stays online
        started = time.monotonic()
        await env.apply(
            definition(
                version="2.0",
                healthy_deadline_seconds=1.0,
                progress_deadline_seconds=4.0,
            )
        )
        waiting = await until(
            lambda: env.rollout("web"), lambda r: "not delivered" in r.reason, within=3.5
        )
        assert state(waiting) == "RUNNING"
        # The pool's words for the closed port, once.
        assert waiting.reason.startswith("p0: not delivered yet: daemon at ")
        assert "refused the connection" in waiting.reason
        # Past the node's healthy deadline (1 s) it still waits.
        await until(lambda: time.monotonic(), lambda t: t >= started + 2.0)
        held = await env.rollout("web")
        assert (state(held), held.reason) == ("RUNNING", waiting.reason)
        assert [(n.node_id, n.phase) for n in held.nodes] == [
            ("p0", desired_pb2.ROLLOUT_NODE_PHASE_UPDATING)
        ]
        failed = await until(lambda: env.rollout("web"), lambda r: r.ended_at > 0, within=6.0)
        assert time.monotonic() - started >= 4.0 - 0.5  # at progress_deadline, not before
        assert (state(failed), failed.target_revision) == ("FAILED", 2)
        assert failed.reason == (
            f"no progress for 4s (progress_deadline); still waiting on p0; {waiting.reason}"
        )
        assert [(n.node_id, n.phase) for n in failed.nodes] == [
            ("p0", desired_pb2.ROLLOUT_NODE_PHASE_UPDATING)
        ]
        nodes = await env.stub.ListNodes(fleet_pb2.FleetServiceListNodesRequest())
        assert [(n.node_id, n.status) for n in nodes.nodes] == [
            ("p0", common_pb2.NODE_STATUS_ONLINE)
        ]
