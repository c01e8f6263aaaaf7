"""`FakeDaemon`: an in-process AgentService for testing agents without a daemon.

It serves the real gRPC contract on a temporary Unix socket, records what
the agent sends, and lets a test change the config, refuse registration, or
restart the "daemon"::

    async def test_my_agent_reports_depth() -> None:
        async with FakeDaemon(config={"queue": "jobs"}) as daemon:
            async with Agent("jobs", "1.0", environ=daemon.env) as agent:
                agent.metric("depth", 3, type="jobs")
                await agent.flush_metrics()
            assert daemon.metrics[0].values == {"depth": 3.0}

A child process under test gets ``env={**os.environ, **daemon.env}``.
Unlike the real daemon it does not check the caller's pid: any process
presenting the expected FLEET_AGENT_ID (and token, if one is set) may
register.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpc import aio

from agent_runtime._env import TOKEN_METADATA_KEY, DaemonEndpoint
from agent_runtime._metrics import METRIC_NAME
from fleet.errors import FleetError, InvalidArgument, PermissionDenied, Unauthenticated
from fleet.interceptors import ErrorMappingInterceptor
from fleet.v1 import agent_pb2, agent_pb2_grpc

__all__ = ["FakeDaemon", "HeartbeatRecord", "MetricRecord", "RegistrationRecord"]

_Context = aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class RegistrationRecord:
    """One Register call the fake daemon accepted."""

    agent_id: str
    """The id the agent presented."""
    type: str
    """Agent type."""
    version: str
    """Agent version."""
    pid: int
    """The pid the agent reported."""
    labels: dict[str, str]
    """Labels sent with Register."""
    received_at: float
    """time.monotonic() when it arrived."""


@dataclass(frozen=True)
class HeartbeatRecord:
    """One Heartbeat call."""

    timestamp_ms: int
    """The agent's timestamp (Unix epoch ms)."""
    received_at: float
    """time.monotonic() when it arrived."""


@dataclass(frozen=True)
class MetricRecord:
    """One custom metric sample from ReportMetrics."""

    type: str
    """Metric type."""
    timestamp_ms: int
    """When the agent measured it (Unix epoch ms)."""
    values: dict[str, float] = field(default_factory=dict)
    """Named values."""


def _encode(config: bytes | str | Mapping[str, Any]) -> bytes:
    if isinstance(config, bytes):
        return config
    if isinstance(config, str):
        return config.encode()
    return json.dumps(config, sort_keys=True).encode()


