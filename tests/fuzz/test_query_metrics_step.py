"""QueryMetrics with a huge step_seconds is answered, not INTERNAL (found by the fuzzer).

The store multiplies step_seconds by 1000 and sends it to the database; past
int64 (step_seconds > 9,223,372,036,854,775) SQLite's driver raised
OverflowError ("Python int too large to convert to SQLite INTEGER"),
asyncpg DataError ("value out of int64 range"), and the operator got
INTERNAL. A step that large is one bucket over any range: OK
with at most one point per series, or INVALID_ARGUMENT if the manager caps
it, either is a fine answer.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from daemon_helpers import short_tmp
from grpc import aio
from live_env import (
    SERVICES,
    ModulePki,
    channels,
    invoke,
    live_manager,
    manager_name,
    registration,
)

from fleet.v1 import fleet_pb2

QUERY = SERVICES["FleetService"].methods_by_name["QueryMetrics"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def operator(module_pki: ModulePki, manager_database: str) -> AsyncIterator[aio.Channel]:
    """An operator's channel to a manager on each backend, node n1 registered."""
    register = SERVICES["ManagerService"].methods_by_name["RegisterNode"]
    with short_tmp() as root:
        async with (
            live_manager(module_pki, root, manager_database) as manager,
            channels(
                manager.port,
                {
                    "op": module_pki.issue("operator", "alice"),
                    "n1": module_pki.issue("node", "n1"),
                },
                manager_name(module_pki),
            ) as chans,
        ):
            reply = await invoke(chans["n1"], register, registration("n1", "127.0.0.1:7444"))
            assert reply.code == grpc.StatusCode.OK, reply
            yield chans["op"]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("step", [2**63 - 2, 10**16, 9_223_372_036_854_776])
async def test_query_metrics_with_a_huge_step_is_answered(operator: aio.Channel, step: int) -> None:
    """A step whose milliseconds overflow int64 gets OK or INVALID_ARGUMENT, never INTERNAL."""
    now = int(time.time() * 1000)
    request = fleet_pb2.FleetServiceQueryMetricsRequest(
        node_id="n1", type="cpu", start_time=now - 60_000, end_time=now + 60_000, step_seconds=step
    )
    outcome = await invoke(operator, QUERY, request)
    assert outcome.code in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}, outcome
