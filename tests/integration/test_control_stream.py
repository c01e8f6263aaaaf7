"""ManagerService.Connect over real mTLS gRPC, on SQLite and PostgreSQL.

The daemon end is `control_end.ControlEnd` (the generated stub, in-test
handlers); the manager is the real one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from control_end import ControlEnd, dial, open_stream
from fleet_harness import operator_stub
from manager_harness import FakeClock, manager_config, node_stub, rpc_error, running_manager
from sqlalchemy import text

from fleet import errors
from fleet.control import retry_after
from fleet.v1 import common_pb2, daemon_pb2, fleet_pb2, manager_pb2
from manager.server import ManagerServer
from manager.service.jobs import format_time


@pytest.fixture
def clock() -> FakeClock:
    """The manager's clock, shared with the test."""
    return FakeClock()


@pytest.fixture
async def manager(
    pki: Any, database_url: str, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[ManagerServer]:
    """A running manager with a short stream grace and a slow background refresh."""
    config = manager_config(
        pki,
        database_url,
        tmp_path / "state",
        control={
            "offline_grace_seconds": 5.0,
            "liveness_refresh_seconds": 3600.0,
            "stream_credit": 4,
        },
    )
    async with running_manager(config, clock) as server:
        # These tests judge stream liveness alone, jumping the clock past whole offline
        # windows; the sweeper's first pass, at a real-time moment that can fall after a
        # jump, would take nodes offline for missed heartbeats in the test's stead.
        await server.sweeper.stop()
        yield server


@pytest.fixture
async def ends() -> AsyncIterator[list[ControlEnd]]:
    """Streams opened by a test; closed after it."""
    opened: list[ControlEnd] = []
    yield opened
    for end in opened:
        await end.close()


async def connect(
    pki: Any, server: ManagerServer, ends: list[ControlEnd], node_id: str, **kw: Any
) -> tuple[ControlEnd, manager_pb2.ConnectResponse | None]:
    end, first = await open_stream(pki, server.port, node_id, **kw)
    ends.append(end)
    return end, first


async def scalar(server: ManagerServer, sql: str, **params: Any) -> Any:
    async with server.db.engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar_one_or_none()


def violations(server: ManagerServer, kind: str) -> float:
    value = server.metrics.registry.get_sample_value(
        "fleet_manager_control_violations_total", {"kind": kind}
    )
    return value or 0.0


async def wait_until(predicate: Any, within: float = 5.0) -> None:
    """Poll `predicate` (state of the real manager, no event to wait on) for `within` s."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110  # polls another component's state
            await asyncio.sleep(0.01)


# --- the hello -------------------------------------------------------------


async def test_hello_registers_the_node_and_is_welcomed(
    pki: Any, manager: ManagerServer, ends: list[ControlEnd]
) -> None:
    """The hello stores the node as RegisterNode does and is answered with welcome."""
    _, first = await connect(
        pki, manager, ends, "node-1", daemon_address="", jobs_disabled=True, labels={"zone": "b"}
    )
    assert first is not None
    assert first.reply_to == 1
    assert first.WhichOneof("body") == "welcome"
    assert first.welcome.success
    assert await scalar(manager, "SELECT status FROM nodes WHERE node_id='node-1'") == "online"
    assert await scalar(manager, "SELECT jobs_disabled FROM nodes WHERE node_id='node-1'") in (
        True,
        1,
    )
    assert manager.control_streams.get("node-1") is not None


@pytest.mark.parametrize(
    ("role", "hello_node", "code"),
    [
        ("node", "node-2", grpc.StatusCode.PERMISSION_DENIED),  # another node's name
        ("operator", "node-1", grpc.StatusCode.PERMISSION_DENIED),  # not a node at all
    ],
)
async def test_hello_for_another_identity_ends_the_stream(
    pki: Any,
    manager: ManagerServer,
    ends: list[ControlEnd],
    role: str,
    hello_node: str,
    code: grpc.StatusCode,
) -> None:
    """A hello whose node is not the certificate's ends the stream, registering nothing."""
    hello = manager_pb2.ConnectRequest(
        id=1,
        hello=manager_pb2.RegisterNodeRequest(
            node_id=hello_node, hostname="h", os="linux", arch="x86_64"
        ),
    )
    end, first = await connect(pki, manager, ends, "node-1", role=role, hello=hello)
    assert first is None
    assert end.status is code
    assert "may not" in end.details
    assert await scalar(manager, "SELECT count(*) FROM nodes") == 0


async def test_new_streams_are_admitted_under_the_ceiling_and_refused_past_the_wait(
    pki: Any, database_url: str, tmp_path: Path, clock: FakeClock, ends: list[ControlEnd]
) -> None:
    """At 2 hellos/s (a burst of 2) and 0.6 s of wait at most: 2 welcomed at once, the
    third after its 0.5 s slot, the rest refused RESOURCE_EXHAUSTED naming the setting
    (and counted), registering nothing, each told when its slot is (1 s, 1.5 s) in the
    error answer and in the status; a refused node back at its time is welcomed at once
    (its slot was kept for it)."""
    config = manager_config(
        pki,
        database_url,
        tmp_path / "state",
        control={"max_hellos_per_second": 2.0, "max_hello_wait_seconds": 0.6},
    )
    async with running_manager(config, clock) as server:
        # Connected first, so the five hellos arrive together however long five TLS
        # handshakes take on a busy machine (the bucket refills at 2/s meanwhile).
        channels = await asyncio.gather(*(dial(pki, server.port, f"node-{i}") for i in range(5)))
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def one(i: int) -> tuple[str, float, ControlEnd, Any]:
            node = f"node-{i}"
            end, first = await connect(pki, server, ends, node, channel=channels[i])
            return node, loop.time() - t0, end, first

        got = await asyncio.gather(*(one(i) for i in range(5)))
        welcomed = sorted(t for _, t, _, first in got if first.WhichOneof("body") == "welcome")
        refused = [(node, end, first) for node, _, end, first in got if first.error.code]
        assert len(welcomed) == 3
        assert welcomed[2] >= 0.45  # its slot, not at once
        assert len(refused) == 2
        hints = []
        for _, end, first in refused:
            assert first.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert "max_hellos_per_second" in first.error.message
            hints.append(retry_after(first.error.trailing_metadata))
            async with asyncio.timeout(10):
                await end.ended.wait()
            assert end.status is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert retry_after(end.trailing) == hints[-1]
        # Slots 1 s and 1.5 s from the burst, each hint counted from its own refusal: on
        # a busy machine the hellos come spread over a few hundred ms, so the exact
        # figures are the pacer's unit tests' (tests/unit/test_hello_pacer.py); here, two
        # different slots within the wait's reach.
        first_slot, second_slot = sorted(hints)
        assert 0.3 <= first_slot < second_slot <= 1.6, hints
        assert await scalar(server, "SELECT count(*) FROM nodes") == 3
        refusals = server.metrics.registry.get_sample_value(
            "fleet_manager_control_refused_total", {"kind": "hello", "code": "RESOURCE_EXHAUSTED"}
        )
        assert refusals == 2
        # At the later slot both come back, and are admitted at once on their kept
        # slots (the ceiling alone would make the second wait).
        await asyncio.sleep(max(hints))
        for node, _, _ in refused:
            _, again = await connect(pki, server, ends, node)
            assert again is not None
            assert again.WhichOneof("body") == "welcome"
        assert await scalar(server, "SELECT count(*) FROM nodes") == 5


async def test_first_message_must_be_hello(
    pki: Any, manager: ManagerServer, ends: list[ControlEnd]
) -> None:
    """A stream starting with anything but hello ends INVALID_ARGUMENT and is counted."""
    first_msg = manager_pb2.ConnectRequest(
        id=1, agent_states=manager_pb2.SyncAgentStatesRequest(node_id="node-1")
    )
    end, first = await connect(pki, manager, ends, "node-1", hello=first_msg)
    assert first is None
    assert end.status is grpc.StatusCode.INVALID_ARGUMENT
    assert "first message on the control stream must be hello" in end.details
    assert violations(manager, "no_hello") == 1


async def test_second_stream_replaces_the_first(
    pki: Any, manager: ManagerServer, ends: list[ControlEnd]
) -> None:
    """The older stream ends ABORTED saying why; commands go to the newer one."""
    old, _ = await connect(pki, manager, ends, "node-1")
    new, _ = await connect(pki, manager, ends, "node-1")
    await asyncio.wait_for(old.ended.wait(), 5)
    assert old.status is grpc.StatusCode.ABORTED
    assert old.details == "replaced by a newer control stream from the same node"
    assert violations(manager, "replaced_stream") == 1

    async def list_agents(_: Any) -> daemon_pb2.ListAgentsResponse:
        return daemon_pb2.ListAgentsResponse(agents=[common_pb2.AgentInfo(id="new")])

    new.unary["ListAgents"] = list_agents
    got = await manager.pool.list_agents("node-1", "")
    assert [a.id for a in got.agents] == ["new"]


# --- upward messages -------------------------------------------------------


async def test_agent_states_and_metrics_are_answered_once_stored(
    pki: Any, manager: ManagerServer, ends: list[ControlEnd], clock: FakeClock
) -> None:
    """Both are stored and answered with reply_to; a repeated metric batch is stored once."""
    end, _ = await connect(pki, manager, ends, "node-1")
    states = manager_pb2.SyncAgentStatesRequest(
        node_id="node-1",
        states=[manager_pb2.AgentState(agent_id="web", status=common_pb2.AGENT_STATUS_RUNNING)],
    )
    answer = await end.send(agent_states=states)
    assert answer.reply_to == 2
    assert answer.agent_states.success
    assert answer.agent_states.changed
    assert (
        await scalar(manager, "SELECT status FROM agent_states WHERE agent_id='web'") == "RUNNING"
    )

    batch = manager_pb2.ReportMetricsRequest(
        node_id="node-1",
        sequence=7,
        metrics=[common_pb2.MetricData(type="cpu", timestamp=clock.ms(), values={"usage": 1.0})],
    )
    first = await end.send(metrics=batch)
    again = await end.send(metrics=batch)
    assert first.reply_to == 3
    assert first.metrics.success
    assert not first.metrics.duplicate
    assert again.reply_to == 4
    assert again.metrics.duplicate
    assert await scalar(manager, "SELECT count(*) FROM metric_samples") == 1


async def test_refused_messages_keep_the_stream_and_store_nothing(
    pki: Any, manager: ManagerServer, ends: list[ControlEnd]
) -> None:
    """Another node's states, a second hello and a repeated id are refused, counted; the
    stream goes on."""
    end, _ = await connect(pki, manager, ends, "node-1")
    other = manager_pb2.SyncAgentStatesRequest(
        node_id="node-2",
        states=[manager_pb2.AgentState(agent_id="web", status=common_pb2.AGENT_STATUS_RUNNING)],
    )
    refused = await end.send(agent_states=other)
    assert refused.WhichOneof("body") == "error"
    assert refused.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert "may not speak for node node-2" in refused.error.message
    assert dict(refused.error.trailing_metadata) == {}  # about nothing in particular

    again = await end.send(hello=manager_pb2.RegisterNodeRequest(node_id="node-1"))
    assert again.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert violations(manager, "second_hello") == 1

    stale = await end.send_raw(
        manager_pb2.ConnectRequest(
            id=2, agent_states=manager_pb2.SyncAgentStatesRequest(node_id="node-1")
        )
    )
    assert stale.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "ids must increase" in stale.error.message
    assert violations(manager, "id_not_increasing") == 1
    assert await scalar(manager, "SELECT count(*) FROM agent_states") == 0

    ok = await end.send(agent_states=manager_pb2.SyncAgentStatesRequest(node_id="node-1"))
    assert ok.agent_states.success
    assert not end.ended.is_set()


async def test_a_refusal_names_its_resource_as_the_unary_call_does(
    pki: Any, manager: ManagerServer, ends: list[ControlEnd]
) -> None:
    """States for a node deleted under its open stream: NOT_FOUND with the node as the
    Resource, in the same trailing metadata the unary SyncAgentStates ends with."""
    end, _ = await connect(pki, manager, ends, "node-1")
    async with manager.db.engine.begin() as conn:
        await conn.execute(text("DELETE FROM nodes WHERE node_id = 'node-1'"))
    states = manager_pb2.SyncAgentStatesRequest(node_id="node-1")
    refused = await end.send(agent_states=states)
    assert refused.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert refused.error.message == "node 'node-1' is not registered"
    assert dict(refused.error.trailing_metadata) == {
        "fleet-resource-kind": "node",
        "fleet-resource-name": "node-1",
    }
    async with node_stub(pki, "node-1", manager.port) as stub:
        unary = await rpc_error(stub.SyncAgentStates(states, timeout=10))
    assert unary.code() == grpc.StatusCode.NOT_FOUND
    assert unary.details() == refused.error.message
    unary_trailers = {k: v for k, v in unary.trailing_metadata() or () if k.startswith("fleet-")}
    assert unary_trailers == dict(refused.error.trailing_metadata)


async def test_a_result_for_an_unknown_request_is_counted_and_ignored(
    pki: Any, manager: ManagerServer, ends: list[ControlEnd]
) -> None:
    """A result for a request never sent changes nothing and is counted."""
    end, _ = await connect(pki, manager, ends, "node-1")
    await end._write(
        manager_pb2.ConnectRequest(
            result=manager_pb2.CommandResult(request_id=999, end=True, response=b"x")
        )
    )
    await wait_until(lambda: violations(manager, "unknown_request_id") == 1)
    ok = await end.send(agent_states=manager_pb2.SyncAgentStatesRequest(node_id="node-1"))
    assert ok.agent_states.success


# --- commands ----------------------------------------------------------------


async def test_commands_unary_and_several_in_flight(
    pki: Any, manager: ManagerServer, ends: list[ControlEnd]
) -> None:
    """Calls with no listen address go over the stream, several at once, errors mapped."""
    end, _ = await connect(pki, manager, ends, "node-1", daemon_address="")
    release = asyncio.Event()

    async def operate(req: Any) -> daemon_pb2.OperateAgentResponse:
        if req.agent_id == "missing":
            raise KeyError  # the end answers UNIMPLEMENTED: an error code from the daemon
        await release.wait()
        return daemon_pb2.OperateAgentResponse(success=True, error_message=req.agent_id)

    end.unary["OperateAgent"] = operate
    start = common_pb2.AgentOperation.AGENT_OPERATION_START
    calls = [
        asyncio.create_task(manager.pool.operate_agent("node-1", "", f"a{i}", start))
        for i in range(5)
    ]
    session = manager.control_streams.get("node-1")
    assert session is not None
    await wait_until(lambda: session.in_flight == 5)
    release.set()
    answers = await asyncio.gather(*calls)
    assert sorted(a.error_message for a in answers) == [f"a{i}" for i in range(5)]
    await asyncio.sleep(0.05)
    assert end.cancelled == set()  # a call that was answered is not cancelled afterwards
    with pytest.raises(errors.FleetError, match=r"^node-1: OperateAgent not served here"):
        await manager.pool.operate_agent("node-1", "", "missing", start)


async def test_streaming_command_obeys_credit_with_a_slow_consumer(
    pki: Any, manager: ManagerServer, ends: list[ControlEnd]
) -> None:
    """A log of 40 chunks arrives whole and in order; the daemon never runs ahead of credit."""
    end, _ = await connect(pki, manager, ends, "node-1", daemon_address="")

    async def read_log(req: Any) -> AsyncIterator[daemon_pb2.ReadAgentLogResponse]:
        for i in range(40):
            yield daemon_pb2.ReadAgentLogResponse(data=b"%d\n" % i, offset=i, next_offset=i + 1)

    end.streaming["ReadAgentLog"] = read_log
    got: list[bytes] = []
    async for chunk in manager.pool.read_agent_log("node-1", "", "web"):
        got.append(chunk.data)
        await asyncio.sleep(0.005)  # slow consumer
        session = manager.control_streams.get("node-1")
        assert session is not None
    assert got == [b"%d\n" % i for i in range(40)]
    assert end.max_outstanding <= 0
    first = next(c for c in end.commands if c.method == "ReadAgentLog")
    assert first.credit == 4
    assert any(c.credit and not c.method for c in end.commands)  # top-ups were granted


async def test_results_beyond_credit_fail_the_call_and_cancel_it(
    pki: Any, manager: ManagerServer, ends: list[ControlEnd]
) -> None:
    """A daemon sending past its credit is a counted violation; the caller gets an error."""
    end, _ = await connect(pki, manager, ends, "node-1", daemon_address="")
    end.obey_credit = False

    async def flood(req: Any) -> AsyncIterator[daemon_pb2.ReadAgentLogResponse]:
        for i in range(50):
            yield daemon_pb2.ReadAgentLogResponse(data=b"x", offset=i, next_offset=i + 1)

    end.streaming["ReadAgentLog"] = flood

    async def consume_slowly() -> None:
        stream = manager.pool.read_agent_log("node-1", "", "web")
        async with contextlib.aclosing(stream) as chunks:
            async for _ in chunks:
                await asyncio.sleep(0.05)  # the flood overtakes the reader

    with pytest.raises(errors.Internal, match="beyond its credit"):
        await consume_slowly()
    assert violations(manager, "over_credit") == 1
    await wait_until(lambda: bool(end.cancelled))


async def test_deadline_fails_the_caller_and_cancels_on_the_daemon(
    pki: Any, manager: ManagerServer, ends: list[ControlEnd]
) -> None:
    """A daemon that does not answer in time: DEADLINE_EXCEEDED, and a cancel is sent."""
    end, _ = await connect(pki, manager, ends, "node-1", daemon_address="")

    async def never(_: Any) -> daemon_pb2.ListAgentsResponse:
        await asyncio.Event().wait()
        raise AssertionError

    end.unary["ListAgents"] = never
    with pytest.raises(errors.DeadlineExceeded, match=r"did not answer ListAgents within 0\.2 s"):
        await manager.pool.list_agents("node-1", "", call_timeout=0.2)
    await wait_until(lambda: len(end.cancelled) == 1)
    first = next(c for c in end.commands if c.method == "ListAgents")
    assert first.timeout_seconds == pytest.approx(0.2)


async def test_caller_cancellation_cancels_on_the_daemon(
    pki: Any, manager: ManagerServer, ends: list[ControlEnd]
) -> None:
    """Cancelling the caller's task sends cancel for its request id."""
    end, _ = await connect(pki, manager, ends, "node-1", daemon_address="")
    started = asyncio.Event()

    async def slow(_: Any) -> daemon_pb2.ListAgentsResponse:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError

    end.unary["ListAgents"] = slow
    task = asyncio.create_task(manager.pool.list_agents("node-1", ""))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: len(end.cancelled) == 1)


