"""A real `fleet-daemon` whose host clock disagrees with the manager's (libfaketime).

The daemon runs with libfaketime preloaded at a fixed offset, as on a host
whose NTP is off; the manager runs on the real clock. A rollout of one agent with
min_healthy_time must wait that long on the skewed node, not count it
healthy at once (a node behind, which stamped its agent healthy "minutes
ago") nor hold it until its deadline (a node ahead, healthy "in ten
minutes"); and `fleetctl nodes show` must say how far the clock is off.

Behind by 4 minutes, not 10: certificates are issued valid from 5 minutes
before their issue (`fleet.pki`), so a host more behind than that refuses a
certificate issued just now as not yet valid (it cannot connect at all
until the certificate is older than its skew; see docs/nodes.md).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from faultkit import (
    FAKETIME,
    REPO,
    DaemonProc,
    ManagerProc,
    eventually,
    kill_marked,
    operator_stub,
    require_faketime,
)

from daemon.supervisor.spec import AgentSpec
from fleet.agentspec import HealthSpec, spec_to_proto
from fleet.v1 import common_pb2, desired_pb2, fleet_pb2, fleet_pb2_grpc

FLEETCTL = (sys.executable, "-c", "from fleetctl.app import main; main()")
MIN_HEALTHY = 8.0
LIVENESS = (
    "min_ttl_seconds = 2.0\njitter = 0.1\ngrace_seconds = 2.0\nsweep_interval_seconds = 0.2\n"
)


@pytest.fixture(autouse=True)
def _libfaketime() -> None:
    require_faketime("the daemon's clock cannot be skewed")


def _definition(name: str, marker: str, health: HealthSpec) -> desired_pb2.Definition:
    agent = AgentSpec(
        id=name,
        argv=("/bin/sh", "-c", "while true; do sleep 1; done", marker),
        version="1.0",
        start_secs=0.0,
        stop_timeout=2.0,
        health=health,
    )
    return desired_pb2.Definition(
        name=name,
        selector=common_pb2.LabelSelector(match_labels={"env": "prod"}),
        agent=spec_to_proto(agent),
        update=desired_pb2.UpdatePolicy(
            max_parallel="1",
            min_healthy_time_seconds=MIN_HEALTHY,
            healthy_deadline_seconds=40.0,
            progress_deadline_seconds=60.0,
        ),
    )


async def _state(stub: fleet_pb2_grpc.FleetServiceStub, name: str) -> str:
    reply = await stub.GetRollout(fleet_pb2.FleetServiceGetRolloutRequest(name=name), timeout=10)
    return desired_pb2.RolloutState.Name(reply.rollout.state).removeprefix("ROLLOUT_STATE_")


async def _clock_events(stub: fleet_pb2_grpc.FleetServiceStub) -> list[str]:
    request = fleet_pb2.FleetServiceWatchEventsRequest(
        kinds=[fleet_pb2.EVENT_KIND_NODE_CLOCK_SKEW], node_id="n1"
    )
    return [m.event.message async for m in stub.WatchEvents(request, timeout=10)]


@pytest.mark.parametrize("skew", [-240, 600], ids=["behind-4m", "ahead-10m"])
async def test_min_healthy_time_holds_on_a_skewed_node_and_nodes_show_says_so(
    pki: Any, tmp_path: Path, skew: int
) -> None:
    """A node whose clock is off by minutes: its agents (with and without a health check)
    count healthy only after min_healthy_time, and `fleetctl nodes show` shows the skew."""
    marker = f"skewmark-{secrets.token_hex(4)}"
    manager = ManagerProc(
        tmp_path / "m", pki.issue("manager", "m1", ips=("127.0.0.1",)), liveness=LIVENESS
    )
    operator = pki.issue("operator", "alice")
    (tmp_path / "n1").mkdir()
    daemon = DaemonProc(
        tmp_path / "n1",
        pki.issue("node", "n1"),
        manager=manager.address,
        body='[labels]\nenv = "prod"\n',
    )
    # A fixed offset moves the monotonic clock too, which changes no duration. (With
    # FAKETIME_DONT_FAKE_MONOTONIC, libfaketime 0.9.10 fails Python's time.sleep, EINVAL.)
    faketime = {"LD_PRELOAD": str(FAKETIME), "FAKETIME": f"{skew:+d}"}
    manager.start()
    try:
        await manager.wait_serving()
        await daemon.wait_ready(daemon.start(env=faketime))
        async with operator_stub(operator, manager, pki.trust_domain) as stub:
            await eventually(
                lambda: stub.ListNodes(fleet_pb2.FleetServiceListNodesRequest(), timeout=10),
                lambda r: [n.status for n in r.nodes] == [common_pb2.NODE_STATUS_ONLINE],
                within=60,
            )
            definitions = [
                _definition("plain", marker, HealthSpec()),
                _definition(
                    "probed", marker, HealthSpec(kind="command", command=("true",), interval=0.5)
                ),
            ]
            t0 = time.monotonic()
            await stub.ApplyDefinitions(
                fleet_pb2.FleetServiceApplyDefinitionsRequest(definitions=definitions),
                timeout=30,
            )
            took = {}
            for d in definitions:
                state = await eventually(
                    lambda name=d.name: _state(stub, name),
                    lambda s: s not in ("PENDING", "RUNNING"),
                    within=90,
                    every=0.2,
                )
                took[d.name] = time.monotonic() - t0
                assert state == "SUCCESSFUL", (d.name, state)
            node = (
                await stub.GetNode(fleet_pb2.FleetServiceGetNodeRequest(node_id="n1"), timeout=10)
            ).node
            events = await _clock_events(stub)
        done = await asyncio.to_thread(
            subprocess.run,
            [*FLEETCTL, "nodes", "show", "n1"],
            env={
                **os.environ,
                "PYTHONPATH": str(REPO),
                "FLEET_MANAGER": manager.address,
                "FLEET_CA": str(operator.ca_file),
                "FLEET_CERT": str(operator.cert_file),
                "FLEET_KEY": str(operator.key_file),
                "COLUMNS": "200",
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        shown = done.stdout
    finally:
        manager.stop()
        daemon.stop()
        kill_marked(marker)
    print(f"\nskew {skew:+d}s: rollouts took {took}; events {events}; nodes show:\n{shown}")
    print("daemon log:", "".join(daemon.log.read_text().splitlines(keepends=True)[-15:]))
    # Behind, the old manager counted both healthy at once (their times were minutes
    # old); ahead, it never did (a time in the future), and the rollout failed.
    for name, seconds in took.items():
        assert seconds >= MIN_HEALTHY, f"{name} counted healthy after {seconds:.1f}s"
    assert node.HasField("clock_offset_ms")
    assert abs(node.clock_offset_ms - skew * 1000) < 5000, node.clock_offset_ms
    where = "behind the manager" if skew < 0 else "ahead of the manager"
    clock_line = next(line for line in shown.splitlines() if line.startswith("Clock"))
    assert f"{abs(skew) // 60}m0s {where}" in clock_line, shown
    # Beyond max_clock_skew_seconds (300 s): one event says so, and what it refuses.
    if abs(skew) > 300:
        (event,) = events
        assert "beyond max_clock_skew_seconds" in event, event
        assert "the manager refuses them" in event, event  # its metric batches
    else:
        assert events == []
    assert not manager.crashed()
