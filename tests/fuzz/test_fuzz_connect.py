"""Fuzz the control channel (ManagerService.Connect) on live streams.

Node n1 holds a stream and sends fuzzed ConnectRequest bodies on it; node
n2 holds its own stream throughout. Properties: every message is answered
or the stream ends, never with UNKNOWN/INTERNAL; a refusal (a ConnectError,
or the stream's end) stores nothing; n2's stream is never touched and still
answers; the manager still serves afterwards. A stream that does not start
with a hello for its own node is refused and registers nothing.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from fuzz_support import FUZZ, NEVER, db_state
from grpc import aio
from hypothesis import event, given, settings
from hypothesis import strategies as st
from live_env import (
    ModulePki,
    live_manager,
    manager_name,
    open_channel,
    registration,
    serving,
    status_code,
)
from proto_strategies import message, near, plausible_text, text

from bench.connect_sim import ControlStream, StreamEnded
from fleet.v1 import common_pb2, jobs_pb2, manager_pb2
from manager.server import SERVICE_NAME, ManagerServer

NODE, BYSTANDER, STRANGER = "n1", "n2", "n3"
ANSWER_WITHIN = 10.0
"""Seconds a message may take to be answered (or its stream to end)."""

_finite = st.floats(allow_nan=False, allow_infinity=False)
OVERRIDES: dict[str, st.SearchStrategy[Any]] = {
    # Speaking for another node is checked on its own (test_fuzz_hello_for_another_node).
    **{
        f"fleet.v1.{name}.node_id": st.just(NODE)
        for name in (
            "RegisterNodeRequest",
            "SyncAgentStatesRequest",
            "ReportMetricsRequest",
            "ReportJobStatusRequest",
            "UploadJobOutputRequest",
        )
    },
    "fleet.v1.MetricData.type": st.one_of(st.sampled_from(["cpu", "memory"]), text),
    "fleet.v1.MetricData.values": st.one_of(
        st.dictionaries(plausible_text, _finite, min_size=1, max_size=4),
        st.dictionaries(text, st.floats(), max_size=4),
    ),
    "fleet.v1.RegisterNodeRequest.daemon_address": st.one_of(st.just(""), text),
}


def hello(node: str) -> manager_pb2.ConnectRequest:
    """A valid first message for `node`, with no listening address."""
    return manager_pb2.ConnectRequest(hello=registration(node, ""))


def bodies() -> dict[str, manager_pb2.ConnectRequest]:
    """One valid message per upward body (a second hello is refused: only the first)."""
    now = int(time.time() * 1000)
    state = manager_pb2.AgentState(
        agent_id="web", status=common_pb2.AGENT_STATUS_RUNNING, pid=42, start_time=now
    )
    return {
        "hello": hello(NODE),
        "agent_states": manager_pb2.ConnectRequest(
            agent_states=manager_pb2.SyncAgentStatesRequest(node_id=NODE, states=[state])
        ),
        "metrics": manager_pb2.ConnectRequest(
            metrics=manager_pb2.ReportMetricsRequest(
                node_id=NODE,
                sequence=now,
                metrics=[common_pb2.MetricData(type="cpu", timestamp=now, values={"u": 0.5})],
            )
        ),
        "job_status": manager_pb2.ConnectRequest(
            job_status=manager_pb2.ReportJobStatusRequest(
                node_id=NODE, job_id="no-such-job", state=jobs_pb2.JOB_TARGET_STATE_RUNNING
            )
        ),
        "job_output": manager_pb2.ConnectRequest(
            job_output=manager_pb2.UploadJobOutputRequest(
                node_id=NODE, job_id="no-such-job", offset=0, data=b"out"
            )
        ),
        # A reply to a command never sent (unknown request id).
        "result": manager_pb2.ConnectRequest(
            result=manager_pb2.CommandResult(request_id=12345, response=b"\x08\x01", end=True)
        ),
    }


def connect_requests() -> st.SearchStrategy[manager_pb2.ConnectRequest]:
    """Anything of ConnectRequest's type, or a valid body with a few fields fuzzed."""
    valid = list(bodies().values())
    return st.one_of(
        message(manager_pb2.ConnectRequest.DESCRIPTOR, OVERRIDES),
        st.sampled_from(valid).flatmap(lambda base: near(base, OVERRIDES)),
    )