async def test_stream_close_fails_a_call_that_may_have_run_at_once(
    pki: Any, manager: ManagerServer, ends: list[ControlEnd]
) -> None:
    """A restart in flight when the stream goes away fails UNAVAILABLE now, not at the
    deadline, saying its outcome is unknown; it is not sent to the next stream."""
    end, _ = await connect(pki, manager, ends, "node-1", daemon_address="")
    started = asyncio.Event()

    async def hang(_: Any) -> daemon_pb2.OperateAgentResponse:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError

    end.unary["OperateAgent"] = hang
    restart = common_pb2.AgentOperation.AGENT_OPERATION_RESTART
    task = asyncio.create_task(
        manager.pool.operate_agent("node-1", "", "web", restart, call_timeout=30)
    )
    await asyncio.wait_for(started.wait(), 5)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await end.close()
    with pytest.raises(errors.Unavailable) as lost:
        await task
    assert loop.time() - t0 < 2
    assert lost.value.message.startswith("node-1: the node's control stream closed (")
    assert "OperateAgent was in flight, so whether it ran on the node is unknown" in str(lost.value)
    with pytest.raises(errors.Unavailable, match="no control stream and no listen address"):
        await manager.pool.list_agents("node-1", "")  # a new call: no way, no waiting
    again, _ = await connect(pki, manager, ends, "node-1", daemon_address="")
    await asyncio.sleep(0.2)
    assert again.commands == []


