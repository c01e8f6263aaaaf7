"""Node registration and heartbeats: the service layer's decisions.

Known node ids are cached in memory (loaded at start, added on register) so
a heartbeat costs a set lookup and a dict write; a miss falls back to the
database because another replica may have registered the node.

Registrations are group-committed: the ones that arrive while a batch is
being written go together in the next transaction, so a registration storm
(a fresh manager, a whole fleet restarting) is not one commit per node.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from fleet.errors import InvalidArgument, NotFound
from manager.service.heartbeats import HeartbeatBuffer
from manager.service.liveness import (
    LivenessPolicy,
    TtlHighWater,
    heartbeat_ttl,
    jittered_interval,
)
from manager.service.model import Registration
from manager.service.validation import validate_registration
from manager.storage import NodeRecord, NodeRepository
from manager.storage.nodes import Upserted

__all__ = ["NodeRegistry", "RegisterResult", "RegistrationBatches"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisterResult:
    """The answer to a RegisterNode."""

    created: bool
    """False when the node was known (re-registration)."""
    changed: bool
    """It changed what convergence and the job driver read (`Upserted.changed`), or this
    replica had not known the node: they need a pass. False for a reconnect as it was."""
    heartbeat_interval_ms: int
    """How often this node should heartbeat."""
    server_time_ms: int
    """The manager's clock."""


_Pending = tuple[NodeRecord, int, "asyncio.Future[Upserted]"]


class RegistrationBatches:
    """Group commit of registrations through `NodeRepository.upsert_many`."""

    def __init__(
        self, nodes: NodeRepository, *, max_batch: int = 500, max_skew_ms: int = 0
    ) -> None:
        self._nodes = nodes
        self._max = max_batch
        self._max_skew_ms = max_skew_ms  # a NODE_CLOCK_SKEW event when a node crosses it
        self._queue: collections.deque[_Pending] = collections.deque()
        self._task: asyncio.Task[None] | None = None

    async def submit(self, node: NodeRecord, now_ms: int) -> Upserted:
        """Store `node` (registered at `now_ms`); whether it was new, or changed."""
        done: asyncio.Future[Upserted] = asyncio.get_running_loop().create_future()
        self._queue.append((node, now_ms, done))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="registrations")
        return await done

    async def _drain(self) -> None:
        while self._queue:
            batch = self._take()
            try:
                outcomes = await self._write(batch)
            except BaseException as exc:
                outcomes = [exc] * len(batch)
                if not isinstance(exc, Exception):  # cancelled: answer, then stop
                    _answer(batch, outcomes)
                    raise
            _answer(batch, outcomes)

    def _take(self) -> list[_Pending]:
        """Up to max_batch queued registrations, one per node id (a repeat waits),
        leaving out those whose caller is gone."""
        batch: list[_Pending] = []
        repeats: list[_Pending] = []
        seen: set[str] = set()
        while self._queue and len(batch) < self._max:
            item = self._queue.popleft()
            if item[2].done():
                # Its caller went away while it queued (the stream broke, the daemon's
                # deadline passed): never acknowledged, so not written. Under a
                # reconnect storm these were most of the queue; the daemon registers
                # again on its next stream.
                continue
            if item[0].node_id in seen:
                repeats.append(item)
            else:
                seen.add(item[0].node_id)
                batch.append(item)
        self._queue.extendleft(reversed(repeats))
        return batch

    async def _write(self, batch: list[_Pending]) -> list[Upserted | BaseException]:
        pairs = [(node, ms) for node, ms, _ in batch]
        try:
            return list(await self._nodes.upsert_many(pairs, max_skew_ms=self._max_skew_ms))
        except InvalidArgument:
            if len(batch) == 1:
                raise
        # The database refused something validation let through: one at a
        # time, so only that registration fails.
        outcomes: list[Upserted | BaseException] = []
        for pair in pairs:
            try:
                outcomes.extend(
                    await self._nodes.upsert_many([pair], max_skew_ms=self._max_skew_ms)
                )
            except Exception as exc:
                outcomes.append(exc)
        return outcomes


def _answer(batch: list[_Pending], outcomes: list[Upserted | BaseException]) -> None:
    for (_, _, done), outcome in zip(batch, outcomes, strict=True):
        if done.done():  # the caller went away (deadline); its node is stored anyway
            continue
        if isinstance(outcome, asyncio.CancelledError):
            done.cancel()
        elif isinstance(outcome, BaseException):
            done.set_exception(outcome)
        else:
            done.set_result(outcome)


