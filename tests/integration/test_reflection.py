"""Server reflection, v1 and v1alpha, on every Fleet server: manager, daemon, agent socket.

Stock clients (grpcurl, grpcui, Postman) ask for ``grpc.reflection.v1`` first.
The client here calls each version's method path with grpcio-reflection's
v1alpha messages, which are the same bytes as v1's, as a v1 client's are.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import client_channel, daemon_config, short_tmp
from google.protobuf import descriptor_pb2
from grpc import aio
from grpc_reflection.v1alpha import reflection_pb2
from manager_harness import manager_config, running_manager

from daemon.server import DaemonServer
from fleet.tls import channel_credentials, channel_options

VERSIONS = ("v1", "v1alpha")
REFLECTION = {f"grpc.reflection.{v}.ServerReflection" for v in VERSIONS}
HEALTH = "grpc.health.v1.Health"


@dataclass(frozen=True)
class Server:
    """A channel to one Fleet server and the service it exists for."""

    channel: aio.Channel
    service: str
    proto_file: str


@pytest.fixture
async def servers(pki: Any, tmp_path: Path) -> AsyncIterator[dict[str, Server]]:
    """A real manager, a real daemon and its agent socket, each with a channel."""
    config = manager_config(pki, f"sqlite+aiosqlite:///{tmp_path / 'm.db'}", tmp_path / "state")
    with short_tmp() as root:
        daemon = DaemonServer(daemon_config(root, pki.issue("node", "n1"), ()))
        async with running_manager(config) as manager:
            await daemon.start()
            channels = {
                "manager": Server(
                    aio.secure_channel(
                        f"127.0.0.1:{manager.port}",
                        channel_credentials(pki.issue("operator", "alice")),
                        options=channel_options(f"manager.{pki.trust_domain}"),
                    ),
                    "fleet.v1.FleetService",
                    "fleet/v1/fleet.proto",
                ),
                "daemon": Server(
                    client_channel(pki.issue("manager", "m"), daemon.port, "n1", pki.trust_domain),
                    "fleet.v1.DaemonService",
                    "fleet/v1/daemon.proto",
                ),
                "agent socket": Server(
                    aio.insecure_channel(f"unix:{daemon.socket_path}"),
                    "fleet.v1.AgentService",
                    "fleet/v1/agent.proto",
                ),
            }
            try:
                yield channels
            finally:
                for server in channels.values():
                    await server.channel.close()
                await daemon.stop(1.0)


async def ask(
    channel: aio.Channel, version: str, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    """One ServerReflectionInfo exchange on `version`'s method path."""
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    answers = [answer async for answer in call(iter([request]), timeout=10)]
    assert len(answers) == 1
    return answers[0]


@pytest.mark.parametrize("version", VERSIONS)
async def test_every_server_lists_its_services_on_both_versions(
    servers: dict[str, Server], version: str
) -> None:
    """list_services names the server's own service, health and both reflection versions."""
    for where, server in servers.items():
        answer = await ask(
            server.channel, version, reflection_pb2.ServerReflectionRequest(list_services="")
        )
        names = {s.name for s in answer.list_services_response.service}
        assert {server.service, HEALTH} | REFLECTION <= names, where


@pytest.mark.parametrize("version", VERSIONS)
async def test_every_server_describes_its_service_on_both_versions(
    servers: dict[str, Server], version: str
) -> None:
    """file_containing_symbol answers the .proto file that defines the server's service."""
    for where, server in servers.items():
        answer = await ask(
            server.channel,
            version,
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=server.service),
        )
        assert not answer.HasField("error_response"), (where, answer.error_response)
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in answer.file_descriptor_response.file_descriptor_proto
        ]
        (mine,) = [f for f in files if f.name == server.proto_file]
        assert server.service.rsplit(".", 1)[1] in [s.name for s in mine.service], where