async def test_a_read_in_flight_when_the_stream_closes_goes_over_the_next_one(
    pki: Any, manager: ManagerServer, ends: list[ControlEnd]
) -> None:
    """ListAgents whose stream closes under it waits for the node's next stream and is
    answered there, within its one deadline."""
    end, _ = await connect(pki, manager, ends, "node-1", daemon_address="")
    started = asyncio.Event()

    async def hang(_: Any) -> daemon_pb2.ListAgentsResponse:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError

    end.unary["ListAgents"] = hang
    task = asyncio.create_task(manager.pool.list_agents("node-1", "", call_timeout=30))
    await asyncio.wait_for(started.wait(), 5)
    await end.close()
    await asyncio.sleep(0.3)  # the node is away for a moment; the call waits
    assert not task.done()
    new, _ = await connect(pki, manager, ends, "node-1", daemon_address="")

    async def list_agents(_: Any) -> daemon_pb2.ListAgentsResponse:
        return daemon_pb2.ListAgentsResponse(agents=[common_pb2.AgentInfo(id="after")])

    new.unary["ListAgents"] = list_agents
    got = await asyncio.wait_for(task, 10)
    assert [a.id for a in got.agents] == ["after"]
    assert [c.method for c in new.commands] == ["ListAgents"]
    assert manager.pool.stats()["node-1"].retries == 1


