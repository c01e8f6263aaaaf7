"""`Agent`: registration, heartbeats, metrics, config and stop hooks of one agent.

Shape of a running agent (all tasks on the caller's event loop)::

    start() -- Register (retried with backoff while the daemon is unreachable)
      |-- connection task: heartbeat loop + config watch; when either breaks
      |   (daemon gone), close the channel, back off (fleet.retry full jitter),
      |   Register again, resume. The agent's own work never waits on this.
      |-- metrics task (_reporter): flushes the bounded buffer every N s / M samples
      `-- one task per config callback (_config.ConfigTracker): newest config first
    stop()  -- stop requested -> stop hooks (newest first) within the stop
               timeout the daemon announced -> last metrics flush -> close
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agent_runtime._client import AgentClient, Registration
from agent_runtime._config import AgentConfig, ConfigTracker, verify
from agent_runtime._env import DaemonEndpoint
from agent_runtime._metrics import MetricBuffer
from agent_runtime._reporter import MetricReporter
from fleet.errors import FleetError, InvalidArgument, PermissionDenied, Unauthenticated, Unavailable
from fleet.retry import Backoff

__all__ = ["Agent", "AgentOptions", "ConfigCallback", "StopHook"]

log = logging.getLogger("agent_runtime")

ConfigCallback = Callable[[AgentConfig], Awaitable[None] | None]
"""Called with every new verified config (plain or async function)."""
StopHook = Callable[[], Awaitable[None] | None]
"""Called once when the agent stops (plain or async function)."""
_CB = TypeVar("_CB", bound=ConfigCallback)
_HOOK = TypeVar("_HOOK", bound=StopHook)

# Errors that mean "this process may not be this agent": retrying cannot help.
_REFUSED = (PermissionDenied, Unauthenticated, InvalidArgument)


@dataclass(frozen=True)
class AgentOptions:
    """Knobs of the SDK; the defaults suit agents under fleet-daemon."""

    rpc_timeout: float = 5.0
    """Seconds each unary call to the daemon may take."""
    reconnect: Backoff = field(default_factory=lambda: Backoff(initial=0.2, maximum=10.0))
    """Backoff between attempts to reach the daemon again (full jitter)."""
    metrics_flush_interval: float = 5.0
    """Send buffered metrics at least this often (seconds)."""
    metrics_batch_size: int = 200
    """Send as soon as this many samples wait; also the most per call."""
    metrics_buffer_limit: int = 10_000
    """Samples kept while the daemon is unreachable; beyond it the oldest are dropped."""
    default_heartbeat_interval: float = 5.0
    """Heartbeat interval when the daemon does not say one."""
    default_stop_timeout: float = 10.0
    """Stop budget when the daemon did not announce one (not registered yet)."""
    stop_margin: float = 0.1
    """Fraction of the stop timeout kept back so the process exits before SIGKILL."""
    refused_grace: float = 10.0
    """After a daemon restart, how long a refused re-registration is retried
    (the new daemon may still be re-adopting its agents) before the agent stops."""

    def __post_init__(self) -> None:
        if not 0 <= self.stop_margin < 1:
            raise ValueError(f"stop_margin must be in [0, 1), got {self.stop_margin}")
        for name in ("rpc_timeout", "metrics_flush_interval", "default_heartbeat_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def worth_logging(attempt: int) -> bool:
    """Log reconnect attempts 1-5, then every 10th: a long outage stays readable."""
    return attempt <= 5 or attempt % 10 == 0


class _Stopped(Exception):
    """Internal: the agent began stopping while waiting to reconnect."""


async def _call(fn: Callable[..., Awaitable[None] | None], *args: object) -> None:
    result = fn(*args)
    if inspect.isawaitable(result):
        await result


class Agent:
    """One agent's link to its daemon. Use ``async with Agent(...)`` or `run`.

    `type`, `version` and `labels` are sent with Register (the daemon shows
    the version in ListAgents). The daemon endpoint comes from the
    environment the daemon sets (FLEET_AGENT_ID, FLEET_DAEMON_SOCKET); pass
    `environ` (e.g. ``FakeDaemon.env``) to read another mapping.
    """

    def __init__(
        self,
        type: str,
        version: str = "0",
        *,
        labels: Mapping[str, str] | None = None,
        environ: Mapping[str, str] | None = None,
        options: AgentOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.type = type
        """Agent type sent with Register (e.g. "probe")."""
        self.version = version
        """Agent version sent with Register."""
        self.labels = dict(labels or {})
        """Labels sent with Register."""
        self.options = options or AgentOptions()
        """SDK knobs."""
        self._environ = environ
        self.clock = clock
        """The monotonic clock deadlines and metric flushes use."""
        self._endpoint: DaemonEndpoint | None = None
        self._configs = ConfigTracker()
        self._callbacks: list[ConfigCallback] = []
        self._hooks: list[StopHook] = []
        self._stop_requested = asyncio.Event()
        self._client: AgentClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        buffer = MetricBuffer(
            limit=self.options.metrics_buffer_limit,
            batch_size=self.options.metrics_batch_size,
            interval=self.options.metrics_flush_interval,
            now=clock(),
        )
        self._reporter = MetricReporter(buffer, client=lambda: self._client, clock=clock)
        self._heartbeat_interval = self.options.default_heartbeat_interval
        self._stop_timeout = self.options.default_stop_timeout
        self._started = False
        self._closed = False
        self.failure: FleetError | None = None
        """Set when the daemon refused this agent after a reconnect (the agent then stops)."""
        self.registrations = 0
        """How many times Register succeeded (1 + reconnects)."""

    # -- public state ---------------------------------------------------------

    @property
    def agent_id(self) -> str:
        """This agent's id (FLEET_AGENT_ID); known once started."""
        return self._endpoint.agent_id if self._endpoint else ""

    @property
    def config(self) -> AgentConfig:
        """The newest verified config (version 0 and an empty payload before any)."""
        return self._configs.current

    @property
    def connected(self) -> bool:
        """True while registered with a reachable daemon."""
        return self._client is not None

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between heartbeats (the daemon's choice once registered)."""
        return self._heartbeat_interval

    @property
    def stop_timeout(self) -> float:
        """Seconds the daemon waits after the stop signal before SIGKILL."""
        return self._stop_timeout

    @property
    def stopping(self) -> bool:
        """True once a stop was requested (signal, `request_stop`, or refusal)."""
        return self._stop_requested.is_set()

    @property
    def metrics_dropped(self) -> int:
        """Metric samples dropped because the buffer was full during an outage."""
        return self._reporter.buffer.dropped

    # -- registration of callbacks ------------------------------------------------

    def on_config(self, callback: _CB) -> _CB:
        """Call `callback(config)` with the current config and every newer one.

        Usable as a decorator, before or after `start`. Each callback runs in
        its own task on the agent's loop and sees configs in order (the
        newest, if it falls behind); an exception is logged and does not stop
        later configs.
        """
        self._callbacks.append(callback)
        if self._started and not self._closed:
            self._tasks.append(self._dispatch(callback))
        return callback

    def on_stop(self, hook: _HOOK) -> _HOOK:
        """Run `hook()` when the agent stops, newest hook first (usable as a decorator).

        All hooks share the stop timeout the daemon announced; a hook still
        running at the deadline is cancelled and logged.
        """
        self._hooks.append(hook)
        return hook

    # -- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def run(self, main: Callable[[Agent], Coroutine[Any, Any, None]]) -> int:
        """Run `main(self)` as this process's agent until it returns or a signal stops it.

        Handles SIGTERM/SIGINT (stop hooks within the stop timeout) and
        returns the exit code: 0 stopped or done, 1 `main` raised, 2 refused
        by the daemon. See `agent_runtime.run_agent` for the whole process.
        """
        from agent_runtime._lifecycle import run

        return await run(self, main)

    async def start(self) -> AgentConfig:
        """Register with the daemon and start heartbeats, metrics and the config watch.

        Waits (retrying with backoff, logging each attempt) while the daemon
        is unreachable. Raises ConfigError when the daemon's environment
        variables are missing, and PermissionDenied (or InvalidArgument) when
        the daemon refuses this process: it is not one the daemon supervises,
        or FLEET_AGENT_ID is not its agent. Returns the first config.
        """
        if self._started:
            raise RuntimeError("Agent.start() was already called")
        self._started = True
        self._endpoint = DaemonEndpoint.from_env(self._environ)
        client = await self._register(first=True)
        self._tasks = [
            asyncio.create_task(self._maintain(client), name="agent-connection"),
            asyncio.create_task(self._reporter.run(), name="agent-metrics"),
            *(self._dispatch(callback) for callback in self._callbacks),
        ]
        return self._configs.current

    def request_stop(self) -> None:
        """Ask the agent to stop: `stopping` turns true, `sleep` returns False, configs() ends."""
        self._stop_requested.set()
        self._configs.close()

    async def wait_stopping(self, seconds: float | None = None) -> bool:
        """Wait until a stop is requested (True) or `seconds` pass (False)."""
        if seconds is None:
            await self._stop_requested.wait()
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_requested.wait(), seconds)
        return self._stop_requested.is_set()

    async def sleep(self, seconds: float) -> bool:
        """Sleep `seconds` unless a stop comes first; True while the agent should go on.

        The loop of a periodic agent: ``while await agent.sleep(interval): ...``.
        """
        return not await self.wait_stopping(seconds)

    def stop_deadline(self) -> float:
        """The clock time by which stopping must be done (stop timeout minus margin)."""
        return self.clock() + self._stop_timeout * (1 - self.options.stop_margin)

    async def stop(self, deadline: float | None = None) -> None:
        """Stop: request stop, run the stop hooks, flush metrics, close the channel.

        Everything finishes by `deadline` (a `clock()` value; default
        `stop_deadline()`). Safe to call twice.
        """
        if self._closed:
            return
        self._closed = True
        if deadline is None:
            deadline = self.stop_deadline()
        self.request_stop()
        await self.run_stop_hooks(deadline)
        await self._close(deadline)

    async def run_stop_hooks(self, deadline: float) -> None:
        """Run the stop hooks (newest first) with what is left until `deadline`."""
        hooks, self._hooks = list(reversed(self._hooks)), []
        for hook in hooks:
            name = getattr(hook, "__qualname__", repr(hook))
            left = deadline - self.clock()
            try:
                await asyncio.wait_for(_call(hook), max(left, 0.001))
            except TimeoutError:
                log.warning("stop hook %s did not finish within the stop timeout; cancelled", name)
            except Exception:
                log.exception("stop hook %s failed", name)
            else:
                log.info("stop hook %s done", name)

    async def _close(self, deadline: float) -> None:
        # Last metrics flush first, while the connection is still up.
        flusher = [t for t in self._tasks if t.get_name() == "agent-metrics"]
        self._reporter.close_soon()
        if flusher:
            done, _ = await asyncio.wait(flusher, timeout=max(deadline - self.clock(), 0.001))
            if not done:
                left = len(self._reporter.buffer)
                log.warning("%d metric samples not sent before the stop deadline", left)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        client, self._client = self._client, None
        if client is not None:
            await client.close()
        self._configs.close()

    # -- config -------------------------------------------------------------------

    async def get_config(self) -> AgentConfig:
        """Ask the daemon for the current config now (GetConfig) and apply it if newer.

        Raises Unavailable while disconnected and ConfigChecksumError for a
        corrupt payload (the previous config stays in use).
        """
        client = self._client
        if client is None:
            raise Unavailable("not connected to the daemon (reconnecting); try again later")
        message = await client.get_config()
        config = verify(message)
        self._configs.offer(config, authoritative=False)
        return config

    def configs(self, *, current: bool = True) -> AsyncIterator[AgentConfig]:
        """Iterate over configs: the current one (unless `current=False`), then each newer.

        A slow consumer gets the newest config, not every intermediate one.
        Ends when the agent begins stopping.
        """
        return self._configs.iterate(current=current)

    def _dispatch(self, callback: ConfigCallback) -> asyncio.Task[None]:
        name = getattr(callback, "__qualname__", repr(callback))

        async def deliver() -> None:
            async for config in self.configs():
                try:
                    await _call(callback, config)
                except Exception:
                    log.exception("config callback %s failed for version %d", name, config.version)

        return asyncio.create_task(deliver(), name=f"agent-config-callback-{name}")

    # -- metrics ------------------------------------------------------------------

    def metric(self, name: str, value: float, *, type: str = "custom") -> None:
        """Queue one value, e.g. ``agent.metric("latency_ms", 12.3, type="probe")``.

        Raises ValueError for a bad name or a non-finite value. Samples are
        sent in batches; see AgentOptions for when.
        """
        self.record(type, {name: value})

    def record(self, type: str, values: Mapping[str, float]) -> None:
        """Queue one sample with several values, e.g. ``record("probe.web", {"up": 1, ...})``."""
        self._reporter.record(type, values)

    async def flush_metrics(self) -> None:
        """Send every buffered sample now (Unavailable while disconnected; kept then)."""
        await self._reporter.flush()

    # -- connection ---------------------------------------------------------------

    def _apply_registration(self, reg: Registration) -> None:
        self._heartbeat_interval = reg.heartbeat_interval or self.options.default_heartbeat_interval
        self._stop_timeout = reg.stop_timeout or self.options.default_stop_timeout
        self._configs.receive(reg.config, authoritative=True)
        self.registrations += 1

    async def _register(self, *, first: bool) -> AgentClient:
        """Register on a fresh channel, retrying with backoff while the daemon is unreachable."""
        assert self._endpoint is not None
        target = self._endpoint.target
        attempt = 0
        started = self.clock()
        refused_since: float | None = None
        while True:
            client = AgentClient(self._endpoint, timeout=self.options.rpc_timeout)
            try:
                reg = await client.register(
                    type=self.type, version=self.version, pid=os.getpid(), labels=self.labels
                )
            except BaseException as exc:
                await client.close()
                if not isinstance(exc, FleetError):
                    raise
                if isinstance(exc, _REFUSED):
                    if first:
                        log.error(  # noqa: TRY400 -- one clear line, no traceback
                            "the daemon refused this process as agent %s: %s",
                            self._endpoint.agent_id,
                            exc,
                        )
                        raise
                    refused_since = refused_since if refused_since is not None else self.clock()
                    if self.clock() - refused_since >= self.options.refused_grace:
                        raise
                delay = self.options.reconnect.delay(attempt)
                attempt += 1
                if worth_logging(attempt):
                    log.warning(
                        "cannot register with the daemon at %s (attempt %d): %s; retrying in %.1fs",
                        target,
                        attempt,
                        exc,
                        delay,
                    )
                if await self.wait_stopping(delay):
                    raise _Stopped from None
                continue
            self._apply_registration(reg)
            if first:
                log.info(
                    "registered as agent %s with the daemon at %s: config version %d, "
                    "heartbeat every %.1fs, stop timeout %.1fs",
                    self._endpoint.agent_id,
                    target,
                    self._configs.current.version,
                    self._heartbeat_interval,
                    self._stop_timeout,
                )
            else:
                log.info(
                    "registered again as agent %s after %.1fs (%d attempts)",
                    self._endpoint.agent_id,
                    self.clock() - started,
                    attempt + 1,
                )
            self._client = client
            return client

    async def _maintain(self, client: AgentClient) -> None:
        """Keep a session with the daemon; on loss, reconnect and register again."""
        assert self._endpoint is not None
        short_sessions = 0  # in a row; grows the pause so a flapping daemon is not hammered
        while True:
            began = self.clock()
            try:
                await self._session(client)
            except FleetError as exc:
                log.warning(
                    "lost the daemon at %s: %s; the agent keeps running and reconnects",
                    self._endpoint.target,
                    exc,
                )
            except Exception:  # a bug here must not leave the agent unconnected for good
                log.exception("connection to the daemon failed unexpectedly; reconnecting")
            finally:
                self._client = None
                await client.close()
            short_sessions = short_sessions + 1 if self.clock() - began < 5.0 else 0
            # A jittered pause first: after a daemon restart its agents do not all
            # register in the same instant.
            if await self.wait_stopping(self.options.reconnect.delay(short_sessions)):
                return
            try:
                client = await self._register(first=False)
            except _Stopped:
                return
            except _REFUSED as exc:
                self.failure = exc
                log.error(  # noqa: TRY400 -- one clear line, no traceback
                    "the daemon refuses this process as agent %s after a reconnect: %s; stopping",
                    self._endpoint.agent_id,
                    exc,
                )
                self.request_stop()
                return

    async def _session(self, client: AgentClient) -> None:
        """Heartbeats and the config watch until one of them fails (raises FleetError)."""
        tasks = [
            asyncio.create_task(self._heartbeats(client)),
            asyncio.create_task(self._watch(client)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _heartbeats(self, client: AgentClient) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_interval)
            version = await client.heartbeat()
            if self._configs.wants(version):  # a change the watch missed: ask for it
                self._configs.receive(await client.get_config(), authoritative=False)

    async def _watch(self, client: AgentClient) -> None:
        async for message in client.watch_config(self._configs.watch_from()):
            self._configs.receive(message, authoritative=False)
        raise Unavailable("the daemon closed the config watch")
