"""ControlSession without a network: the bounded queue, ids, closing and what a close
means for the calls in flight (asyncio only)."""

from __future__ import annotations

import asyncio

import pytest

from fleet import errors
from fleet.control import PIECE_BYTES
from fleet.v1 import common_pb2, daemon_pb2, manager_pb2
from manager.pool.config import ControlConfig
from manager.pool.outcome import TransportFailed, lost_from_metadata, may_send_again
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


async def test_a_closed_stream_says_whether_the_command_had_left() -> None:
    """A command still queued when the stream closes was certainly not delivered; one the
    writer took may have been; one started on a closed session never left."""
    s = session()
    taken = asyncio.create_task(s.call("ListAgents", daemon_pb2.ListAgentsRequest(), 5))
    queued = asyncio.create_task(s.call("ListAgents", daemon_pb2.ListAgentsRequest(), 5))
    await asyncio.sleep(0)
    first = await s.next_outgoing()  # the writer took the first command only
    assert first is not None
    assert first.command.request_id == 1
    s.close("the stream broke")
    with pytest.raises(StreamClosed) as maybe:
        await taken
    with pytest.raises(StreamClosed) as never:
        await queued
    assert maybe.value.delivered
    assert not never.value.delivered
    with pytest.raises(StreamClosed) as late:
        await s.call("ListAgents", daemon_pb2.ListAgentsRequest(), 5)
    assert not late.value.delivered


async def test_a_request_is_not_delivered_until_its_last_piece_left() -> None:
    """A request in pieces: with its last piece still queued the daemon cannot run it."""
    s = session()
    spec = common_pb2.AgentSpec(id="big", argv=["x" * (PIECE_BYTES + 10)])
    call = asyncio.create_task(
        s.call("PushUpdate", daemon_pb2.PushUpdateRequest(version=1, agents=[spec]), 5)
    )
    await asyncio.sleep(0)
    assert s.queued == 2
    piece = await s.next_outgoing()
    assert piece is not None
    assert piece.command.more
    s.close("the stream broke")
    with pytest.raises(StreamClosed) as closed:
        await call
    assert not closed.value.delivered


async def test_a_call_waiting_for_the_stream_gets_the_next_one() -> None:
    """attached() returns at once for an open stream, else when the node's next one
    attaches; another node's stream does not wake it."""
    streams = ControlStreams(clock=lambda: 100.0)
    waiting = asyncio.create_task(streams.attached("node-1"))
    other = ControlSession("node-2", ControlConfig())
    streams.attach(other)
    await asyncio.sleep(0.01)
    assert not waiting.done()
    mine = session()
    streams.attach(mine)
    assert await asyncio.wait_for(waiting, 1) is mine
    assert await streams.attached("node-2") is other
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await streams.attached("node-3")
    assert streams._waiting == {}  # a waiter that gave up leaves nothing behind
    waiting = asyncio.create_task(streams.attached("node-3"))
    await asyncio.sleep(0)
    streams.close_all("the manager is shutting down")  # nothing attaches here again
    assert await asyncio.wait_for(waiting, 1) is None
    assert await streams.attached("node-3") is None


@pytest.mark.parametrize(
    ("idempotent", "delivered", "again"),
    [(True, True, True), (True, False, True), (False, False, True), (False, True, False)],
)
def test_a_call_is_sent_again_only_if_idempotent_or_certainly_not_delivered(
    idempotent: bool, delivered: bool, again: bool
) -> None:
    """The resend rule: a non-idempotent call that may have run is never sent twice."""
    assert may_send_again(idempotent=idempotent, delivered=delivered) is again


def test_the_relay_trailer_says_whether_the_command_may_have_been_delivered() -> None:
    """A TransportFailed's trailers carry its Resource and the delivery mark, read back
    as such; an answer without the mark is no transport failure."""
    about = errors.Resource("node", "node-1")
    lost = TransportFailed("node-1: gone", delivered=False, resource=about)
    assert lost_from_metadata(lost.metadata()) is False
    assert errors.Resource.from_metadata(lost.metadata()) == about
    assert lost_from_metadata(TransportFailed("x", delivered=True).metadata()) is True
    assert lost_from_metadata(about.metadata()) is None
    assert lost_from_metadata(None) is None