async def test_a_read_whose_stream_does_not_come_back_fails_at_its_deadline(
    pki: Any, manager: ManagerServer, ends: list[ControlEnd]
) -> None:
    """No new stream within the call's deadline: UNAVAILABLE saying so, at the deadline."""
    end, _ = await connect(pki, manager, ends, "node-1", daemon_address="")
    started = asyncio.Event()

    async def hang(_: Any) -> daemon_pb2.ListAgentsResponse:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError

    end.unary["ListAgents"] = hang
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    task = asyncio.create_task(manager.pool.list_agents("node-1", "", call_timeout=1.5))
    await asyncio.wait_for(started.wait(), 5)
    await end.close()
    with pytest.raises(errors.Unavailable, match="did not come back within the call's deadline"):
        await task
    assert 1.4 <= loop.time() - t0 < 4


async def test_a_read_in_flight_when_the_manager_stops_fails_at_once(
    pki: Any, database_url: str, tmp_path: Path, clock: FakeClock, ends: list[ControlEnd]
) -> None:
    """The manager ending every stream to stop: a ListAgents in flight does not wait for
    the node to come back here (it cannot), so it does not hold up the shutdown."""
    config = manager_config(pki, database_url, tmp_path / "s")
    async with running_manager(config, clock) as server:
        end, _ = await connect(pki, server, ends, "node-1", daemon_address="")
        started = asyncio.Event()

        async def hang(_: Any) -> daemon_pb2.ListAgentsResponse:
            started.set()
            await asyncio.Event().wait()
            raise AssertionError

        end.unary["ListAgents"] = hang
        task = asyncio.create_task(server.pool.list_agents("node-1", "", call_timeout=30))
        await asyncio.wait_for(started.wait(), 5)
        server.control_streams.close_all("the manager is shutting down")
        with pytest.raises(errors.Unavailable, match="ListAgents was not sent again: this man"):
            await asyncio.wait_for(task, 2)


