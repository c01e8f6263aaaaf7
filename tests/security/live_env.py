"""A live fleet for the security matrix and the fuzzers: real servers, real mTLS, generic calls.

The manager and daemon are started with the integration harness
(`manager_harness`, `daemon_helpers`), once per module. Calls are made
generically from the protobuf method descriptors, so the matrix and the
fuzzers cover every RPC the generated code declares without a stub per RPC.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from daemon_helpers import daemon_config
from enroll_helpers import csr, enroll_settings
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from manager_harness import FakeClock, manager_config, running_manager
from module_pki import ModulePki as ModulePki  # the fuzzers and the matrix take it from here

from daemon.server import DaemonServer
from daemon.supervisor.spec import AgentSpec
from fleet.pki import CertificateAuthority, Identity, Role
from fleet.retry import Backoff
from fleet.tls import TLSConfig, channel_credentials, channel_options
from fleet.v1 import (
    agent_pb2,
    common_pb2,
    daemon_pb2,
    desired_pb2,
    enroll_pb2,
    fleet_pb2,
    jobs_pb2,
    manager_pb2,
    replica_pb2,
)
from manager.config import HttpConfig
from manager.pool import PoolConfig
from manager.server import ManagerServer

SERVICES: dict[str, ServiceDescriptor] = {
    "ManagerService": manager_pb2.DESCRIPTOR.services_by_name["ManagerService"],
    "DaemonService": daemon_pb2.DESCRIPTOR.services_by_name["DaemonService"],
    "FleetService": fleet_pb2.DESCRIPTOR.services_by_name["FleetService"],
    "AgentService": agent_pb2.DESCRIPTOR.services_by_name["AgentService"],
    "EnrollmentService": enroll_pb2.DESCRIPTOR.services_by_name["EnrollmentService"],
    "ReplicaService": replica_pb2.DESCRIPTOR.services_by_name["ReplicaService"],
}
"""Every Fleet gRPC service, from the generated descriptors."""

ENROLLEE = "enrollee"
"""The node the matrix and the fuzzers enroll (with a token made for that name)."""

TRUST_DOMAIN = "fleet.local"
"""The trust domain of every test CA (CertificateAuthority.create's default)."""

MATRIX_REPORT = pytest.StashKey[list[str]]()
"""Tables the matrix test wants shown in pytest's terminal summary."""

SLEEP = shutil.which("sleep") or "/bin/sleep"
"""An agent program that runs until stopped and exits at once on SIGTERM."""

FAST_POOL = PoolConfig(
    call_timeout=3.0,
    connect_timeout=1.0,
    retry=Backoff(initial=0.05, multiplier=2.0, maximum=0.2),
    max_attempts=2,
)
"""Short deadlines so a call through the manager's pool fails quickly."""


def methods(service: str) -> list[MethodDescriptor]:
    """The RPCs of `service` (short name) in declaration order."""
    return list(SERVICES[service].methods)


def rpc_name(method: MethodDescriptor) -> str:
    """'Service.Method', how the matrix and reports name an RPC."""
    return f"{method.containing_service.name}.{method.name}"


def bad_credentials(pki: ModulePki, role: Role, name: str) -> dict[str, grpc.ChannelCredentials]:
    """The identities the handshake must refuse, each claiming <role>/<name>."""
    now = dt.datetime.now(dt.UTC)
    foreign = CertificateAuthority.create(pki.trust_domain).issue(role, name)
    return {
        "none": grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem),
        "other CA": grpc.ssl_channel_credentials(
            root_certificates=pki.ca.cert_pem,
            private_key=foreign.key_pem,
            certificate_chain=foreign.cert_pem,
        ),
        "expired": pki.raw_credentials(
            role, name, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
        ),
        "not yet valid": pki.raw_credentials(
            role, name, not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=30)
        ),
    }


def manager_name(pki: ModulePki) -> str:
    """The TLS name every manager certificate carries (manager.<td>)."""
    return f"manager.{pki.trust_domain}"


