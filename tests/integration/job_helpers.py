"""A test daemon for the job driver: a real DaemonService (node certificate, mTLS)
that takes StartJob/CancelJob and reports back to the real manager with
ReportJobStatus/UploadJobOutput as its own node. (The real daemon's job runner
is tested end to end elsewhere; this one runs nothing.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet_harness import operator_stub
from grpc import aio
from manager_harness import FakeClock, manager_config, running_manager

from fleet.interceptors import ErrorMappingInterceptor
from fleet.tls import channel_credentials, channel_options, require_role, server_credentials
from fleet.v1 import daemon_pb2, daemon_pb2_grpc, jobs_pb2, manager_pb2, manager_pb2_grpc

S = jobs_pb2


@dataclass
class JobDaemon(daemon_pb2_grpc.DaemonServiceServicer):
    """Answers StartJob, then reports RUNNING, uploads `output`, reports `result`."""

    node_id: str
    manager: manager_pb2_grpc.ManagerServiceStub
    result: int = S.JOB_TARGET_STATE_SUCCESS
    exit_code: int = 0
    output: bytes = b""
    hold: bool = False
    """Keep the job RUNNING until cancelled."""
    starts: list[str] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _cancelled: dict[str, asyncio.Event] = field(default_factory=dict)

    async def StartJob(self, request: Any, context: Any) -> daemon_pb2.StartJobResponse:
        require_role(context, "manager")
        self.starts.append(request.job_id)
        if request.job_id not in self._cancelled:
            self._cancelled[request.job_id] = asyncio.Event()
            task = asyncio.create_task(self._run(request.job_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return daemon_pb2.StartJobResponse(state=S.JOB_TARGET_STATE_QUEUED)

    async def CancelJob(self, request: Any, context: Any) -> daemon_pb2.CancelJobResponse:
        require_role(context, "manager")
        self.cancels.append(request.job_id)
        if request.job_id in self._cancelled:
            self._cancelled[request.job_id].set()
        return daemon_pb2.CancelJobResponse(state=S.JOB_TARGET_STATE_CANCELLED)

    async def _report(self, job_id: str, state: int, **fields: Any) -> bool:
        reply = await self.manager.ReportJobStatus(
            manager_pb2.ReportJobStatusRequest(
                node_id=self.node_id, job_id=job_id, state=state, **fields
            )
        )
        return bool(reply.cancel)

    async def _run(self, job_id: str) -> None:
        await asyncio.sleep(0.01)  # the StartJob answer usually arrives first
        await self._report(job_id, S.JOB_TARGET_STATE_RUNNING, started_at=1)
        if self.output:
            await self.manager.UploadJobOutput(
                manager_pb2.UploadJobOutputRequest(
                    node_id=self.node_id, job_id=job_id, offset=0, data=self.output
                )
            )
        if self.hold:
            await self._cancelled[job_id].wait()
            await self._report(job_id, S.JOB_TARGET_STATE_CANCELLED, reason="cancelled", ended_at=2)
            return
        await self._report(
            job_id,
            self.result,
            exit_code=self.exit_code,
            started_at=1,
            ended_at=2,
            output_bytes=len(self.output),
            reason="" if self.result == S.JOB_TARGET_STATE_SUCCESS else "exit status 1",
        )


@dataclass
class Node:
    """One test daemon: its servicer and address."""

    node_id: str
    address: str
    daemon: JobDaemon


@contextlib.asynccontextmanager
async def job_daemons(pki: Any, manager_port: int) -> AsyncIterator[Any]:
    """`start(node_id, labels=..., jobs_disabled=..., **behaviour)`: a registered JobDaemon."""
    servers: list[aio.Server] = []
    channels: list[aio.Channel] = []

    async def start(
        node_id: str,
        *,
        labels: dict[str, str] | None = None,
        jobs_disabled: bool = False,
        **behaviour: Any,
    ) -> Node:
        tls = pki.issue("node", node_id)
        channel = aio.secure_channel(
            f"127.0.0.1:{manager_port}",
            channel_credentials(tls),
            options=channel_options(f"manager.{pki.trust_domain}"),
        )
        channels.append(channel)
        stub = manager_pb2_grpc.ManagerServiceStub(channel)
        daemon = JobDaemon(node_id, stub, **behaviour)
        server = aio.server(interceptors=[ErrorMappingInterceptor()])
        daemon_pb2_grpc.add_DaemonServiceServicer_to_server(daemon, server)
        port = server.add_secure_port("127.0.0.1:0", server_credentials(tls))
        await server.start()
        servers.append(server)
        address = f"127.0.0.1:{port}"
        await stub.RegisterNode(
            manager_pb2.RegisterNodeRequest(
                node_id=node_id,
                hostname=f"{node_id}.example",
                ip="127.0.0.1",
                os="linux",
                arch="x86_64",
                labels=labels or {"env": "prod"},
                daemon_version="0.1.0",
                agent_version="0.1.0",
                daemon_address=address,
                jobs_disabled=jobs_disabled,
            )
        )
        return Node(node_id, address, daemon)

    try:
        yield start
    finally:
        for server in servers:
            await server.stop(None)
        for channel in channels:
            await channel.close(None)


@contextlib.asynccontextmanager
async def job_env(pki: Any, tmp_path: Path, database_url: str) -> AsyncIterator[Any]:
    """(a running manager on `database_url`, an operator's FleetService stub, `job_daemons`'
    start) for the job RPC tests."""
    config = manager_config(pki, database_url, tmp_path / "state")
    async with (
        running_manager(config, FakeClock()) as manager,
        operator_stub(pki, manager.port) as stub,
        job_daemons(pki, manager.port) as start,
    ):
        yield manager, stub, start


def command(*argv: str, **spec: Any) -> jobs_pb2.JobSpec:
    """A one-step JobSpec running argv, with spec fields set."""
    return jobs_pb2.JobSpec(
        steps=[jobs_pb2.JobStep(command=jobs_pb2.JobCommand(argv=list(argv)))], **spec
    )
