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

__all__ = ["PendingDaemonRpcs"]


async def _unimplemented(context: Any, rpc: str) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{rpc} is not available in this version")


async def _unimplemented_stream(context: Any, rpc: str) -> AsyncIterator[Any]:
    await _unimplemented(context, rpc)
    yield  # never reached: abort raises


class PendingDaemonRpcs:
    """DaemonService RPCs not built yet."""

    async def StartJob(self, request: Any, context: Any) -> Any:
        await _unimplemented(context, "StartJob")

    async def CancelJob(self, request: Any, context: Any) -> Any:
        await _unimplemented(context, "CancelJob")

    def ReadJobOutput(self, request: Any, context: Any) -> Any:
        return _unimplemented_stream(context, "ReadJobOutput")