def node_name(pki: ModulePki, node_id: str) -> str:
    """The TLS name of node `node_id`'s daemon."""
    return Identity("node", node_id, pki.trust_domain).server_name


def open_channel(
    port: int, creds: grpc.ChannelCredentials | TLSConfig, server_name: str
) -> aio.Channel:
    """An mTLS channel to 127.0.0.1:`port` expecting `server_name`, with its own connection."""
    if isinstance(creds, TLSConfig):
        creds = channel_credentials(creds)
    options = [*channel_options(server_name), ("grpc.use_local_subchannel_pool", 1)]
    return aio.secure_channel(f"127.0.0.1:{port}", creds, options=options)


@asynccontextmanager
async def channels(
    port: int, creds: dict[str, grpc.ChannelCredentials | TLSConfig], server_name: str
) -> AsyncIterator[dict[str, aio.Channel]]:
    """One channel per named identity; all closed afterwards."""
    opened = {label: open_channel(port, c, server_name) for label, c in creds.items()}
    try:
        yield opened
    finally:
        for channel in opened.values():
            await channel.close(None)


@asynccontextmanager
async def live_manager(
    pki: ModulePki,
    root: Path,
    database_url: str = "",
    *,
    enroll: dict[str, Any] | None = None,
    **options: Any,
) -> AsyncIterator[ManagerServer]:
    """A real manager over mTLS (SQLite unless `database_url`); background jobs never fire.

    Enrollment is on (127.0.0.1, an issuing intermediate; `enroll` overrides
    [enroll] keys). `options`: ManagerServer's keyword options (e.g. an
    injected artifact_access).
    """
    config = manager_config(
        pki,
        database_url or f"sqlite+aiosqlite:///{root / 'manager.db'}",
        root / "state",
        metrics={"lifecycle_interval_seconds": 3600.0},
        enroll=enroll_settings(pki.ca, root / "issuer", **(enroll or {})),
    )
    # The JSON/HTTP API on too: the matrix has its rows.
    config = dataclasses.replace(config, pool=FAST_POOL, http=HttpConfig(listen="127.0.0.1:0"))
    async with running_manager(config, FakeClock(), **options) as manager:
        yield manager


@asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """The URL of a fresh database on FLEET_TEST_POSTGRES_URL's server, dropped afterwards.

    Module-scoped fixtures need this (tests/conftest.py's `database_url` is
    per test); same rule: skip without a server, fail under CI=true.
    """
    import asyncpg
    from sqlalchemy.engine import make_url

    url = os.environ.get("FLEET_TEST_POSTGRES_URL", "")
    problem = "" if url else "FLEET_TEST_POSTGRES_URL is not set (make test sets it)"
    admin_dsn = ""
    if url:
        server = make_url(url)
        admin_dsn = server.set(drivername="postgresql").render_as_string(hide_password=False)
        try:
            admin = await asyncpg.connect(admin_dsn, timeout=5)
        except (OSError, asyncpg.PostgresError) as exc:
            problem = f"PostgreSQL at {server!r} is unreachable: {exc}"
    if problem:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"PostgreSQL is required under CI: {problem}")
        pytest.skip(problem)
    name = f"fleet_sec_{secrets.token_hex(6)}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        admin = await asyncpg.connect(admin_dsn, timeout=5)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@asynccontextmanager
async def live_daemon(
    pki: ModulePki, root: Path, node_id: str, agents: Sequence[AgentSpec]
) -> AsyncIterator[DaemonServer]:
    """A real daemon for `node_id` supervising `agents`; its link dials nothing that answers."""
    cfg = daemon_config(root, pki.issue("node", node_id), tuple(agents), stop_agents_on_exit=True)
    server = DaemonServer(cfg)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(1.0)


@dataclass(frozen=True)
class Outcome:
    """What one call came back with."""

    code: grpc.StatusCode
    """The status (OK for a reply, or for a stream still open when we stopped reading)."""
    details: str
    """The status message, empty for OK."""