@dataclass
class Env:
    """The live manager, n1's stream (reopened when a refusal ends it) and n2's."""

    pki: ModulePki
    manager: ManagerServer
    channels: dict[str, aio.Channel]
    streams: dict[str, ControlStream] = field(default_factory=dict)

    async def open(self, node: str) -> ControlStream:
        """A new stream for `node`, welcomed."""
        stream = ControlStream(self.channels[node])
        welcome = await stream.request(hello(node), within=ANSWER_WITHIN)
        assert welcome.success, welcome
        self.streams[node] = stream
        return stream

    async def stream(self, node: str) -> ControlStream:
        """`node`'s open stream (a new one if the last was ended)."""
        current = self.streams.get(node)
        if current is None or current.ended is not None:
            return await self.open(node)
        if current.ids_left < 8:  # a fuzzed id near 2**64 used them up: a new stream
            await current.close()
            return await self.open(node)
        return current


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(
    module_pki: ModulePki, tmp_path_factory: pytest.TempPathFactory, manager_database: str
) -> AsyncIterator[Env]:
    """One manager per module and backend; n1 and n2 connected on their streams."""
    root: Path = tmp_path_factory.mktemp("manager")
    async with live_manager(module_pki, root, manager_database) as manager:
        chans = {
            n: open_channel(manager.port, module_pki.issue("node", n), manager_name(module_pki))
            for n in (NODE, BYSTANDER, STRANGER)
        }
        e = Env(module_pki, manager, chans)
        try:
            await e.open(NODE)
            await e.open(BYSTANDER)
            yield e
        finally:
            for s in e.streams.values():
                await s.close()
            for c in chans.values():
                await c.close(None)


async def bystander_answers(env: Env) -> None:
    """n2's stream is the one it opened, and it still stores a batch."""
    stream = env.streams[BYSTANDER]
    assert stream.ended is None, f"n2's stream ended: {stream.ended}"
    now = int(time.time() * 1000)
    ack = await stream.request(
        manager_pb2.ConnectRequest(
            metrics=manager_pb2.ReportMetricsRequest(
                node_id=BYSTANDER,
                sequence=stream.next_id() + now,
                metrics=[common_pb2.MetricData(type="cpu", timestamp=now, values={"u": 1.0})],
            )
        ),
        within=ANSWER_WITHIN,
    )
    assert ack.success, ack


@pytest.mark.asyncio(loop_scope="module")
@FUZZ
@given(
    request=connect_requests(),
    fresh_id=st.sampled_from([True, True, True, False]),  # mostly the next id, as a daemon
    other_id=st.integers(0, 2**64 - 1),
)
async def test_fuzz_connect_messages(
    env: Env, request: manager_pb2.ConnectRequest, fresh_id: bool, other_id: int
) -> None:
    """Any message on an open stream: answered or the stream ends with a proper status;
    a refusal stores nothing; the bystander's stream is untouched."""
    stream = await env.stream(NODE)
    request.id = stream.next_id() if fresh_id else other_id
    body = request.WhichOneof("body")
    # Read every time: the bystander's check after each example stores a batch.
    before = await db_state(env.manager.db)
    refused: grpc.StatusCode | None = None
    await stream.write(request)
    if body == "result" or body is None:
        # Results carry their own id and have no answer; nor has a message with no body
        # (unless the manager refuses it): only a refusal, or nothing, may come back.
        try:
            answer = await stream.answer_to(request.id, 0.3)
            if answer.WhichOneof("body") == "error":
                refused = status_code(answer.error.code)
        except TimeoutError:
            pass
        except StreamEnded as ended:
            refused = ended.code
    else:
        try:
            answer = await stream.answer_to(request.id, ANSWER_WITHIN)
            if answer.WhichOneof("body") == "error":
                refused = status_code(answer.error.code)
                assert answer.error.message, "a refusal says why"
        except StreamEnded as ended:
            refused = ended.code
        except TimeoutError:
            raise AssertionError(
                f"a {body} message (id {request.id}) was neither answered nor refused"
            ) from None
    event(f"{body}: {refused.name if refused else 'OK'}")
    assert refused not in NEVER, f"{body} refused with {refused}: {request!r}"
    if refused is not None:
        after = await db_state(env.manager.db)
        assert after == before, f"{body} refused with {refused.name} but the database changed"
    await bystander_answers(env)