async def test_daemon_that_stops_reading_makes_commands_fail_fast(
    pki: Any, database_url: str, tmp_path: Path, clock: FakeClock, ends: list[ControlEnd]
) -> None:
    """With the send queue full, a new command is RESOURCE_EXHAUSTED at once, not queued."""
    config = manager_config(
        pki,
        database_url,
        tmp_path / "s",
        control={"max_queued_messages": 16, "max_message_bytes": 1024 * 1024},
    )
    async with running_manager(config, clock) as server:
        end, _ = await connect(pki, server, ends, "node-1", daemon_address="")
        end.reading.clear()
        session = server.control_streams.get("node-1")
        assert session is not None
        big = [common_pb2.AgentSpec(id=f"a{i}", argv=["x" * 60_000]) for i in range(15)]
        failures: list[Exception] = []
        # The daemon end does not read: gRPC's flow-control window fills, then our queue:
        # calls pile up until the queue is full, then fail at once.
        tasks = [
            asyncio.create_task(server.pool.push_update("node-1", "", i, big, call_timeout=5))
            for i in range(1, 200)
        ]
        await wait_until(lambda: any(t.done() for t in tasks), within=10)
        for t in tasks:
            if t.done() and t.exception() is not None:
                failures.append(t.exception())  # type: ignore[arg-type]
        assert any(isinstance(f, errors.ResourceExhausted) for f in failures)
        assert session.queued <= 16
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- the pool's two transports ----------------------------------------------