async def invoke(
    channel: aio.Channel,
    method: MethodDescriptor,
    request: Message,
    *,
    deadline: float = 10.0,
    idle: float = 1.5,
    max_messages: int = 20,
) -> Outcome:
    """Call `method` with `request`; a stream is read until it ends, stays idle, or is long."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    reply_type = GetMessageClass(method.output_type)

    def serialize(m: Message) -> bytes:
        return m.SerializeToString()

    try:
        if method.client_streaming and method.server_streaming:  # Connect: hello, first answer
            return await _first_answer(channel, path, request, reply_type, deadline)
        if method.client_streaming:  # PushArtifact: `request` as a stream of one message
            upload = channel.stream_unary(
                path, request_serializer=serialize, response_deserializer=reply_type.FromString
            )
            await upload(iter([request]), timeout=deadline)
            return Outcome(grpc.StatusCode.OK, "")
        if not method.server_streaming:
            unary = channel.unary_unary(
                path, request_serializer=serialize, response_deserializer=reply_type.FromString
            )
            await unary(request, timeout=deadline)
            return Outcome(grpc.StatusCode.OK, "")
        stream = channel.unary_stream(
            path, request_serializer=serialize, response_deserializer=reply_type.FromString
        )
        call = stream(request, timeout=deadline)
        try:
            for _ in range(max_messages):
                # A following stream stays open by design: idle counts as OK. Generous,
                # since under load a refusal (the role check) can take longer than
                # an idle guess; only streams that really stay open pay for it.
                msg = await asyncio.wait_for(call.read(), idle)
                if msg is aio.EOF:
                    break
        except TimeoutError:
            pass
        finally:
            call.cancel()
        code = await call.code()
        if code == grpc.StatusCode.CANCELLED:
            return Outcome(grpc.StatusCode.OK, "")
        return Outcome(code, await call.details() or "")
    except aio.AioRpcError as exc:
        return Outcome(exc.code(), exc.details() or "")


async def _first_answer(
    channel: aio.Channel,
    path: str,
    request: Message,
    reply_type: Any,
    deadline: float,
) -> Outcome:
    """A bidirectional stream (Connect): send `request`, read the answer to it.

    A refusal can end the stream with a status or answer with a
    ConnectError body (the status the unary RPC would have had): either is
    the outcome. A stream that answers and stays open is OK.
    """
    bidi = channel.stream_stream(
        path,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=reply_type.FromString,
    )
    call = bidi(timeout=deadline)
    try:
        await call.write(request)
        # Commands may come before the answer; only the answer to our message counts.
        while True:
            try:
                msg = await asyncio.wait_for(call.read(), deadline)
            except TimeoutError:
                return Outcome(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer on the stream")
            if msg is aio.EOF:
                break
            if msg.WhichOneof("body") == "command":
                continue
            if msg.WhichOneof("body") == "error":
                return Outcome(status_code(msg.error.code), msg.error.message)
            return Outcome(grpc.StatusCode.OK, "")
    except aio.AioRpcError as exc:
        return Outcome(exc.code(), exc.details() or "")
    finally:
        call.cancel()
    code = await call.code()
    if code == grpc.StatusCode.CANCELLED:
        return Outcome(grpc.StatusCode.OK, "")
    return Outcome(code, await call.details() or "")


def status_code(value: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a numeric code (ConnectError.code); UNKNOWN if none is."""
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


async def serving(channel: aio.Channel, service: str) -> bool:
    """True if the server's gRPC health check says `service` (full name) is SERVING."""
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def registration(node_id: str, daemon_address: str) -> manager_pb2.RegisterNodeRequest:
    """A valid RegisterNode for `node_id` whose daemon listens at `daemon_address`."""
    return manager_pb2.RegisterNodeRequest(
        node_id=node_id,
        hostname=f"{node_id}.example.com",
        ip="127.0.0.1",
        os="linux",
        arch="x86_64",
        labels={"env": "test"},
        daemon_version="0.1.0",
        agent_version="0.1.0",
        daemon_address=daemon_address,
    )


ARTIFACT = ("matrix", "1")
"""An empty artifact (name, version) the matrix pushes and node a is assigned."""
EMPTY_DIGEST = "sha256:" + hashlib.sha256(b"").hexdigest()
"""Its digest."""