class NodeRegistry:
    """Registers nodes, takes heartbeats, and hands out heartbeat intervals."""

    def __init__(
        self,
        nodes: NodeRepository,
        heartbeats: HeartbeatBuffer,
        *,
        policy: LivenessPolicy,
        max_clock_skew: float,
        clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self._nodes = nodes
        self._heartbeats = heartbeats
        self._policy = policy
        self._skew_ms = int(max_clock_skew * 1000)
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self._known: set[str] = set()
        self._fleet_size = 0
        self._registrations = RegistrationBatches(nodes, max_skew_ms=self._skew_ms)
        self.high_water = TtlHighWater()

    async def load(self) -> None:
        """Load known node ids (at start) and the fleet size."""
        self._known = await self._nodes.known_ids()
        self._fleet_size = len(self._known)

    def set_fleet_size(self, nodes: int) -> None:
        """Update the fleet size the ttl scales with (all replicas' nodes)."""
        self._fleet_size = max(nodes, len(self._known))

    @property
    def fleet_size(self) -> int:
        """Nodes the ttl is computed for."""
        return self._fleet_size

    def now_ms(self) -> int:
        """The manager's clock in epoch ms."""
        return int(self._clock() * 1000)

    def ttl(self) -> float:
        """The base interval for the current fleet size."""
        return heartbeat_ttl(self._fleet_size, self._policy.min_ttl, self._policy.max_rate)

    def sweep_ttl(self) -> float:
        """The base ttl the sweeper must assume: the longest any node may hold."""
        return max(self.ttl(), self.high_water.effective(self._clock(), self._policy))

    def interval_ms(self) -> int:
        """A jittered interval to hand to one node."""
        ttl = self.ttl()
        self.high_water.note(ttl, self._clock(), self._policy)
        return int(jittered_interval(ttl, self._policy.jitter, self._rng) * 1000)

    async def register(self, reg: Registration) -> RegisterResult:
        """Validate and upsert a node; it is online from now."""
        validate_registration(reg)
        now_ms = self.now_ms()
        # How far the node's clock is off ours (the network delay counts in it: a round
        # trip at most); shown by `nodes show`, an event when beyond max_clock_skew.
        offset = reg.clock_ms - now_ms if reg.clock_ms > 0 else None
        record = NodeRecord(
            node_id=reg.node_id,
            hostname=reg.hostname,
            ip=reg.ip,
            os=reg.os,
            arch=reg.arch,
            labels=dict(reg.labels),
            daemon_version=reg.daemon_version,
            agent_version=reg.agent_version,
            daemon_address=reg.daemon_address,
            jobs_disabled=reg.jobs_disabled,
            cert_not_after_ms=reg.cert_not_after_ms,
            clock_offset_ms=offset,
            status="online",
            last_seen_ms=now_ms,
            registered_at_ms=now_ms,
        )
        upserted = await self._registrations.submit(record, now_ms)
        if upserted.clock_news:
            log.warning("%s", upserted.clock_news)
        changed = upserted.changed
        if reg.node_id not in self._known:
            changed = True  # registered by another replica since this one loaded its ids
            self._known.add(reg.node_id)
            self._fleet_size = max(self._fleet_size + 1, len(self._known))
        return RegisterResult(upserted.created, changed, self.interval_ms(), now_ms)

    def forget(self, node_id: str) -> None:
        """`node_id` was deleted: its next heartbeat is NOT_FOUND (so it registers again)."""
        self._known.discard(node_id)

    async def is_known(self, node_id: str) -> bool:
        """True if the node registered (here or with another replica)."""
        if node_id in self._known:
            return True
        if await self._nodes.get(node_id) is None:
            return False
        self._known.add(node_id)
        return True

    async def require_known(self, node_id: str) -> None:
        """NotFound (register again) for a node this fleet does not know."""
        if not await self.is_known(node_id):
            raise NotFound(f"node {node_id!r} is not registered; call RegisterNode first")

    async def heartbeat(self, node_id: str, timestamp_ms: int) -> int:
        """Record a heartbeat; returns the interval the node should use now."""
        now_ms = self.now_ms()
        if timestamp_ms < 0:
            raise InvalidArgument(
                f"must be >= 0 (ms since the epoch), got {timestamp_ms}", field="timestamp"
            )
        await self.require_known(node_id)
        # The manager's clock, not the node's: liveness is judged on it. A node whose clock
        # is off is alive all the same; refusing its heartbeats made a unary daemon
        # reconnect and register again every few seconds. Its offset is measured at
        # registration (`nodes show`, NODE_CLOCK_SKEW).
        self._heartbeats.record(node_id, now_ms)
        return self.interval_ms()
