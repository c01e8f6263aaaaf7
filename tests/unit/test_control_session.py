"""ControlSession without a network: the bounded queue, ids, and closing (asyncio only)."""

from __future__ import annotations

import asyncio

import pytest

from fleet import errors
from fleet.v1 import daemon_pb2, manager_pb2
from manager.pool.config import ControlConfig
from manager.pool.stream import ControlSession, ControlStreams, StreamClosed, error_from_status


def session(**limits: int) -> ControlSession:
    return ControlSession("node-1", ControlConfig(**limits))  # type: ignore[arg-type]


async def test_a_full_send_queue_fails_new_commands_at_once() -> None:
    """With nobody writing, the queue bound is reached and the next call fails fast."""
    s = session(max_queued_messages=3)
    calls = [
        asyncio.create_task(s.call("ListAgents", daemon_pb2.ListAgentsRequest(), 5))
        for _ in range(3)
    ]
    await asyncio.sleep(0)
    with pytest.raises(errors.ResourceExhausted, match="not reading its control stream"):
        await s.call("ListAgents", daemon_pb2.ListAgentsRequest(), 5)
    assert s.queued == 3
    s.close("test over")
    for c in calls:
        with pytest.raises(StreamClosed):
            await c


async def test_in_flight_bound() -> None:
    """More than max_in_flight_commands calls at once is RESOURCE_EXHAUSTED."""
    s = session(max_in_flight_commands=2)
    calls = [
        asyncio.create_task(s.call("ListAgents", daemon_pb2.ListAgentsRequest(), 5))
        for _ in range(2)
    ]
    await asyncio.sleep(0)
    with pytest.raises(errors.ResourceExhausted, match="already in flight"):
        await s.call("ListAgents", daemon_pb2.ListAgentsRequest(), 5)
    s.close("test over")
    await asyncio.gather(*calls, return_exceptions=True)


async def test_request_ids_increase_and_late_results_are_dropped_quietly() -> None:
    """Ids start at 1; a result for a finished call is not a violation, one never sent is."""
    seen: list[str] = []
    s = ControlSession("node-1", ControlConfig(), on_violation=seen.append)
    task = asyncio.create_task(s.call("ListAgents", daemon_pb2.ListAgentsRequest(), 5))
    msg = await s.next_outgoing()
    assert msg is not None
    assert msg.command.request_id == 1
    assert msg.command.method == "ListAgents"
    s.deliver(manager_pb2.CommandResult(request_id=1, response=b"", end=True))
    assert await task == daemon_pb2.ListAgentsResponse()
    s.deliver(manager_pb2.CommandResult(request_id=1, end=True))  # late: dropped
    assert seen == []
    s.deliver(manager_pb2.CommandResult(request_id=5, end=True))
    assert seen == ["unknown_request_id"]


async def test_replacing_a_stream_closes_the_old_session() -> None:
    """attach() of the same node ends the older session with ABORTED and fails its calls."""
    streams = ControlStreams(clock=lambda: 100.0)
    old, new = session(), session()
    assert not streams.attach(old)
    call = asyncio.create_task(old.call("ListAgents", daemon_pb2.ListAgentsRequest(), 5))
    await asyncio.sleep(0)
    assert streams.attach(new)
    assert old.end_status is not None
    assert "replaced" in old.end_status[1]
    with pytest.raises(StreamClosed, match="replaced"):
        await call
    streams.detach(old)  # the old handler's cleanup must not drop the new stream
    assert streams.get("node-1") is new
    assert "node-1" not in streams.broken_at
    streams.detach(new)
    assert streams.get("node-1") is None
    assert streams.broken_at["node-1"] == 100.0


def test_error_codes_map_to_the_fleet_errors() -> None:
    """NOT_FOUND from the daemon is NotFound naming the node, as the dialled path."""
    err = error_from_status(5, "no agent web", node_id="node-1")
    assert isinstance(err, errors.NotFound)
    assert err.message == "node-1: no agent web"
    assert err.resource is None


def test_an_error_keeps_the_resource_its_trailing_metadata_names() -> None:
    """The Resource the daemon sent (as on the TCP port) survives, for fleetctl's hint."""
    about = errors.Resource("agent", "web")  # the daemon's: the node is the one that sent it
    err = error_from_status(5, "no agent web", node_id="node-1", trailing=dict(about.metadata()))
    assert err.resource == errors.Resource("agent", "web", "node-1")
