"""fleet.errors map to gRPC status codes in one interceptor, and back on clients."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

from fleet import errors
from fleet.interceptors import MAX_DETAILS, ErrorMappingInterceptor
from fleet.pki import Identity
from fleet.tls import channel_credentials, channel_options, server_credentials
from fleet.v1 import manager_pb2

SERVICE = "fleet.test.Errors"
MAPPED = [
    errors.InvalidArgument,
    errors.NotFound,
    errors.FailedPrecondition,
    errors.PermissionDenied,
    errors.Unauthenticated,
    errors.ResourceExhausted,
    errors.Unavailable,
    errors.DeadlineExceeded,
]
BY_NAME: dict[str, type[errors.FleetError]] = {cls.__name__: cls for cls in MAPPED}


def _fail(name: str) -> None:
    if name.startswith("long"):
        raise errors.InvalidArgument(f"bad value {name!r}", field="labels")
    if name == "bug":
        raise ZeroDivisionError("a bug in a servicer")
    if name == "missing-agent":
        about = errors.Resource("agent", "web", node="node-1")
        raise errors.NotFound("agent 'web' is not supervised on node-1", resource=about)
    raise BY_NAME[name](f"{name} raised on purpose")


async def _unary(request: manager_pb2.HeartbeatRequest, context: Any) -> Any:
    _fail(request.node_id)
    return manager_pb2.HeartbeatResponse(success=True)


async def _stream(request: manager_pb2.HeartbeatRequest, context: Any) -> AsyncIterator[Any]:
    yield manager_pb2.HeartbeatResponse(success=True)
    _fail(request.node_id)


@pytest.fixture
async def errors_channel(pki: Any) -> AsyncIterator[aio.Channel]:
    """A real mTLS server whose handlers raise what the request names."""
    server_tls = pki.issue("manager", "m1")
    client_tls = pki.issue("operator", "ops")
    kwargs = {
        "request_deserializer": manager_pb2.HeartbeatRequest.FromString,
        "response_serializer": manager_pb2.HeartbeatResponse.SerializeToString,
    }
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary, **kwargs),
            "Stream": grpc.unary_stream_rpc_method_handler(_stream, **kwargs),
        },
    )
    server = aio.server(interceptors=[ErrorMappingInterceptor()])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(server_tls))
    await server.start()
    server_name = Identity("manager", "m1", pki.trust_domain).server_name
    channel = aio.secure_channel(
        f"127.0.0.1:{port}", channel_credentials(client_tls), options=channel_options(server_name)
    )
    try:
        yield channel
    finally:
        await channel.close()
        await server.stop(None)


async def _drain(call: Any) -> list[Any]:
    """Await a unary call, or read a stream to its end."""
    if isinstance(call, aio.UnaryUnaryCall):
        return [await call]
    return [item async for item in call]


def _call(channel: aio.Channel, method: str) -> Any:
    factory = channel.unary_unary if method == "Unary" else channel.unary_stream
    return factory(
        f"/{SERVICE}/{method}",
        request_serializer=manager_pb2.HeartbeatRequest.SerializeToString,
        response_deserializer=manager_pb2.HeartbeatResponse.FromString,
    )


@pytest.mark.parametrize("cls", MAPPED, ids=lambda c: c.__name__)
async def test_unary_domain_error_becomes_its_status(errors_channel: aio.Channel, cls: Any) -> None:
    """A FleetError raised in a unary handler reaches the client as its own code and message."""
    with pytest.raises(aio.AioRpcError) as info:
        await _call(errors_channel, "Unary")(manager_pb2.HeartbeatRequest(node_id=cls.__name__))
    assert info.value.code() == cls.code
    assert info.value.details() == f"{cls.__name__} raised on purpose"
    translated = errors.from_rpc_error(info.value, target="node-7")
    assert type(translated) is cls
    assert translated.message == f"node-7: {cls.__name__} raised on purpose"


async def test_stream_domain_error_after_first_message(errors_channel: aio.Channel) -> None:
    """A stream delivers what it yielded, then ends with the raised error's code."""
    call = _call(errors_channel, "Stream")(manager_pb2.HeartbeatRequest(node_id="NotFound"))
    received = []

    async def collect() -> None:
        async for item in call:
            received.append(item)

    with pytest.raises(aio.AioRpcError) as info:
        await collect()
    assert [r.success for r in received] == [True]
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("method", ["Unary", "Stream"])
async def test_unexpected_exception_is_internal_not_unknown(
    errors_channel: aio.Channel, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug is answered INTERNAL (never UNKNOWN) and logged with its traceback."""
    call = _call(errors_channel, method)(manager_pb2.HeartbeatRequest(node_id="bug"))
    with pytest.raises(aio.AioRpcError) as info:
        await _drain(call)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "see the server log" in (info.value.details() or "")
    assert any("ZeroDivisionError" in (r.exc_text or "") for r in caplog.records)


async def test_long_message_is_cut_so_the_code_survives(errors_channel: aio.Channel) -> None:
    """A message quoting a 20,000-character value still arrives as INVALID_ARGUMENT, cut short."""
    long_name = "long" + "x" * 20_000
    with pytest.raises(aio.AioRpcError) as info:
        await _call(errors_channel, "Unary")(manager_pb2.HeartbeatRequest(node_id=long_name))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert details.startswith("labels: bad value 'longxxx")
    assert len(details) <= MAX_DETAILS
    assert details.endswith("more characters)")


@pytest.mark.parametrize("method", ["Unary", "Stream"])
async def test_the_resource_an_error_is_about_reaches_the_client(
    errors_channel: aio.Channel, method: str
) -> None:
    """A NotFound's Resource travels as trailing metadata and from_rpc_error restores it."""
    call = _call(errors_channel, method)(manager_pb2.HeartbeatRequest(node_id="missing-agent"))
    with pytest.raises(aio.AioRpcError) as info:
        await _drain(call)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    trailing = dict(await call.trailing_metadata() or ())
    assert {k: v for k, v in trailing.items() if k.startswith("fleet-")} == {
        "fleet-resource-kind": "agent",
        "fleet-resource-name": "web",
        "fleet-resource-node": "node-1",
    }
    translated = errors.from_rpc_error(info.value)
    assert type(translated) is errors.NotFound
    assert translated.resource == errors.Resource("agent", "web", node="node-1")


async def test_an_error_without_resource_sends_none(errors_channel: aio.Channel) -> None:
    """Errors that are about nothing in particular carry no resource."""
    with pytest.raises(aio.AioRpcError) as info:
        await _call(errors_channel, "Unary")(manager_pb2.HeartbeatRequest(node_id="NotFound"))
    assert errors.from_rpc_error(info.value).resource is None


def test_a_resource_sends_only_plausible_ids() -> None:
    """An id no valid request has (too long, not printable ASCII) is not sent as metadata."""
    assert errors.Resource("node", "n1").metadata() == (
        ("fleet-resource-kind", "node"),
        ("fleet-resource-name", "n1"),
    )
    assert errors.Resource("agent", "x" * 20_000, node="n1").metadata() == ()
    assert errors.Resource("agent", "wéb", node="n1").metadata() == ()
