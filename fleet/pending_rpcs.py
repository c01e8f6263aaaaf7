"""Placeholders for RPCs whose protos landed before their implementation.

Issues 13 (desired state) and 14 (jobs) added their RPCs to the protos
first, so their parts could be built in parallel. Until a part lands, its
RPCs answer UNIMPLEMENTED -- what the generated base classes do at run time
-- but spelled out here so the servicers are concrete classes for mypy.
Each part deletes its RPCs from this module; the module goes when empty.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

__all__ = ["PendingFleetRpcs", "PendingManagerRpcs"]


async def _unimplemented(context: Any, rpc: str) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{rpc} is not available in this version")


async def _unimplemented_stream(context: Any, rpc: str) -> AsyncIterator[Any]:
    await _unimplemented(context, rpc)
    yield  # never reached: abort raises


class PendingFleetRpcs:
    """FleetService RPCs not built yet."""

    async def RunJob(self, request: Any, context: Any) -> Any:
        await _unimplemented(context, "RunJob")

    async def ListJobs(self, request: Any, context: Any) -> Any:
        await _unimplemented(context, "ListJobs")

    async def GetJob(self, request: Any, context: Any) -> Any:
        await _unimplemented(context, "GetJob")

    def WatchJob(self, request: Any, context: Any) -> Any:
        return _unimplemented_stream(context, "WatchJob")

    def ReadJobOutput(self, request: Any, context: Any) -> Any:
        return _unimplemented_stream(context, "ReadJobOutput")

    async def CancelJob(self, request: Any, context: Any) -> Any:
        await _unimplemented(context, "CancelJob")

    async def RerunJob(self, request: Any, context: Any) -> Any:
        await _unimplemented(context, "RerunJob")


class PendingManagerRpcs:
    """ManagerService RPCs not built yet."""

    async def ReportJobStatus(self, request: Any, context: Any) -> Any:
        await _unimplemented(context, "ReportJobStatus")

    async def UploadJobOutput(self, request: Any, context: Any) -> Any:
        await _unimplemented(context, "UploadJobOutput")
