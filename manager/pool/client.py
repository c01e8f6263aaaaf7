"""`DaemonPool`: the manager's pooled, mTLS client of every daemon's DaemonService.

Channels are opened lazily, one per daemon, and each is its own connection.
A watcher task per channel follows gRPC's connectivity (`wait_for_state_change`,
no polling) and drives the connection state machine of `manager.pool.state`.
One reaper task closes channels that stayed unused for `idle_close_after`.

Calls have one deadline each (`call_timeout`, retries included). Idempotent
calls are retried with jittered backoff on UNAVAILABLE; when they run out of
attempts the pool gives the channel up (RECONNECTING -> IDLE) so the next
call starts from a fresh connection. Errors leave as `fleet.errors`
exceptions whose message starts with the node id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

import grpc
from grpc import aio

from fleet.errors import (
    ConfigError,
    FailedPrecondition,
    FleetError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from fleet.pki import Identity, check_trust_domain
from fleet.tls import TLSConfig, channel_credentials
from fleet.v1 import common_pb2, daemon_pb2, daemon_pb2_grpc
from manager.pool.channel import (
    DaemonChannel,
    NodeRecord,
    NodeStats,
    WrongDaemonIdentity,
    channel_args,
    node_stats,
    translate_error,
)
from manager.pool.config import PoolConfig
from manager.pool.policy import ChannelUse, eviction_victim, idle_channels, retry_delay
from manager.pool.state import ConnectionState, ConnEvent, events_for

if TYPE_CHECKING:
    from fleet.v1.daemon_pb2_grpc import DaemonServiceAsyncStub

__all__ = ["Clock", "DaemonPool"]

log = logging.getLogger(__name__)

Clock = Callable[[], float]
"""Monotonic seconds; the pool's notion of "now" for idle times and stats."""

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")

_Op = common_pb2.AgentOperation
# The daemon contract makes start and stop idempotent (starting a running
# agent succeeds and changes nothing). A restart is not: a retry after an
# UNAVAILABLE that hid a success would restart the agent twice.
_IDEMPOTENT_OPERATIONS = frozenset({_Op.AGENT_OPERATION_START, _Op.AGENT_OPERATION_STOP})
_OPERATIONS = _IDEMPOTENT_OPERATIONS | {_Op.AGENT_OPERATION_RESTART}


def _cancelled_by_caller() -> bool:
    """True if the running task itself is being cancelled.

    grpc.aio also raises CancelledError for a call the pool cancelled by
    closing its channel; that one becomes `_cut_off` so callers can tell.
    """
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _cut_off(node_id: str) -> Unavailable:
    return Unavailable(
        f"{node_id}: the call was cut off: its channel was closed "
        "(pool closed, node forgotten or moved)"
    )


