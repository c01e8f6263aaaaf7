"""A long bad value gets INVALID_ARGUMENT/NOT_FOUND with a short message, not a lost error.

Found by the fuzzers: when a server echoes a rejected value whole in the
status message, a value of more than 16 KiB makes the message exceed the
client's metadata limit (16 KiB hard), and the client gets
RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" instead of
the error naming the field. Each case here is a request well under the
4 MiB message limit with one long value (20,000 characters).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio
from daemon_helpers import agent, short_tmp
from google.protobuf.message import Message
from grpc import aio
from live_env import (
    SERVICES,
    SLEEP,
    ModulePki,
    channels,
    invoke,
    live_daemon,
    live_manager,
    manager_name,
    node_name,
    registration,
)

from fleet.v1 import common_pb2, daemon_pb2, fleet_pb2, manager_pb2

pytestmark = pytest.mark.asyncio(loop_scope="module")

LONG = "x" * 20_000
"""Longer than any field allows, far shorter than the 4 MiB message limit."""
MAX_DETAILS = 2048
"""A status message an operator can read (and that fits any client's metadata limit)."""
NOW = 1_700_000_000_000


@dataclass(frozen=True)
class Case:
    """One request with one long value, and the answer it must get."""

    service: str
    rpc: str
    caller: str
    request: Callable[[], Message]
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT


def _node(**kw: object) -> manager_pb2.RegisterNodeRequest:
    fields: dict[str, object] = {
        "node_id": "n1",
        "hostname": "h",
        "ip": "127.0.0.1",
        "os": "linux",
        "arch": "x",
    }
    fields.update(kw)
    return manager_pb2.RegisterNodeRequest(**fields)  # type: ignore[arg-type]


def _metric(**kw: object) -> manager_pb2.ReportMetricsRequest:
    data = common_pb2.MetricData(type="cpu", timestamp=NOW, values={"usage": 1.0})
    for key, value in kw.items():
        if key == "values":
            data.values.clear()
            data.values.update(value)  # type: ignore[call-overload]
        else:
            setattr(data, key, value)
    return manager_pb2.ReportMetricsRequest(node_id="n1", sequence=1, metrics=[data])


CASES = {
    "RegisterNode label value": Case(
        "ManagerService", "RegisterNode", "n1", lambda: _node(labels={"team": LONG})
    ),
    "RegisterNode label key": Case(
        "ManagerService", "RegisterNode", "n1", lambda: _node(labels={LONG: "a"})
    ),
    "RegisterNode hostname": Case(
        "ManagerService", "RegisterNode", "n1", lambda: _node(hostname=LONG)
    ),
    "ReportMetrics metric type": Case(
        "ManagerService", "ReportMetrics", "n1", lambda: _metric(type=LONG)
    ),
    "ReportMetrics value name": Case(
        "ManagerService", "ReportMetrics", "n1", lambda: _metric(values={LONG: 1.0})
    ),
    "SyncAgentStates agent label": Case(
        "ManagerService",
        "SyncAgentStates",
        "n1",
        lambda: manager_pb2.SyncAgentStatesRequest(
            node_id="n1", states=[manager_pb2.AgentState(agent_id="a", labels={"k": LONG})]
        ),
    ),
    "UpdateNodeLabels value": Case(
        "FleetService",
        "UpdateNodeLabels",
        "operator",
        lambda: fleet_pb2.FleetServiceUpdateNodeLabelsRequest(node_id="n1", set={"k": LONG}),
    ),
    "ListNodes selector value": Case(
        "FleetService",
        "ListNodes",
        "operator",
        lambda: fleet_pb2.FleetServiceListNodesRequest(
            selector=common_pb2.LabelSelector(match_labels={"k": LONG})
        ),
    ),
    "GetNode node_id": Case(
        "FleetService",
        "GetNode",
        "operator",
        lambda: fleet_pb2.FleetServiceGetNodeRequest(node_id=LONG),
    ),
    "daemon OperateAgent agent_id": Case(
        "DaemonService",
        "OperateAgent",
        "manager",
        lambda: daemon_pb2.OperateAgentRequest(
            agent_id=LONG, operation=common_pb2.AGENT_OPERATION_START
        ),
        grpc.StatusCode.NOT_FOUND,
    ),
    "daemon PushUpdate agent id": Case(
        "DaemonService",
        "PushUpdate",
        "manager",
        lambda: daemon_pb2.PushUpdateRequest(
            version=5, agents=[common_pb2.AgentSpec(id=LONG, argv=[SLEEP, "1000"])]
        ),
    ),
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chans(module_pki: ModulePki) -> AsyncIterator[dict[str, aio.Channel]]:
    """Channels as n1 and operator (to a manager) and as manager (to n1's daemon)."""
    pki = module_pki
    with short_tmp() as root:
        async with (
            live_manager(pki, root) as manager,
            live_daemon(pki, root / "d", "n1", [agent("sleeper", SLEEP, "1000")]) as daemon,
            channels(
                manager.port,
                {"n1": pki.issue("node", "n1"), "operator": pki.issue("operator", "alice")},
                manager_name(pki),
            ) as to_manager,
            channels(
                daemon.port, {"manager": pki.issue("manager", "m1")}, node_name(pki, "n1")
            ) as to_daemon,
        ):
            register = SERVICES["ManagerService"].methods_by_name["RegisterNode"]
            reply = await invoke(to_manager["n1"], register, registration("n1", "127.0.0.1:7444"))
            assert reply.code == grpc.StatusCode.OK, reply
            yield {**to_manager, **to_daemon}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_long_value_gets_a_readable_error(chans: dict[str, aio.Channel], case: Case) -> None:
    """The refusal arrives with its own code and a message short enough to read and deliver."""
    method = SERVICES[case.service].methods_by_name[case.rpc]
    outcome = await invoke(chans[case.caller], method, case.request())
    assert outcome.code == case.code, outcome.details[:300]
    assert len(outcome.details) <= MAX_DETAILS, outcome.details[:300]