async def test_pool_dials_without_a_stream_and_uses_the_stream_when_open(
    pki: Any, manager: ManagerServer, ends: list[ControlEnd], start_daemon: Any
) -> None:
    """Same node, same call: dialled to its listen address, then over its stream once open."""
    daemon = await start_daemon("node-1")
    dialled = await manager.pool.list_agents("node-1", daemon.address)
    assert [a.id for a in dialled.agents] == ["node-1-web"]
    end, _ = await connect(pki, manager, ends, "node-1", daemon_address=daemon.address)

    async def list_agents(_: Any) -> daemon_pb2.ListAgentsResponse:
        return daemon_pb2.ListAgentsResponse(agents=[common_pb2.AgentInfo(id="via-stream")])

    end.unary["ListAgents"] = list_agents
    streamed = await manager.pool.list_agents("node-1", daemon.address)
    assert [a.id for a in streamed.agents] == ["via-stream"]
    assert daemon.servicer.calls == ["ListAgents"]  # the second call did not dial


async def test_a_command_only_reaches_the_node_whose_certificate_opened_the_stream(
    pki: Any, manager: ManagerServer, ends: list[ControlEnd]
) -> None:
    """node-2's stream never receives node-1's command."""
    end2, _ = await connect(pki, manager, ends, "node-2", daemon_address="")
    with pytest.raises(errors.Unavailable, match=r"^node-1: the node has no control"):
        await manager.pool.list_agents("node-1", "")
    assert end2.commands == []