@pytest.mark.asyncio(loop_scope="module")
@settings(FUZZ, max_examples=max(10, FUZZ.max_examples // 6))
@given(
    first=st.one_of(
        connect_requests().filter(lambda r: r.WhichOneof("body") != "hello"),
        st.builds(
            lambda n: manager_pb2.ConnectRequest(hello=registration(n, "")),
            text.filter(lambda t: t != STRANGER),
        ),
    )
)
async def test_fuzz_first_message_not_own_hello(
    env: Env, first: manager_pb2.ConnectRequest
) -> None:
    """A stream that opens with anything but a hello for its own node is refused
    (never UNKNOWN/INTERNAL) and stores nothing; n2 is untouched."""
    first.id = 1
    before = await db_state(env.manager.db)
    stream = ControlStream(env.channels[STRANGER])
    try:
        await stream.write(first)
        try:
            answer = await stream.answer_to(1, ANSWER_WITHIN)
            body = answer.WhichOneof("body")
            assert body == "error", f"the stream accepted {first!r} as its first message"
            code = status_code(answer.error.code)
        except StreamEnded as ended:
            code = ended.code
        except TimeoutError:  # silence: then the stream must end
            code = (await stream.wait_ended(ANSWER_WITHIN)).code
    finally:
        await stream.close()
    event(code.name)
    assert code not in NEVER, code
    assert code != grpc.StatusCode.OK
    if first.WhichOneof("body") == "hello":
        assert code == grpc.StatusCode.PERMISSION_DENIED, code
    assert await db_state(env.manager.db) == before
    await bystander_answers(env)


@pytest.mark.asyncio(loop_scope="module")
async def test_oversized_message_is_refused_alone(env: Env) -> None:
    """A message over the size limit ends only its own stream, with RESOURCE_EXHAUSTED."""
    stream = await env.stream(NODE)
    before = await db_state(env.manager.db)
    now = int(time.time() * 1000)
    huge = manager_pb2.ConnectRequest(
        id=stream.next_id(),
        metrics=manager_pb2.ReportMetricsRequest(
            node_id=NODE,
            sequence=now,
            metrics=[
                common_pb2.MetricData(
                    type="cpu", timestamp=now, values={f"k{i:07d}": 1.0 for i in range(400_000)}
                )
            ],
        ),
    )
    assert huge.ByteSize() > 8 * 1024 * 1024
    await stream.write(huge)
    try:
        answer = await stream.answer_to(huge.id, ANSWER_WITHIN)
        assert answer.WhichOneof("body") == "error", answer
        code = status_code(answer.error.code)
    except StreamEnded as ended:
        code = ended.code
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, code
    assert await db_state(env.manager.db) == before
    await bystander_answers(env)


@pytest.mark.asyncio(loop_scope="module")
async def test_second_stream_replaces_the_first(env: Env) -> None:
    """A second stream from n1 replaces the first (which ends, not INTERNAL); n2 is untouched."""
    first = await env.stream(NODE)
    second = ControlStream(env.channels[NODE])
    welcome = await second.request(hello(NODE), within=ANSWER_WITHIN)
    assert welcome.success
    ended = await first.wait_ended(ANSWER_WITHIN)
    assert ended.code not in NEVER, ended
    assert ended.code != grpc.StatusCode.OK
    env.streams[NODE] = second
    await bystander_answers(env)


@pytest.mark.asyncio(loop_scope="module")
async def test_manager_still_serves_after_fuzzing(env: Env) -> None:
    """After the fuzzers, health says SERVING and n1 can open a stream and be welcomed."""
    assert await serving(env.channels[NODE], SERVICE_NAME)
    await env.open(NODE)
    await bystander_answers(env)