def artifact_upload() -> fleet_pb2.FleetServicePushArtifactRequest:
    """The whole PushArtifact stream of the empty artifact: its upload message."""
    name, version = ARTIFACT
    return fleet_pb2.FleetServicePushArtifactRequest(
        upload=desired_pb2.ArtifactUpload(
            name=name, version=version, digest=EMPTY_DIGEST, size_bytes=0
        )
    )


def requests(daemon_port: int, node: str = "a") -> dict[str, Message]:
    """'Service.Method' -> a request the allowed identity gets OK (or NOT_FOUND) for.

    A client-streaming RPC (PushArtifact) gets its request as a stream of one.
    """
    now = int(time.time() * 1000)
    name, version = ARTIFACT
    op = common_pb2.AGENT_OPERATION_RESTART
    sdk_spec = common_pb2.AgentSpec(id="sleeper", argv=[SLEEP, "1000"], start_secs=0.0)
    return {
        # ManagerService: the node about itself.
        "ManagerService.RegisterNode": registration(node, f"127.0.0.1:{daemon_port}"),
        "ManagerService.Heartbeat": manager_pb2.HeartbeatRequest(node_id=node, timestamp=now),
        "ManagerService.ReportMetrics": manager_pb2.ReportMetricsRequest(
            node_id=node,
            sequence=1,
            metrics=[common_pb2.MetricData(type="cpu", timestamp=now, values={"usage": 1.0})],
        ),
        "ManagerService.SyncAgentStates": manager_pb2.SyncAgentStatesRequest(
            node_id=node,
            states=[
                manager_pb2.AgentState(agent_id="sleeper", status=common_pb2.AGENT_STATUS_RUNNING)
            ],
        ),
        "ManagerService.DownloadArtifact": manager_pb2.DownloadArtifactRequest(
            node_id=node, digest=EMPTY_DIGEST
        ),
        # A job that does not exist: NOT_FOUND after the identity check.
        "ManagerService.ReportJobStatus": manager_pb2.ReportJobStatusRequest(
            node_id=node, job_id="no-such-job", state=jobs_pb2.JOB_TARGET_STATE_RUNNING
        ),
        "ManagerService.UploadJobOutput": manager_pb2.UploadJobOutputRequest(
            node_id=node, job_id="no-such-job", data=b"x"
        ),
        # The control channel: its hello, answered by a welcome.
        "ManagerService.Connect": manager_pb2.ConnectRequest(
            id=1, hello=registration(node, f"127.0.0.1:{daemon_port}")
        ),
        # A CSR for a new key of the node's own name: a certificate is issued.
        "ManagerService.RenewCertificate": manager_pb2.RenewCertificateRequest(
            node_id=node, csr_pem=csr(node, TRUST_DOMAIN)[1]
        ),
        # The token is filled in once the test made one (node_name ENROLLEE, many uses).
        "EnrollmentService.Enroll": enroll_pb2.EnrollRequest(
            node_name=ENROLLEE, csr_pem=csr(ENROLLEE, TRUST_DOMAIN)[1]
        ),
        # DaemonService on the node's daemon (agents "sleeper" and "sdk").
        "DaemonService.ListAgents": daemon_pb2.ListAgentsRequest(),
        "DaemonService.OperateAgent": daemon_pb2.OperateAgentRequest(
            agent_id="absent", operation=op
        ),
        "DaemonService.GetAgentMetrics": daemon_pb2.GetAgentMetricsRequest(agent_id="sleeper"),
        # A stale version: refused (FAILED_PRECONDITION) after the authorisation check.
        "DaemonService.PushUpdate": daemon_pb2.PushUpdateRequest(version=0, agents=[sdk_spec]),
        "DaemonService.ReadAgentLog": daemon_pb2.ReadAgentLogRequest(agent_id="sleeper"),
        # A harmless job; cancelling and reading it after it ran answer its state and output.
        "DaemonService.StartJob": daemon_pb2.StartJobRequest(
            job_id="matrix-job",
            steps=[jobs_pb2.JobStep(command=jobs_pb2.JobCommand(argv=[SLEEP, "0"]))],
        ),
        "DaemonService.CancelJob": daemon_pb2.CancelJobRequest(job_id="matrix-job"),
        "DaemonService.ReadJobOutput": daemon_pb2.ReadJobOutputRequest(job_id="matrix-job"),
        # ReplicaService: manager to manager. Node a streams to no replica here, so a
        # real call would be UNAVAILABLE; a method the daemon does not serve is
        # INVALID_ARGUMENT, after the identity check.
        "ReplicaService.Relay": replica_pb2.RelayRequest(node_id=node, method="NoSuchMethod"),
        "ReplicaService.RelayStream": replica_pb2.RelayStreamRequest(
            node_id=node, method="NoSuchMethod"
        ),
        # FleetService: through the manager, to the node's daemon where needed.
        "FleetService.ListNodes": fleet_pb2.FleetServiceListNodesRequest(),
        # Jobs: a plan stores nothing; the others name a job that does not exist.
        "FleetService.RunJob": fleet_pb2.FleetServiceRunJobRequest(
            spec=jobs_pb2.JobSpec(
                steps=[jobs_pb2.JobStep(command=jobs_pb2.JobCommand(argv=["true"]))],
                selector=common_pb2.LabelSelector(match_labels={"env": "test"}),
            ),
            plan=True,
        ),
        "FleetService.ListJobs": fleet_pb2.FleetServiceListJobsRequest(),
        "FleetService.GetJob": fleet_pb2.FleetServiceGetJobRequest(job_id="no-such-job"),
        "FleetService.WatchJob": fleet_pb2.FleetServiceWatchJobRequest(job_id="no-such-job"),
        "FleetService.ReadJobOutput": fleet_pb2.FleetServiceReadJobOutputRequest(
            job_id="no-such-job"
        ),
        "FleetService.CancelJob": fleet_pb2.FleetServiceCancelJobRequest(job_id="no-such-job"),
        "FleetService.RerunJob": fleet_pb2.FleetServiceRerunJobRequest(
            job_id="no-such-job", failed_only=True
        ),
        "FleetService.GetNode": fleet_pb2.FleetServiceGetNodeRequest(node_id=node),
        "FleetService.UpdateNodeLabels": fleet_pb2.FleetServiceUpdateNodeLabelsRequest(
            node_id=node, set={"team": "security"}
        ),
        "FleetService.ListAgents": fleet_pb2.FleetServiceListAgentsRequest(node_id=node),
        "FleetService.OperateAgent": fleet_pb2.FleetServiceOperateAgentRequest(
            node_id=node, agent_id="absent", operation=op
        ),
        "FleetService.OperateAgents": fleet_pb2.FleetServiceOperateAgentsRequest(
            selector=common_pb2.LabelSelector(match_labels={"env": "test"}),
            agent_id="sleeper",
            operation=op,
            plan=True,
        ),
        "FleetService.QueryMetrics": fleet_pb2.FleetServiceQueryMetricsRequest(
            node_id=node, type="cpu", start_time=now - 60_000, end_time=now + 60_000
        ),
        "FleetService.ListMetricTypes": fleet_pb2.FleetServiceListMetricTypesRequest(node_id=node),
        "FleetService.GetAgentMetrics": fleet_pb2.FleetServiceGetAgentMetricsRequest(
            node_id=node, agent_id="sleeper"
        ),
        "FleetService.ReadAgentLog": fleet_pb2.FleetServiceReadAgentLogRequest(
            node_id=node, agent_id="sleeper"
        ),
        "FleetService.WatchEvents": fleet_pb2.FleetServiceWatchEventsRequest(),
        **desired_requests(),
        **enrollment_requests(),
        "FleetService.PushArtifact": artifact_upload(),
        "FleetService.ListArtifacts": fleet_pb2.FleetServiceListArtifactsRequest(),
        "FleetService.GetArtifact": fleet_pb2.FleetServiceGetArtifactRequest(
            name=name, version=version
        ),
        # A version never pushed: NOT_FOUND (the matrix must not delete what it reads).
        "FleetService.DeleteArtifact": fleet_pb2.FleetServiceDeleteArtifactRequest(
            name=name, version="never-pushed"
        ),
        # AgentService: the "agent for another" column names "sleeper" instead.
        "AgentService.Register": agent_pb2.AgentServiceRegisterRequest(agent_id="sdk"),
        "AgentService.Heartbeat": agent_pb2.AgentServiceHeartbeatRequest(
            agent_id="sdk", timestamp=now
        ),
        "AgentService.ReportMetrics": agent_pb2.AgentServiceReportMetricsRequest(
            agent_id="sdk",
            metrics=[common_pb2.MetricData(type="jobs", timestamp=now, values={"done": 1.0})],
        ),
        "AgentService.GetConfig": agent_pb2.AgentServiceGetConfigRequest(agent_id="sdk"),
        "AgentService.WatchConfig": agent_pb2.AgentServiceWatchConfigRequest(agent_id="sdk"),
    }


