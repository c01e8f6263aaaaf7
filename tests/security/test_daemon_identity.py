"""The manager checks which daemon it reached: a node cannot redirect operations to another's.

Node b registers the address of node a's daemon. An operator's operation on
node b must not reach node a's agents: the manager dials expecting
b.node.<td>, node a's daemon presents a.node.<td>, the handshake fails.
"""

from __future__ import annotations

import grpc
import pytest
from daemon_helpers import agent, short_tmp
from live_env import (
    SERVICES,
    SLEEP,
    ModulePki,
    channels,
    invoke,
    live_daemon,
    live_manager,
    manager_name,
    registration,
)

from fleet.v1 import common_pb2, fleet_pb2


@pytest.mark.asyncio(loop_scope="module")
async def test_operation_on_a_node_pointing_at_another_daemon_never_lands(
    module_pki: ModulePki,
) -> None:
    """Node b at node a's address: OperateAgent on b fails naming b, a's agent keeps its pid."""
    pki = module_pki
    register = SERVICES["ManagerService"].methods_by_name["RegisterNode"]
    operate = SERVICES["FleetService"].methods_by_name["OperateAgent"]
    with short_tmp() as root:
        async with (
            live_manager(pki, root) as manager,
            live_daemon(pki, root / "a", "a", [agent("web", SLEEP, "1000")]) as daemon_a,
            channels(
                manager.port,
                {"b": pki.issue("node", "b"), "operator": pki.issue("operator", "alice")},
                manager_name(pki),
            ) as chans,
        ):
            address_of_a = f"127.0.0.1:{daemon_a.port}"
            reply = await invoke(chans["b"], register, registration("b", address_of_a))
            assert reply.code == grpc.StatusCode.OK, reply
            pid = daemon_a.supervisor.get("web").pid

            request = fleet_pb2.FleetServiceOperateAgentRequest(
                node_id="b", agent_id="web", operation=common_pb2.AGENT_OPERATION_RESTART
            )
            outcome = await invoke(chans["operator"], operate, request)

            assert outcome.code == grpc.StatusCode.UNAVAILABLE, outcome
            assert "not node/b" in outcome.details, outcome
            assert daemon_a.supervisor.get("web").pid == pid