# --- liveness ----------------------------------------------------------------


async def test_node_goes_offline_after_the_grace_and_back_on_reconnect(
    pki: Any, manager: ManagerServer, ends: list[ControlEnd], clock: FakeClock
) -> None:
    """Broken stream: online within the grace, offline after it; a new stream: online."""
    end, _ = await connect(pki, manager, ends, "node-1")
    clock.advance(60)  # no heartbeat calls at all: the open stream keeps it online
    assert await manager.stream_liveness.run_once() == []
    await end.close()
    # The grace starts when the manager detaches the stream (broken_at), which can come
    # a moment after the session reads closed: wait for that, not for get() is None.
    await wait_until(lambda: "node-1" in manager.control_streams.broken_at)
    broken_at = manager.control_streams.broken_at["node-1"]
    clock.advance(4)
    assert await manager.stream_liveness.run_once() == []
    assert await scalar(manager, "SELECT status FROM nodes WHERE node_id='node-1'") == "online"
    clock.advance(2)
    assert await manager.stream_liveness.run_once() == ["node-1"]
    assert await scalar(manager, "SELECT status FROM nodes WHERE node_id='node-1'") == "offline"
    # Its last heartbeat was refreshed through the grace: the event says when it broke.
    (event,) = await manager.events.list_after(0, kinds=["NODE_OFFLINE"])
    assert event.message == (
        f"node node-1 lost its control stream at {format_time(broken_at)} and did not"
        " reconnect within 5 s"
    )
    # And it was last seen then, not at the grace's end (`nodes show`'s "Last seen").
    last_seen = await scalar(manager, "SELECT last_seen_ms FROM nodes WHERE node_id='node-1'")
    assert last_seen == int(broken_at * 1000)
    await connect(pki, manager, ends, "node-1")
    assert await scalar(manager, "SELECT status FROM nodes WHERE node_id='node-1'") == "online"