def probe_definition() -> desired_pb2.Definition:
    """A definition that selects no node (so applying it never pushes anything)."""
    return desired_pb2.Definition(
        name="probe",
        selector=common_pb2.LabelSelector(match_labels={"env": "nowhere"}),
        agent=common_pb2.AgentSpec(argv=[SLEEP, "1000"]),
    )


def desired_requests() -> dict[str, Message]:
    """The desired-state RPCs: plans and reads, and an absent name where one is needed."""
    f = fleet_pb2
    return {
        "FleetService.ApplyDefinitions": f.FleetServiceApplyDefinitionsRequest(
            definitions=[probe_definition()], plan=True
        ),
        "FleetService.ListDefinitions": f.FleetServiceListDefinitionsRequest(),
        "FleetService.GetDefinition": f.FleetServiceGetDefinitionRequest(name="absent"),
        "FleetService.ListDefinitionRevisions": f.FleetServiceListDefinitionRevisionsRequest(
            name="absent"
        ),
        "FleetService.DeleteDefinition": f.FleetServiceDeleteDefinitionRequest(
            name="absent", plan=True
        ),
        "FleetService.GetRollout": f.FleetServiceGetRolloutRequest(name="absent"),
        "FleetService.ListRollouts": f.FleetServiceListRolloutsRequest(),
        "FleetService.WatchRollout": f.FleetServiceWatchRolloutRequest(name="absent"),
        "FleetService.PauseRollout": f.FleetServicePauseRolloutRequest(name="absent"),
        "FleetService.ResumeRollout": f.FleetServiceResumeRolloutRequest(name="absent"),
        "FleetService.PromoteRollout": f.FleetServicePromoteRolloutRequest(name="absent"),
        "FleetService.AbortRollout": f.FleetServiceAbortRolloutRequest(name="absent"),
        "FleetService.UndoRollout": f.FleetServiceUndoRolloutRequest(name="absent", plan=True),
    }


def enrollment_requests() -> dict[str, Message]:
    """Join tokens and node removal: harmless ones (a node that does not exist where a
    call would remove one; revoking a name nobody uses)."""
    f = fleet_pb2
    return {
        "FleetService.CreateJoinToken": f.FleetServiceCreateJoinTokenRequest(
            node_name=ENROLLEE, uses=100
        ),
        "FleetService.ListJoinTokens": f.FleetServiceListJoinTokensRequest(all=True),
        "FleetService.RevokeJoinToken": f.FleetServiceRevokeJoinTokenRequest(token_id="nosuchid"),
        "FleetService.DeleteNode": f.FleetServiceDeleteNodeRequest(node_id="absent", force=True),
        "FleetService.RevokeNode": f.FleetServiceRevokeNodeRequest(
            node_id="never-enrolled", reason="the security matrix"
        ),
    }


def all_rpcs() -> Iterator[MethodDescriptor]:
    """Every RPC of every Fleet service."""
    for service in SERVICES:
        yield from methods(service)