class FakeDaemon:
    """An AgentService on a temp Unix socket that records and scripts the daemon side.

    `agent_id` is the id the agent must present (exported as FLEET_AGENT_ID
    in `env`); `token`, when given, must arrive as x-fleet-agent-token.
    `heartbeat_interval` and `stop_timeout` (seconds) are what Register
    announces.
    """

    def __init__(
        self,
        *,
        agent_id: str = "test-agent",
        config: bytes | str | Mapping[str, Any] | None = None,
        heartbeat_interval: float = 1.0,
        stop_timeout: float = 5.0,
        token: str = "",
        socket_path: str | Path | None = None,
    ) -> None:
        self.agent_id = agent_id
        """The agent id this daemon supervises."""
        self.heartbeat_interval = heartbeat_interval
        """Seconds between heartbeats announced by Register."""
        self.stop_timeout = stop_timeout
        """Stop timeout announced by Register (seconds)."""
        self.token = token
        """Token the agent must send ("" = none required)."""
        self._own_dir: Path | None = None
        if socket_path is None:
            # /tmp keeps the path short: Unix socket paths max out at 107 bytes.
            self._own_dir = Path(tempfile.mkdtemp(prefix="fleet-fake-daemon-", dir="/tmp"))
            socket_path = self._own_dir / "agent.sock"
        self.socket_path = Path(socket_path)
        """Where the AgentService listens."""
        self._payload = _encode(config) if config is not None else b""
        self._version = 1 if config is not None else 0
        self._sha256 = hashlib.sha256(self._payload).hexdigest()
        self._register_error: FleetError | None = None
        self._register_failures_left: int | None = None
        self._server: aio.Server | None = None
        self._changed = asyncio.Event()
        self.registrations: list[RegistrationRecord] = []
        """Accepted Register calls, oldest first."""
        self.refused_registrations = 0
        """Register calls answered with an error."""
        self.heartbeats: list[HeartbeatRecord] = []
        """Heartbeats, oldest first."""
        self.metric_batches: list[list[MetricRecord]] = []
        """Each accepted ReportMetrics call's samples, oldest call first."""
        self.watchers = 0
        """WatchConfig streams open right now."""
        self.get_config_calls = 0
        """GetConfig calls answered."""

    # -- what a test reads -------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """FLEET_AGENT_ID, FLEET_DAEMON_SOCKET (and FLEET_AGENT_TOKEN) for the agent."""
        endpoint = DaemonEndpoint(self.agent_id, str(self.socket_path), self.token)
        return endpoint.as_env()

    @property
    def metrics(self) -> list[MetricRecord]:
        """Every metric sample received, oldest first."""
        return [m for batch in self.metric_batches for m in batch]

    @property
    def config_version(self) -> int:
        """The version of the config this daemon serves (0 = none)."""
        return self._version

    @property
    def running(self) -> bool:
        """True while the socket accepts calls."""
        return self._server is not None

    async def wait_for(
        self,
        predicate: Callable[[FakeDaemon], bool],
        timeout: float = 5.0,  # noqa: ASYNC109 -- a test deadline that names what arrived
    ) -> None:
        """Wait until `predicate(self)` holds (checked at every call and every 50 ms).

        TimeoutError after `timeout` seconds, naming what was recorded.
        """
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self):
                    # woken by every call; polled too, for predicates on the agent's state
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), 0.05)
        except TimeoutError:
            raise TimeoutError(
                f"condition not met within {timeout}s: {len(self.registrations)} registrations, "
                f"{len(self.heartbeats)} heartbeats, {len(self.metrics)} metric samples, "
                f"{self.watchers} config watchers"
            ) from None

    async def wait_registered(self, count: int = 1, timeout: float = 5.0) -> RegistrationRecord:  # noqa: ASYNC109
        """Wait for the `count`-th registration and return it."""
        await self.wait_for(lambda d: len(d.registrations) >= count, timeout)
        return self.registrations[count - 1]

    async def wait_heartbeats(self, count: int, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until `count` heartbeats arrived in total."""
        await self.wait_for(lambda d: len(d.heartbeats) >= count, timeout)

    async def wait_metrics(self, count: int, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until `count` metric samples arrived in total."""
        await self.wait_for(lambda d: len(d.metrics) >= count, timeout)

    # -- what a test scripts -------------------------------------------------------

    def set_config(self, config: bytes | str | Mapping[str, Any]) -> int:
        """Serve `config` (bytes, text, or a mapping sent as JSON) as a new version.

        Open config watches get it at once. Returns the new version.
        """
        return self._store(_encode(config), sha256=None)

    def set_corrupt_config(self, config: bytes | str | Mapping[str, Any]) -> int:
        """Serve `config` as a new version whose sha256 does not match (a corrupt payload)."""
        return self._store(_encode(config), sha256="0" * 64)

    def fail_register(self, error: FleetError | None, *, times: int | None = None) -> None:
        """Answer Register with `error` (`times` calls, or until called with None).

        E.g. ``fail_register(PermissionDenied("process 42 is not an agent"))``
        or ``fail_register(Unavailable("starting"), times=2)``.
        """
        self._register_error = error
        self._register_failures_left = times

    def _store(self, payload: bytes, *, sha256: str | None) -> int:
        self._payload = payload
        self._version += 1
        self._sha256 = sha256 or hashlib.sha256(payload).hexdigest()
        self._poke()
        return self._version

    def _config_message(self) -> agent_pb2.AgentConfig:
        return agent_pb2.AgentConfig(
            payload=self._payload, version=self._version, sha256=self._sha256
        )

    def _poke(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Listen on `socket_path` (again, after `stop`)."""
        if self._server is not None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()  # a stale socket from the previous "daemon"
        server = aio.server(interceptors=[ErrorMappingInterceptor()])
        agent_pb2_grpc.add_AgentServiceServicer_to_server(_Servicer(self), server)
        server.add_insecure_port(f"unix:{self.socket_path}")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        """Stop serving at once, breaking open calls (like a daemon that died)."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(None)
        self._poke()

    async def restart(self, downtime: float = 0.0) -> None:
        """Stop, stay down `downtime` seconds, start again on the same socket path."""
        await self.stop()
        if downtime > 0:
            await asyncio.sleep(downtime)
        await self.start()

    async def close(self) -> None:
        """Stop and remove the temporary socket directory (if this daemon made it)."""
        await self.stop()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    async def __aenter__(self) -> FakeDaemon:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the checks the servicer runs -------------------------------------------------

    def _check(self, agent_id: str, context: _Context) -> None:
        if not agent_id:
            raise InvalidArgument("is required", field="agent_id")
        if self.token:
            sent = dict(context.invocation_metadata() or ()).get(TOKEN_METADATA_KEY, "")
            if not sent:
                raise Unauthenticated(f"no {TOKEN_METADATA_KEY} metadata (FLEET_AGENT_TOKEN)")
            if sent != self.token:
                raise PermissionDenied("the agent token does not match")
        if agent_id != self.agent_id:
            raise PermissionDenied(
                f"this process belongs to agent {self.agent_id} "
                f"and may not speak for agent {agent_id}"
            )


class _Servicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, daemon: FakeDaemon) -> None:
        self._d = daemon

    async def Register(
        self, request: agent_pb2.AgentServiceRegisterRequest, context: _Context
    ) -> agent_pb2.AgentServiceRegisterResponse:
        d = self._d
        try:
            if d._register_error is not None:
                error = d._register_error
                if d._register_failures_left is not None:
                    d._register_failures_left -= 1
                    if d._register_failures_left <= 0:
                        d._register_error = None
                raise error
            d._check(request.agent_id, context)
        except FleetError:
            d.refused_registrations += 1
            d._poke()
            raise
        d.registrations.append(
            RegistrationRecord(
                agent_id=request.agent_id,
                type=request.type,
                version=request.version,
                pid=request.pid,
                labels=dict(request.labels),
                received_at=time.monotonic(),
            )
        )
        d._poke()
        return agent_pb2.AgentServiceRegisterResponse(
            config=d._config_message(),
            heartbeat_interval_ms=round(d.heartbeat_interval * 1000),
            stop_timeout_ms=round(d.stop_timeout * 1000),
        )

    async def Heartbeat(
        self, request: agent_pb2.AgentServiceHeartbeatRequest, context: _Context
    ) -> agent_pb2.AgentServiceHeartbeatResponse:
        d = self._d
        d._check(request.agent_id, context)
        d.heartbeats.append(HeartbeatRecord(request.timestamp, time.monotonic()))
        d._poke()
        return agent_pb2.AgentServiceHeartbeatResponse(config_version=d.config_version)

    async def ReportMetrics(
        self, request: agent_pb2.AgentServiceReportMetricsRequest, context: _Context
    ) -> agent_pb2.AgentServiceReportMetricsResponse:
        d = self._d
        d._check(request.agent_id, context)
        batch = []
        for i, m in enumerate(request.metrics):
            if not METRIC_NAME.fullmatch(m.type):
                raise InvalidArgument(f"{m.type!r} is not a metric name", field=f"metrics[{i}]")
            if m.timestamp <= 0 or not m.values:
                raise InvalidArgument("needs a timestamp and values", field=f"metrics[{i}]")
            batch.append(MetricRecord(m.type, m.timestamp, dict(m.values)))
        d.metric_batches.append(batch)
        d._poke()
        return agent_pb2.AgentServiceReportMetricsResponse(accepted=len(batch))

    async def GetConfig(
        self, request: agent_pb2.AgentServiceGetConfigRequest, context: _Context
    ) -> agent_pb2.AgentServiceGetConfigResponse:
        d = self._d
        d._check(request.agent_id, context)
        d.get_config_calls += 1
        d._poke()
        return agent_pb2.AgentServiceGetConfigResponse(config=d._config_message())

    async def WatchConfig(
        self, request: agent_pb2.AgentServiceWatchConfigRequest, context: _Context
    ) -> AsyncIterator[agent_pb2.AgentServiceWatchConfigResponse]:
        d = self._d
        d._check(request.agent_id, context)
        after = request.after_version
        d.watchers += 1
        d._poke()
        try:
            while True:
                event = d._changed
                if d.config_version > after:
                    after = d.config_version
                    yield agent_pb2.AgentServiceWatchConfigResponse(config=d._config_message())
                    continue
                await event.wait()
        finally:
            d.watchers -= 1
            d._poke()