class DaemonPool:
    """Pooled client of the daemons' DaemonService; one lazily opened channel per daemon.

    Every call takes the node id and the daemon address the registry holds
    for it; a different address than the open channel's replaces the channel.
    Use it as an async context manager, or call `close()`.
    """

    def __init__(
        self,
        tls: TLSConfig,
        trust_domain: str,
        *,
        config: PoolConfig | None = None,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        config = config or PoolConfig()
        try:
            config.validate()
            check_trust_domain(trust_domain)
        except ValueError as exc:
            raise ConfigError(f"daemon pool: {exc}") from None
        self._config = config
        self._trust_domain = trust_domain
        self._credentials = channel_credentials(tls)  # ConfigError for unusable files
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311  # jitter, not cryptography
        self._channels: OrderedDict[str, DaemonChannel] = OrderedDict()  # LRU first
        self._records: dict[str, NodeRecord] = {}
        self._closing: dict[asyncio.Task[None], DaemonChannel] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._reaper_wake = asyncio.Event()
        self._reaper_sleeps_forever = False
        self._released: asyncio.Event | None = None  # created by a call waiting for room
        self._changed = asyncio.Event()  # replaced on every state change (broadcast)
        self._closed = False
        self.connections_opened = 0
        """Connections established over the pool's life (entries into READY)."""
        self.channels_opened = 0
        """Channels created over the pool's life."""

    # -- observing --------------------------------------------------------

    @property
    def config(self) -> PoolConfig:
        """The settings the pool runs with."""
        return self._config

    @property
    def open_channels(self) -> int:
        """Channels open now (never more than `config.max_channels`)."""
        return len(self._channels)

    def state(self, node_id: str) -> ConnectionState:
        """The connection state to `node_id` (IDLE for a daemon never called)."""
        record = self._records.get(node_id)
        return record.state if record else ConnectionState.IDLE

    def stats(self) -> dict[str, NodeStats]:
        """Per-daemon counters and state, for every daemon the pool has called."""
        return {
            node_id: node_stats(record, self._channels.get(node_id))
            for node_id, record in self._records.items()
        }

    async def wait_for_state(self, node_id: str, *states: ConnectionState) -> ConnectionState:
        """Wait until `node_id` is in one of `states` (bound it with asyncio.timeout)."""
        while (current := self.state(node_id)) not in states:
            await self._changed.wait()
        return current

    # -- calls ------------------------------------------------------------

    async def list_agents(
        self, node_id: str, address: str, *, call_timeout: float | None = None
    ) -> daemon_pb2.ListAgentsResponse:
        """The daemon's agents. Idempotent: retried on UNAVAILABLE."""
        return await self._unary(
            node_id,
            address,
            lambda stub: stub.ListAgents,
            daemon_pb2.ListAgentsRequest(),
            idempotent=True,
            call_timeout=call_timeout,
        )

    async def operate_agent(
        self,
        node_id: str,
        address: str,
        agent_id: str,
        operation: common_pb2.AgentOperation.ValueType,
        *,
        call_timeout: float | None = None,
    ) -> daemon_pb2.OperateAgentResponse:
        """Start, stop or restart one agent; start and stop are retried, restart never."""
        if operation not in _OPERATIONS:
            raise InvalidArgument(
                f"unsupported agent operation {operation!r}; use start, stop or restart",
                field="operation",
            )
        return await self._unary(
            node_id,
            address,
            lambda stub: stub.OperateAgent,
            daemon_pb2.OperateAgentRequest(agent_id=agent_id, operation=operation),
            idempotent=operation in _IDEMPOTENT_OPERATIONS,
            call_timeout=call_timeout,
        )

    async def get_agent_metrics(
        self,
        node_id: str,
        address: str,
        agent_id: str,
        duration_seconds: int,
        *,
        call_timeout: float | None = None,
    ) -> daemon_pb2.GetAgentMetricsResponse:
        """Recent resource samples of one agent. Idempotent: retried on UNAVAILABLE."""
        return await self._unary(
            node_id,
            address,
            lambda stub: stub.GetAgentMetrics,
            daemon_pb2.GetAgentMetricsRequest(agent_id=agent_id, duration_seconds=duration_seconds),
            idempotent=True,
            call_timeout=call_timeout,
        )

    async def push_update(
        self,
        node_id: str,
        address: str,
        version: int,
        agents: Sequence[common_pb2.AgentSpec],
        *,
        call_timeout: float | None = None,
    ) -> daemon_pb2.PushUpdateResponse:
        """Replace the daemon's agent specs with version `version`. Never retried:
        a retry after a hidden success would be refused as a stale version."""
        return await self._unary(
            node_id,
            address,
            lambda stub: stub.PushUpdate,
            daemon_pb2.PushUpdateRequest(version=version, agents=agents),
            idempotent=False,
            call_timeout=call_timeout,
        )

    async def read_agent_log(
        self,
        node_id: str,
        address: str,
        agent_id: str,
        *,
        offset: int = 0,
        max_bytes: int = 0,
        follow: bool = False,
        call_timeout: float | None = None,
    ) -> AsyncGenerator[daemon_pb2.ReadAgentLogResponse, None]:
        """Chunks of an agent's log from `offset`; with `follow`, new output as written.

        The start is retried on UNAVAILABLE until the first chunk arrives;
        after that an error ends the stream (resume from the last next_offset).
        Without `call_timeout` a followed stream has no deadline (stop
        iterating to end it); otherwise the whole stream is bounded by it.
        """
        loop = asyncio.get_running_loop()
        if call_timeout is not None:
            budget: float | None = call_timeout
        else:
            budget = None if follow else self._config.call_timeout
        start_deadline = loop.time() + (budget or self._config.call_timeout)
        request = daemon_pb2.ReadAgentLogRequest(
            agent_id=agent_id, offset=offset, max_bytes=max_bytes, follow=follow
        )
        record = self._record(node_id)
        record.calls += 1
        attempt = 0
        try:
            while True:
                channel = await self._acquire(node_id, address, start_deadline)
                call = channel.stub.ReadAgentLog(
                    request, timeout=None if budget is None else start_deadline - loop.time()
                )
                started = False
                try:
                    async for response in call:
                        started = True
                        yield response
                except aio.AioRpcError as exc:
                    error = translate_error(exc, node_id=node_id, address=address)
                    if started:
                        raise error from exc
                except asyncio.CancelledError:
                    if _cancelled_by_caller():
                        raise
                    error = _cut_off(node_id)
                    if started:
                        raise error from None
                else:
                    return
                finally:
                    call.cancel()  # no-op when finished; ends the stream if the reader left
                    self._release(channel)
                await self._before_retry(
                    record, channel, error, attempt, idempotent=True, deadline=start_deadline
                )
                attempt += 1
        except FleetError:
            record.failures += 1
            raise

    async def forget(self, node_id: str) -> None:
        """Close the channel to `node_id` (e.g. the node was deleted); calls in flight fail."""
        channel = self._channels.get(node_id)
        if channel is not None:
            self._retire(channel, grace=None)
        self._records.pop(node_id, None)
        await self._finish_closing()

    # -- lifecycle --------------------------------------------------------

    def reap_idle(self) -> list[str]:
        """Close every channel unused for `idle_close_after` per the pool's clock, now.

        The reaper task calls this when the next channel is due; tests call it
        with a fake clock. Returns the node ids whose channels were closed.
        """
        expired, _ = self._idle_now()
        for node_id in expired:
            log.info("closing the idle channel to %s", node_id)
            self._retire(self._channels[node_id], grace=None)
        return expired

    async def close(self) -> None:
        """Close every channel (calls in flight are cancelled) and stop the tasks."""
        if self._closed:
            return
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for channel in list(self._channels.values()):
            self._retire(channel, grace=None)
        for channel in list(self._closing.values()):
            await channel.channel.close(None)  # cut the grace of replaced channels
        await self._finish_closing()
        if self._released is not None:  # wake callers waiting for room: they see closed
            self._released.set()

    async def __aenter__(self) -> DaemonPool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- internals ----------------------------------------------------------

    def _record(self, node_id: str) -> NodeRecord:
        record = self._records.get(node_id)
        if record is None:
            record = self._records[node_id] = NodeRecord(node_id)
        return record

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the daemon pool is closed (the manager is shutting down)")

    def _uses(self) -> Iterable[ChannelUse]:
        return (ChannelUse(c.node_id, c.last_used, c.in_flight) for c in self._channels.values())

    async def _unary(
        self,
        node_id: str,
        address: str,
        method: Callable[[DaemonServiceAsyncStub], aio.UnaryUnaryMultiCallable[_Req, _Resp]],
        request: _Req,
        *,
        idempotent: bool,
        call_timeout: float | None,
    ) -> _Resp:
        loop = asyncio.get_running_loop()
        budget = self._config.call_timeout if call_timeout is None else call_timeout
        deadline = loop.time() + budget
        record = self._record(node_id)
        record.calls += 1
        attempt = 0
        try:
            while True:
                channel = await self._acquire(node_id, address, deadline)
                try:
                    return await method(channel.stub)(request, timeout=deadline - loop.time())
                except aio.AioRpcError as exc:
                    error = translate_error(exc, node_id=node_id, address=address)
                except asyncio.CancelledError:
                    if _cancelled_by_caller():
                        raise
                    error = _cut_off(node_id)
                finally:
                    self._release(channel)
                await self._before_retry(
                    record, channel, error, attempt, idempotent=idempotent, deadline=deadline
                )
                attempt += 1
        except FleetError:
            record.failures += 1
            raise

    async def _before_retry(
        self,
        record: NodeRecord,
        channel: DaemonChannel,
        error: FleetError,
        attempt: int,
        *,
        idempotent: bool,
        deadline: float,
    ) -> None:
        """Sleep before the next attempt, or raise `error` if there is none."""
        unavailable = isinstance(error, Unavailable) and not isinstance(error, WrongDaemonIdentity)
        delay = retry_delay(
            retryable=idempotent and unavailable,
            attempt=attempt,
            max_attempts=self._config.max_attempts,
            backoff=self._config.retry,
            remaining=deadline - asyncio.get_running_loop().time(),
            rng=self._rng,
        )
        if delay is None:
            if idempotent and unavailable:
                self._give_up(channel)
            raise error
        record.retries += 1
        log.debug("%s unavailable; attempt %d in %.3f s", record.node_id, attempt + 2, delay)
        await asyncio.sleep(delay)

    def _give_up(self, channel: DaemonChannel) -> None:
        """Out of retries: close the channel (RECONNECTING -> IDLE) unless others use it."""
        if self._channels.get(channel.node_id) is channel and channel.in_flight == 0:
            log.info("giving up on %s at %s for now", channel.node_id, channel.address)
            self._retire(channel, grace=None, give_up=True)

    async def _acquire(self, node_id: str, address: str, deadline: float) -> DaemonChannel:
        self._check_open()
        if not address:
            raise FailedPrecondition(
                f"{node_id}: no daemon address known (has its daemon registered?)"
            )
        while True:
            channel = self._channels.get(node_id)
            if channel is not None and channel.address != address:
                log.info("%s moved from %s to %s", node_id, channel.address, address)
                self._retire(channel, grace=self._config.call_timeout)
                channel = None
            if channel is None:
                if len(self._channels) >= self._config.max_channels:
                    victim = eviction_victim(self._uses())
                    if victim is None:
                        await self._wait_for_room(node_id, deadline)
                        self._check_open()
                        continue
                    log.debug("evicting the channel to %s to make room", victim)
                    self._retire(self._channels[victim], grace=None)
                channel = self._open(node_id, address)
            self._channels.move_to_end(node_id)
            channel.in_flight += 1
            channel.last_used = self._clock()
            return channel

    async def _wait_for_room(self, node_id: str, deadline: float) -> None:
        if self._released is None:
            self._released = asyncio.Event()
        released = self._released
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(max(0.0, remaining)):
                await released.wait()
        except TimeoutError:
            raise ResourceExhausted(
                f"{node_id}: all {self._config.max_channels} daemon channels are busy; "
                "raise pool.max_channels or lower the fan-out concurrency"
            ) from None

    def _release(self, channel: DaemonChannel) -> None:
        channel.in_flight -= 1
        channel.last_used = self._clock()
        self._record(channel.node_id).last_used = channel.last_used
        if channel.in_flight == 0:
            if self._released is not None:
                self._released.set()
                self._released = None
            if self._reaper_sleeps_forever:
                self._reaper_wake.set()

    def _open(self, node_id: str, address: str) -> DaemonChannel:
        server_name = Identity("node", node_id, self._trust_domain).server_name
        args = channel_args(node_id, server_name, self._config)
        grpc_channel = aio.secure_channel(address, self._credentials, options=args)
        channel = DaemonChannel(
            node_id,
            address,
            grpc_channel,
            daemon_pb2_grpc.DaemonServiceStub(grpc_channel),
            args,
            now=self._clock(),
        )
        self._channels[node_id] = channel
        self._record(node_id).address = address
        self.channels_opened += 1
        channel.watcher = asyncio.create_task(self._watch(channel), name=f"pool-watch-{node_id}")
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever(), name="pool-reaper")
        elif self._reaper_sleeps_forever:
            self._reaper_wake.set()
        return channel

    def _observe(self, node_id: str, events: tuple[ConnEvent, ...]) -> None:
        record = self._record(node_id)
        before = record.connections
        if record.observe(events):
            log.debug("%s: connection %s", node_id, record.state.value)
            self._changed.set()
            self._changed = asyncio.Event()
        self.connections_opened += record.connections - before

    async def _watch(self, channel: DaemonChannel) -> None:
        """Follow the channel's connectivity until it shuts down or is replaced."""
        grpc_channel = channel.channel
        connectivity = grpc_channel.get_state(try_to_connect=False)
        while self._channels.get(channel.node_id) is channel:
            state = self._record(channel.node_id).state
            self._observe(channel.node_id, events_for(state, connectivity))
            if connectivity is grpc.ChannelConnectivity.SHUTDOWN:
                return
            await grpc_channel.wait_for_state_change(connectivity)
            connectivity = grpc_channel.get_state(try_to_connect=False)

    def _retire(
        self, channel: DaemonChannel, *, grace: float | None, give_up: bool = False
    ) -> None:
        """Take `channel` out of the pool now and close it in the background."""
        if self._channels.get(channel.node_id) is channel:
            del self._channels[channel.node_id]
            state = self._record(channel.node_id).state
            event = ConnEvent.GIVE_UP if give_up and state is ConnectionState.RECONNECTING else None
            self._observe(channel.node_id, (event or ConnEvent.CLOSE,))
        if channel.watcher is not None:
            channel.watcher.cancel()
        task = asyncio.create_task(self._close_channel(channel, grace))
        self._closing[task] = channel
        task.add_done_callback(self._closing.pop)

    async def _close_channel(self, channel: DaemonChannel, grace: float | None) -> None:
        # Grace only when calls are in flight (an address change); else at once.
        await channel.channel.close(grace if channel.in_flight else None)
        if channel.watcher is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await channel.watcher

    async def _finish_closing(self) -> None:
        while self._closing:
            await asyncio.gather(*self._closing)

    def _idle_now(self) -> tuple[list[str], float | None]:
        return idle_channels(
            self._uses(), now=self._clock(), idle_after=self._config.idle_close_after
        )

    async def _reap_forever(self) -> None:
        """Sleep until the next channel may be idle, close what is, repeat."""
        while True:
            self.reap_idle()
            _, next_due = self._idle_now()
            self._reaper_wake.clear()
            self._reaper_sleeps_forever = next_due is None
            delay = None if next_due is None else max(0.0, next_due - self._clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._reaper_wake.wait()
