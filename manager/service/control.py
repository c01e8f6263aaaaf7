"""Liveness of the nodes on control streams: no heartbeats, the stream says it.

Every `refresh` seconds the nodes with an open stream on this replica, and
those whose stream broke less than `grace` ago, get a last-seen of now in
the heartbeat buffer (one dict write each, flushed with the unary
heartbeats in the same statement), so the sweeper of whichever replica
leads never sees them silent. gRPC's keepalive pings, answered in gRPC
core, are what keep a quiet stream open: no Python runs per ping.

Once a broken stream's grace has passed without a reconnect (and this
manager's failover grace after its start), the node is marked offline at
once, only if nobody has seen it since we last did (another replica may
hold its new stream, or it heartbeats by unary RPC). The grace is kept in
wall-clock times (they are shown); a step of the wall clock moves them with
it (`liveness.StepWatch`), so a grace lasts its length across the step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from fleet.errors import FleetError
from manager.pool.stream import ControlStreams
from manager.service.heartbeats import HeartbeatBuffer
from manager.service.jobs import format_time
from manager.service.liveness import (
    StepWatch,
    StreamVerdict,
    stream_offline_at,
    stream_verdict,
)
from manager.storage import NodeRepository

__all__ = ["StreamLiveness"]

log = logging.getLogger(__name__)


class StreamLiveness:
    """Keeps connected nodes online and takes broken streams offline after the grace."""

    def __init__(
        self,
        streams: ControlStreams,
        heartbeats: HeartbeatBuffer,
        nodes: NodeRepository,
        *,
        grace: float,
        refresh: float,
        clock: Callable[[], float],
        monotonic: Callable[[], float] | None = None,
        on_offline: Callable[[int], None] = lambda _: None,
    ) -> None:
        """Nobody goes offline before `streams.quiet_until` (the failover grace's end).
        `monotonic`: what a step of `clock` is measured against (None: `clock`, no steps)."""
        self._streams = streams
        self._heartbeats = heartbeats
        self._nodes = nodes
        self._grace = grace
        self._refresh = refresh
        self._clock = clock
        self._monotonic = monotonic or clock
        self._steps = StepWatch()
        self._on_offline = on_offline
        self._seen_ms: dict[str, int] = {}  # what we last recorded for a node in its grace
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> list[str]:
        """Refresh connected and in-grace nodes; mark those past the grace offline.

        Returns the nodes marked offline.
        """
        now = self._clock()
        now_ms = int(now * 1000)
        step = self._steps.observe(now, self._monotonic())
        if step:
            await self._stepped(step, now_ms)
        quiet_until = self._streams.quiet_until
        record = self._heartbeats.record
        for node_id in self._streams.connected():
            record(node_id, now_ms)
            self._seen_ms.pop(node_id, None)
        due: dict[int, list[str]] = {}
        reasons: dict[str, str] = {}
        broken_ms: dict[str, int] = {}
        for node_id, broken_at in list(self._streams.broken_at.items()):
            verdict = stream_verdict(
                connected=False,
                broken_at=broken_at,
                now=now,
                grace=self._grace,
                quiet_until=quiet_until,
            )
            if verdict is StreamVerdict.GRACE:
                record(node_id, now_ms)
                self._seen_ms[node_id] = now_ms
            else:
                del self._streams.broken_at[node_id]
                seen = self._seen_ms.pop(node_id, int(broken_at * 1000))
                due.setdefault(seen, []).append(node_id)
                # Its last-seen was kept fresh through the grace: it was last seen, and the
                # event says, when the stream broke.
                broken_ms[node_id] = int(broken_at * 1000)
                waited = stream_offline_at(broken_at, self._grace, quiet_until) - broken_at
                reasons[node_id] = (
                    f"lost its control stream at {format_time(broken_at)} and did not"
                    f" reconnect within {waited:.0f} s"
                )
        if not due:
            return []
        await self._heartbeats.flush()  # our own grace records first: the check below reads them
        gone: list[str] = []
        for seen_ms, ids in due.items():
            gone += await self._nodes.mark_offline(
                cutoff_ms=seen_ms + 1,  # seen by anyone since: not offline
                now_ms=now_ms,
                exclude=self._heartbeats.pending_ids,
                only=ids,
                reasons=reasons,
                last_seen=broken_ms,
            )
        if gone:
            log.info(
                "%d node(s) offline after their control stream broke: %s",
                len(gone),
                ", ".join(gone[:20]),
            )
            self._on_offline(len(gone))
        return gone

    async def _stepped(self, step: float, now_ms: int) -> None:
        """The wall clock moved `step` s more than time passed: the graces move with it.
        Backwards, last-seen times in the future become now (as the sweeper does), or
        they would read as "seen since" and keep a lost node from going offline here."""
        self._streams.rebase(step)
        shift = int(step * 1000)
        self._seen_ms = {n: ms + shift for n, ms in self._seen_ms.items()}
        if step < 0:
            await self._heartbeats.flush()  # what was recorded before the step first
            await self._nodes.clamp_last_seen(now_ms)
        log.warning("the wall clock jumped %+.1f s: control stream graces moved with it", step)

    def start(self) -> None:
        """Start the periodic refresh."""
        self._stop.clear()
        self._task = asyncio.create_task(self._run(), name="stream-liveness")

    async def stop(self) -> None:
        """Stop refreshing."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._refresh)
            if self._stop.is_set():
                return
            try:
                await self.run_once()
            except FleetError as exc:
                log.warning("stream liveness: %s; retrying", exc)
            except Exception:
                log.exception("stream liveness failed unexpectedly; retrying")