async def test_in_its_grace_a_lost_streams_node_reads_last_heard_when_it_broke(
    pki: Any, manager: ManagerServer, ends: list[ControlEnd], clock: FakeClock
) -> None:
    """The grace keeps the node ONLINE with a fresh last-seen; ListNodes and GetNode say
    it was last heard when the stream broke, and that the stream is lost."""
    end, _ = await connect(pki, manager, ends, "node-1")
    await end.close()
    await wait_until(lambda: "node-1" in manager.control_streams.broken_at)
    broken_ms = int(manager.control_streams.broken_at["node-1"] * 1000)
    clock.advance(4)
    assert await manager.stream_liveness.run_once() == []
    await manager.heartbeats.flush()
    stored = await scalar(manager, "SELECT last_seen_ms FROM nodes WHERE node_id='node-1'")
    assert stored == clock.ms(), "the grace refreshed the stored last-seen"
    async with operator_stub(pki, manager.port) as stub:
        (listed,) = (await stub.ListNodes(fleet_pb2.FleetServiceListNodesRequest())).nodes
        shown = (await stub.GetNode(fleet_pb2.FleetServiceGetNodeRequest(node_id="node-1"))).node
    for node in (listed, shown):
        assert node.status == common_pb2.NODE_STATUS_ONLINE
        assert node.stream_state == fleet_pb2.CONTROL_STREAM_STATE_LOST
        assert node.last_heartbeat == broken_ms


async def test_a_stream_broken_within_the_failover_grace_stays_online_until_it_ends(
    pki: Any, manager: ManagerServer, ends: list[ControlEnd], clock: FakeClock
) -> None:
    """Right after the manager started (failover grace 60 s), a broken stream keeps its
    node online past the stream's 5 s grace, until the failover grace is over."""
    end, _ = await connect(pki, manager, ends, "node-1")
    await end.close()
    await wait_until(lambda: "node-1" in manager.control_streams.broken_at)
    clock.advance(30)
    assert await manager.stream_liveness.run_once() == []
    assert await scalar(manager, "SELECT status FROM nodes WHERE node_id='node-1'") == "online"
    clock.advance(31)
    assert await manager.stream_liveness.run_once() == ["node-1"]


async def test_a_reconnect_within_the_grace_keeps_the_node_online(
    pki: Any, manager: ManagerServer, ends: list[ControlEnd], clock: FakeClock
) -> None:
    """A stream that comes back before the grace ends: never offline."""
    end, _ = await connect(pki, manager, ends, "node-1")
    await end.close()
    await wait_until(lambda: manager.control_streams.get("node-1") is None)
    clock.advance(3)
    await connect(pki, manager, ends, "node-1")
    clock.advance(10)
    assert await manager.stream_liveness.run_once() == []
    assert await scalar(manager, "SELECT status FROM nodes WHERE node_id='node-1'") == "online"


@pytest.mark.parametrize("step", [3600.0, -600.0])
async def test_a_step_of_the_wall_clock_moves_a_broken_stream_grace_with_it(
    pki: Any,
    database_url: str,
    tmp_path: Path,
    clock: FakeClock,
    ends: list[ControlEnd],
    step: float,
) -> None:
    """A broken stream's 5 s grace lasts 5 s of time whichever way the wall clock is
    stepped meanwhile: +1 h does not end it at once, -10 min does not make it 10 min."""
    config = manager_config(
        pki,
        database_url,
        tmp_path / "state",
        control={"offline_grace_seconds": 5.0, "liveness_refresh_seconds": 3600.0},
    )
    async with running_manager(config, clock, monotonic=clock.monotonic) as server:
        await server.sweeper.stop()  # stream liveness alone, as in the tests above
        clock.advance(61)  # past the failover grace
        assert await server.stream_liveness.run_once() == []
        end, _ = await connect(pki, server, ends, "node-1")
        await end.close()
        await wait_until(lambda: "node-1" in server.control_streams.broken_at)
        clock.step(step)
        assert await server.stream_liveness.run_once() == []
        clock.advance(4)
        assert await server.stream_liveness.run_once() == []
        clock.advance(2)
        assert await server.stream_liveness.run_once() == ["node-1"]
        assert await scalar(server, "SELECT status FROM nodes WHERE node_id='node-1'") == "offline"
