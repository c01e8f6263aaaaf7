"""One connection to the daemon's AgentService: typed calls, errors translated once.

Every `grpc.RpcError` becomes a `fleet.errors` exception here
(`from_rpc_error`), so the rest of the SDK never sees gRPC's error type. The
channel is a plain insecure Unix-socket channel: the socket is local and the
daemon identifies the caller by its peer pid.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from grpc import aio

from agent_runtime._env import DaemonEndpoint
from agent_runtime._metrics import Sample
from fleet.errors import FleetError, Unavailable, from_rpc_error
from fleet.v1 import agent_pb2, agent_pb2_grpc, common_pb2

__all__ = ["AgentClient", "Registration"]

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")

# Our own reconnect loop paces retries (fleet.retry); gRPC's internal
# reconnect backoff would otherwise add up to minutes on top of it.
_CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def now_ms() -> int:
    """Wall-clock Unix epoch milliseconds (what timestamps on the wire are)."""
    return time.time_ns() // 1_000_000


def _being_cancelled() -> bool:
    """True if the current task itself is being cancelled (not just a call of it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Registration:
    """What Register answered (the config still unverified)."""

    def __init__(self, response: agent_pb2.AgentServiceRegisterResponse) -> None:
        self.config = response.config
        """The config message; verify it with `_config.verify`."""
        self.heartbeat_interval = response.heartbeat_interval_ms / 1000
        """Seconds between heartbeats the daemon wants (0: not said)."""
        self.stop_timeout = response.stop_timeout_ms / 1000
        """Seconds the daemon waits after the stop signal before SIGKILL (0: not said)."""


class AgentClient:
    """The AgentService calls of one agent over one channel; close() when done."""

    def __init__(self, endpoint: DaemonEndpoint, *, timeout: float) -> None:
        self.endpoint = endpoint
        self._timeout = timeout
        self._channel = aio.insecure_channel(endpoint.target, options=list(_CHANNEL_OPTIONS))
        self._stub = agent_pb2_grpc.AgentServiceStub(self._channel)
        self._metadata = endpoint.metadata()

    async def close(self) -> None:
        """Close the channel (cancels calls in flight, including a config watch)."""
        await self._channel.close(None)

    def _error(self, exc: grpc.RpcError) -> FleetError:
        return from_rpc_error(exc, target=f"daemon at {self.endpoint.target}")

    def _closed(self) -> FleetError:
        """The error for a call cut by close(): grpc.aio raises CancelledError for it."""
        return Unavailable(f"daemon at {self.endpoint.target}: connection closed (reconnecting)")

    async def _unary(
        self, method: aio.UnaryUnaryMultiCallable[_Req, _Resp], request: _Req
    ) -> _Resp:
        try:
            return await method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            raise self._closed() from None

    async def register(
        self, *, type: str, version: str, pid: int, labels: Mapping[str, str]
    ) -> Registration:
        """Register this process as the agent; PermissionDenied if the daemon refuses it."""
        request = agent_pb2.AgentServiceRegisterRequest(
            agent_id=self.endpoint.agent_id, type=type, version=version, pid=pid, labels=labels
        )
        response = await self._unary(self._stub.Register, request)
        return Registration(response)

    async def heartbeat(self) -> int:
        """Send one heartbeat; returns the daemon's newest config version."""
        request = agent_pb2.AgentServiceHeartbeatRequest(
            agent_id=self.endpoint.agent_id, timestamp=now_ms()
        )
        response = await self._unary(self._stub.Heartbeat, request)
        return response.config_version

    async def report_metrics(self, batch: Sequence[Sample]) -> int:
        """Send one batch of custom metrics; returns how many the daemon accepted."""
        request = agent_pb2.AgentServiceReportMetricsRequest(
            agent_id=self.endpoint.agent_id,
            metrics=[
                common_pb2.MetricData(type=s.type, timestamp=s.timestamp_ms, values=s.values)
                for s in batch
            ],
        )
        response = await self._unary(self._stub.ReportMetrics, request)
        return response.accepted

    async def get_config(self) -> agent_pb2.AgentConfig:
        """The daemon's current config for this agent (unverified)."""
        request = agent_pb2.AgentServiceGetConfigRequest(agent_id=self.endpoint.agent_id)
        response = await self._unary(self._stub.GetConfig, request)
        return response.config

    async def watch_config(self, after_version: int) -> AsyncIterator[agent_pb2.AgentConfig]:
        """Config versions newer than `after_version` as the daemon sends them.

        Ends (with a FleetError) when the stream breaks, e.g. the daemon went away.
        """
        request = agent_pb2.AgentServiceWatchConfigRequest(
            agent_id=self.endpoint.agent_id, after_version=after_version
        )
        call = self._stub.WatchConfig(request, metadata=self._metadata)
        try:
            async for response in call:
                yield response.config
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            raise self._closed() from None
        finally:
            call.cancel()
