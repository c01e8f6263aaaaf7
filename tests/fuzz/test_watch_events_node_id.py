"""WatchEvents checks its node_id like every other node_id field (found by fuzzing on PostgreSQL).

Every FleetService node_id is validated (INVALID_ARGUMENT naming node_id).
WatchEvents' was not, and went straight into the query: on PostgreSQL a NUL
character made asyncpg raise CharacterNotInRepertoireError and the operator
got INTERNAL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from daemon_helpers import short_tmp
from grpc import aio
from live_env import SERVICES, ModulePki, channels, invoke, live_manager, manager_name

from fleet.v1 import fleet_pb2

WATCH = SERVICES["FleetService"].methods_by_name["WatchEvents"]
GET_NODE = SERVICES["FleetService"].methods_by_name["GetNode"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def operator(module_pki: ModulePki, manager_database: str) -> AsyncIterator[aio.Channel]:
    """An operator's channel to a manager on each backend."""
    with short_tmp() as root:
        async with (
            live_manager(module_pki, root, manager_database) as manager,
            channels(
                manager.port,
                {"op": module_pki.issue("operator", "alice")},
                manager_name(module_pki),
            ) as chans,
        ):
            yield chans["op"]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("node_id", ["n1\x00", "Not A Node!", "x" * 300])
async def test_watch_events_refuses_a_bad_node_id_like_get_node(
    operator: aio.Channel, node_id: str
) -> None:
    """A node_id GetNode calls invalid is INVALID_ARGUMENT naming node_id in WatchEvents too."""
    get = await invoke(operator, GET_NODE, fleet_pb2.FleetServiceGetNodeRequest(node_id=node_id))
    assert get.code == grpc.StatusCode.INVALID_ARGUMENT, get
    request = fleet_pb2.FleetServiceWatchEventsRequest(node_id=node_id)
    watch = await invoke(operator, WATCH, request, idle=5.0)
    assert watch.code == grpc.StatusCode.INVALID_ARGUMENT, watch
    assert "node_id" in watch.details, watch
