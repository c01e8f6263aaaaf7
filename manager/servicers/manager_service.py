"""ManagerService: the RPCs daemons call. Translation and identity only.

Every RPC first checks that the caller's certificate is ``node/<node_id>``
(`fleet.tls.require_node`'s rule, memoised per certificate by
`NodeIdentities`), then hands plain values to the service layer.
Errors are `fleet.errors` exceptions mapped to status codes by the
ErrorMappingInterceptor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc import aio

from fleet.errors import FailedPrecondition
from fleet.v1 import manager_pb2, manager_pb2_grpc
from manager.service.agents import AgentStates, snapshot_records
from manager.service.artifacts import Artifacts
from manager.service.certificates import NO_ISSUER, Certificates
from manager.service.deny_list import DenyList
from manager.service.job_reports import JobReports
from manager.service.metrics import MetricsService
from manager.service.model import MetricPoint, Registration
from manager.service.registry import NodeRegistry
from manager.service.reports import DaemonReports
from manager.service.validation import validate_spec_version
from manager.servicers.artifacts import ArtifactDownloads
from manager.servicers.control import ControlChannel
from manager.servicers.identity import NodeIdentities, caller_pem

__all__ = ["ManagerServicer"]

_Context = aio.ServicerContext[Any, Any]


class ManagerServicer(ArtifactDownloads, manager_pb2_grpc.ManagerServiceServicer):
    """Serves ManagerService for `node/*` callers (artifacts: `ArtifactDownloads`; jobs:
    `manager.service.job_reports`)."""

    def __init__(
        self,
        registry: NodeRegistry,
        metrics: MetricsService,
        agents: AgentStates,
        artifacts: Artifacts,
        *,
        trust_domain: str,
        jobs: JobReports,
        reports: DaemonReports | None = None,
        on_change: Callable[[], None] = lambda: None,
        certificates: Certificates | None = None,
        deny: DenyList | None = None,
    ) -> None:
        self._jobs = jobs
        self._certificates = certificates
        self._registry = registry
        self._metrics = metrics
        self._agents = agents
        self._reports = reports
        self._on_change = on_change
        self._artifacts = artifacts
        self._identities = NodeIdentities(trust_domain, deny=deny)
        self.control: ControlChannel | None = None
        """Serves Connect (set by the server once the streams exist); None: UNIMPLEMENTED."""

    async def RegisterNode(
        self, request: manager_pb2.RegisterNodeRequest, context: _Context
    ) -> manager_pb2.RegisterNodeResponse:
        self._identities.require_node(context, request.node_id)
        validate_spec_version(request.spec_version)
        result = await self._registry.register(
            Registration(
                node_id=request.node_id,
                hostname=request.hostname,
                ip=request.ip,
                os=request.os,
                arch=request.arch,
                labels=dict(request.labels),
                daemon_version=request.daemon_version,
                agent_version=request.agent_version,
                daemon_address=request.daemon_address,
                jobs_disabled=request.jobs_disabled,
                cert_not_after_ms=self._identities.cert_not_after_ms(context),
                clock_ms=request.time,
            )
        )
        if self._reports is not None:
            await self._reports.report(
                request.node_id,
                spec_version=request.spec_version,
                update_errors=None,
                registered=True,
            )
        if result.changed:
            # A new or returning node may need its managed set or its job targets. Not
            # for a node reconnecting as it was: after a manager restart that was every
            # node, each poke a full pass over the fleet.
            self._on_change()
        return manager_pb2.RegisterNodeResponse(
            success=True,
            message="registered" if result.created else "re-registered",
            heartbeat_interval_ms=result.heartbeat_interval_ms,
            server_time=result.server_time_ms,
        )

    async def Heartbeat(
        self, request: manager_pb2.HeartbeatRequest, context: _Context
    ) -> manager_pb2.HeartbeatResponse:
        self._identities.require_node(context, request.node_id)
        interval = await self._registry.heartbeat(request.node_id, request.timestamp)
        return manager_pb2.HeartbeatResponse(success=True, heartbeat_interval_ms=interval)

    async def ReportMetrics(
        self, request: manager_pb2.ReportMetricsRequest, context: _Context
    ) -> manager_pb2.ReportMetricsResponse:
        self._identities.require_node(context, request.node_id)
        points = [
            MetricPoint(
                type=m.type, timestamp_ms=m.timestamp, values=dict(m.values), agent_id=m.agent_id
            )
            for m in request.metrics
        ]
        result = await self._metrics.ingest(request.node_id, request.sequence, points)
        return manager_pb2.ReportMetricsResponse(
            success=True,
            message="stored" if result.stored else "duplicate: batch stored earlier",
            duplicate=not result.stored,
            accepted=result.accepted,
        )

    async def SyncAgentStates(
        self, request: manager_pb2.SyncAgentStatesRequest, context: _Context
    ) -> manager_pb2.SyncAgentStatesResponse:
        self._identities.require_node(context, request.node_id)
        states, errors = snapshot_records(request, received_ms=self._registry.now_ms())
        changed = await self._agents.sync(
            request.node_id, states, spec_version=request.spec_version, update_errors=errors
        )
        return manager_pb2.SyncAgentStatesResponse(success=True, changed=changed)

    async def ReportJobStatus(
        self, request: manager_pb2.ReportJobStatusRequest, context: _Context
    ) -> manager_pb2.ReportJobStatusResponse:
        self._identities.require_node(context, request.node_id)
        cancel = await self._jobs.report(request)
        return manager_pb2.ReportJobStatusResponse(cancel=cancel)

    async def UploadJobOutput(
        self, request: manager_pb2.UploadJobOutputRequest, context: _Context
    ) -> manager_pb2.UploadJobOutputResponse:
        self._identities.require_node(context, request.node_id)
        result = await self._jobs.upload(
            request.node_id, request.job_id, request.offset, request.data
        )
        return manager_pb2.UploadJobOutputResponse(
            acked_offset=result.acked_offset, truncated=result.truncated
        )

    async def RenewCertificate(
        self, request: manager_pb2.RenewCertificateRequest, context: _Context
    ) -> manager_pb2.RenewCertificateResponse:
        self._identities.require_node(context, request.node_id)
        if self._certificates is None:
            raise FailedPrecondition(NO_ISSUER)
        issued = await self._certificates.renew(
            request.node_id, request.csr_pem, caller_pem(context)
        )
        return manager_pb2.RenewCertificateResponse(
            certificate_pem=issued.cert_pem, ca_pem=issued.ca_pem, expire_time=issued.not_after_ms
        )

    async def Connect(  # type: ignore[override]  # writes with context.write, returns nothing
        self, request_iterator: AsyncIterator[manager_pb2.ConnectRequest], context: _Context
    ) -> None:
        if self.control is None:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "this manager serves no control stream"
            )
        assert self.control is not None
        await self.control.serve(request_iterator, context)
