"""The pool's channels: opened lazily, bounded, watched, reaped when idle.

`Channels` owns every `grpc.aio` channel of a `DaemonPool` and the
per-daemon records that outlive them. It never sends a request; the pool
acquires a channel for each attempt and releases it afterwards.

- A watcher task per channel follows gRPC's connectivity with
  `wait_for_state_change` (no polling) and drives `manager.pool.state`.
- One reaper task sleeps until the earliest channel can be idle
  (`idle_close_after` after its last use, per the injected clock), closes
  what is idle, and sleeps again; it sleeps without a deadline while every
  channel is busy and is woken when that changes.
- At `max_channels` a new daemon evicts the least recently used channel
  without calls in flight; if all are busy it waits for one to free up,
  within the call's deadline, then fails RESOURCE_EXHAUSTED. Waiting (not
  failing at once) lets a fan-out wider than the pool proceed at the pool's
  pace instead of failing its tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from grpc import aio

from fleet.errors import FailedPrecondition, ResourceExhausted, Unavailable
from fleet.pki import Identity, Role
from fleet.v1 import daemon_pb2_grpc
from manager.pool.channel import DaemonChannel, NodeRecord, NodeStats, channel_args, node_stats
from manager.pool.config import PoolConfig
from manager.pool.policy import ChannelUse, eviction_victim, idle_channels
from manager.pool.state import ConnectionState, ConnEvent, events_for

__all__ = ["Channels"]

log = logging.getLogger(__name__)


class Channels:
    """One channel per daemon, at most `config.max_channels` of them open.

    The relay's pool of channels to peer replicas is a `Channels` too: keys
    are replica ids, `role` "manager" (the peer must present
    `manager/<replica id>`), `stub` the ReplicaService stub, and `extra_args`
    its message size limit.
    """

    def __init__(
        self,
        credentials: Callable[[], grpc.ChannelCredentials],
        trust_domain: str,
        config: PoolConfig,
        clock: Callable[[], float],
        *,
        role: Role = "node",
        stub: Callable[[aio.Channel], Any] = daemon_pb2_grpc.DaemonServiceStub,
        extra_args: Iterable[tuple[str, Any]] = (),
    ) -> None:
        self._credentials = credentials
        self._trust_domain = trust_domain
        self._config = config
        self._clock = clock
        self._role: Role = role
        self._stub = stub
        self._extra_args = tuple(extra_args)
        self._open: OrderedDict[str, DaemonChannel] = OrderedDict()  # LRU first
        self._records: dict[str, NodeRecord] = {}
        self._closing: dict[asyncio.Task[None], DaemonChannel] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._reaper_wake = asyncio.Event()
        self._reaper_sleeps_forever = False
        self._released: asyncio.Event | None = None  # created by a call waiting for room
        self._changed = asyncio.Event()  # replaced on every state change (broadcast)
        self._closed = False
        self.connections_opened = 0
        self.channels_opened = 0

    # -- observing --------------------------------------------------------

    def __len__(self) -> int:
        return len(self._open)

    def record(self, node_id: str) -> NodeRecord:
        """The long-lived record of `node_id` (created on first use)."""
        record = self._records.get(node_id)
        if record is None:
            record = self._records[node_id] = NodeRecord(node_id)
        return record

    def state(self, node_id: str) -> ConnectionState:
        """The connection state to `node_id` (IDLE for a daemon never called)."""
        record = self._records.get(node_id)
        return record.state if record else ConnectionState.IDLE

    def stats(self) -> dict[str, NodeStats]:
        """A snapshot per daemon ever called (and not forgotten)."""
        return {
            node_id: node_stats(record, self._open.get(node_id))
            for node_id, record in self._records.items()
        }

    async def wait_for_state(self, node_id: str, *states: ConnectionState) -> ConnectionState:
        """Wait until `node_id` is in one of `states`."""
        while (current := self.state(node_id)) not in states:
            await self._changed.wait()
        return current

    # -- using ------------------------------------------------------------

    async def acquire(self, node_id: str, address: str, deadline: float) -> DaemonChannel:
        """The channel to `node_id` at `address`, opened if needed, marked in use.

        `deadline` (loop time) bounds the wait for room in a full pool.
        """
        self._check_open()
        if not address:
            raise FailedPrecondition(
                f"{node_id}: no daemon address known (has its daemon registered?)"
            )
        while True:
            channel = self._open.get(node_id)
            if channel is not None and channel.address != address:
                log.info("%s moved from %s to %s", node_id, channel.address, address)
                self._retire(channel, grace=self._config.call_timeout)
                channel = None
            if channel is None:
                if len(self._open) >= self._config.max_channels:
                    victim = eviction_victim(self._uses())
                    if victim is None:
                        await self._wait_for_room(node_id, deadline)
                        self._check_open()
                        continue
                    log.debug("evicting the channel to %s to make room", victim)
                    self._retire(self._open[victim], grace=None)
                channel = self._new_channel(node_id, address)
            self._open.move_to_end(node_id)
            channel.in_flight += 1
            channel.last_used = self._clock()
            return channel

    def release(self, channel: DaemonChannel) -> None:
        """A call on `channel` ended."""
        channel.in_flight -= 1
        channel.last_used = self._clock()
        record = self._records.get(channel.node_id)  # None once forgotten
        if record is not None:
            record.last_used = channel.last_used
        if channel.in_flight == 0:
            if channel.drained is not None:
                channel.drained.set()
            if self._released is not None:
                self._released.set()
                self._released = None
            if self._reaper_sleeps_forever:
                self._reaper_wake.set()

    def give_up(self, channel: DaemonChannel) -> None:
        """Out of retries: close the channel (RECONNECTING -> IDLE) unless others use it.

        A READY channel is kept: the daemon answered (UNAVAILABLE from the
        daemon itself), so the connection is fine.
        """
        if (
            self._open.get(channel.node_id) is channel
            and channel.in_flight == 0
            and self.state(channel.node_id) is not ConnectionState.READY
        ):
            log.info("giving up on %s at %s for now", channel.node_id, channel.address)
            self._retire(channel, grace=None, give_up=True)

    # -- closing ----------------------------------------------------------

    def reap_idle(self) -> list[str]:
        """Close every channel unused for `idle_close_after` per the clock, now."""
        expired, _ = self._idle_now()
        for node_id in expired:
            log.info("closing the idle channel to %s", node_id)
            self._retire(self._open[node_id], grace=None)
        return expired

    async def forget(self, node_id: str) -> bool:
        """Close the channel to `node_id` and drop its record; True if one was open."""
        channel = self._open.get(node_id)
        closing = self._retire(channel, grace=None) if channel is not None else None
        self._records.pop(node_id, None)
        if closing is not None:
            await closing
        return channel is not None

    async def close(self) -> None:
        """Close every channel (calls in flight are cancelled) and stop the tasks."""
        if self._closed:
            return
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for channel in list(self._open.values()):
            self._retire(channel, grace=None)
        for channel in self._closing.values():
            if channel.drained is not None:
                channel.drained.set()  # cut the grace of replaced channels short
        while self._closing:
            await asyncio.gather(*self._closing)
        if self._released is not None:  # wake callers waiting for room: they see closed
            self._released.set()

    # -- internals ----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the daemon pool is closed (the manager is shutting down)")

    def _uses(self) -> Iterable[ChannelUse]:
        return (ChannelUse(c.node_id, c.last_used, c.in_flight) for c in self._open.values())

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

    def _new_channel(self, node_id: str, address: str) -> DaemonChannel:
        server_name = Identity(self._role, node_id, self._trust_domain).server_name
        args = [*channel_args(node_id, server_name, self._config), *self._extra_args]
        grpc_channel = aio.secure_channel(address, self._credentials(), options=args)
        channel = DaemonChannel(
            node_id,
            address,
            grpc_channel,
            self._stub(grpc_channel),
            args,
            now=self._clock(),
        )
        self._open[node_id] = channel
        self.record(node_id).address = address
        self.channels_opened += 1
        channel.watcher = asyncio.create_task(self._watch(channel), name=f"pool-watch-{node_id}")
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever(), name="pool-reaper")
        elif self._reaper_sleeps_forever:
            self._reaper_wake.set()
        return channel

    def _observe(self, node_id: str, events: tuple[ConnEvent, ...]) -> None:
        record = self.record(node_id)
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
        while self._open.get(channel.node_id) is channel:
            state = self.record(channel.node_id).state
            self._observe(channel.node_id, events_for(state, connectivity))
            if connectivity is grpc.ChannelConnectivity.SHUTDOWN:
                return
            await grpc_channel.wait_for_state_change(connectivity)
            connectivity = grpc_channel.get_state(try_to_connect=False)

    def _retire(
        self, channel: DaemonChannel, *, grace: float | None, give_up: bool = False
    ) -> asyncio.Task[None]:
        """Take `channel` out of the pool now and close it in the background.

        With `grace`, calls in flight get up to that long to finish first.
        """
        if self._open.get(channel.node_id) is channel:
            del self._open[channel.node_id]
            state = self.record(channel.node_id).state
            event = ConnEvent.GIVE_UP if give_up and state is ConnectionState.RECONNECTING else None
            self._observe(channel.node_id, (event or ConnEvent.CLOSE,))
        if channel.watcher is not None:
            channel.watcher.cancel()
        if grace and channel.in_flight:
            channel.drained = asyncio.Event()
        task = asyncio.create_task(self._close_channel(channel, grace))
        self._closing[task] = channel
        task.add_done_callback(self._closing.pop)
        return task

    async def _close_channel(self, channel: DaemonChannel, grace: float | None) -> None:
        # Our own grace rather than grpc's close(grace): that one cannot be
        # cut short when the pool closes, and a cancelled close leaves the
        # channel half closed.
        if channel.drained is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await channel.drained.wait()
        await channel.channel.close(None)
        if channel.watcher is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await channel.watcher

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
