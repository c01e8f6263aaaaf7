"""The daemon's side of ManagerService: register, heartbeat, metrics, state sync.

One task (`_run`) owns the connection: it dials the managers in order,
registers, then runs heartbeats, the metric sender and the state sync until
a call fails with a transport-level error; then it closes the channel, moves
to the next address and waits a full-jitter backoff (`fleet.retry.Backoff`)
before trying again, so a restarted manager is not hit by every node at once.

Independently of the connection, a producer task cuts a metric batch every
`metrics_interval` (host + agent samples + custom metrics from SDK agents),
numbers it from the persisted `SequenceFile` and puts it in the bounded
`MetricBuffer`. The sender sends the buffer strictly in order; a batch leaves
the buffer only once the manager answered it (a duplicate answer counts as
stored). RESOURCE_EXHAUSTED keeps the batch and retries it after a backoff.

A slow manager is not a dead one: DEADLINE_EXCEEDED on a heartbeat, batch or
sync keeps the connection (a dead link is found by keepalive and fails with
UNAVAILABLE) and retries with backoff, because reconnecting would re-register
and resend a full snapshot -- more load on a manager that is already behind.
The reconnect backoff only starts over once a connection carried a successful
call after its registration, so registrations that succeed and then fail
keep backing off.

A hello refused RESOURCE_EXHAUSTED with when to come back (the manager's
`fleet.control.RETRY_AFTER`: its hello admission queues the refused in time)
is sent again then, not after a backoff step (the backoff does not grow).
A hello (or RegisterNode) refused RESOURCE_EXHAUSTED (the manager's
`[control] max_hellos_per_second`), unanswered within its deadline, or whose
stream was cancelled before the welcome (CANCELLED, INTERNAL), over a
connection whose TLS handshake completed and which still stands, keeps it: the retry
after the backoff is a new stream on it, at the same address, not a new
handshake (`keep_for_retry`). Every other failure closes the channel. A new
connection gets `connect_timeout_seconds` for TCP and TLS before the hello, whose
deadline starts only then (`_connection`), so a handshake slowed by a
reconnecting fleet is not abandoned half done for another. The hello then waits
`welcome_timeout_seconds` (30 s, not a call's 10 s) for its welcome: after a
restart the manager takes hellos in turn, and one given up at 10 s was sent again
at the back of the queue while the manager might still register the first.

gRPC keepalive (see ManagerLinkConfig): a ping every `keepalive_time` (10 s)
even without calls, the link declared dead after `keepalive_timeout` (5 s)
without an ack -- so a manager that vanished without closing TCP is noticed
in ~15 s, not at the next RPC deadline.

Job reports and output uploads (daemon.jobs.reporter) run as one more task
of the connection, through the same call wrapper.

Stream mode (`[manager] control_stream`, the default; daemon.control): the
connection is one `Connect` stream instead of RegisterNode + unary calls.
The hello replaces RegisterNode; the metric sender, the state sync and the
job reporter run unchanged on the stream's stub-like methods (same call
wrapper, same buffer and sequence numbers, one answer awaited at a time per
loop, so the same order), and the manager's commands run through the
DaemonService servicer (daemon.commands). No heartbeat calls: the open
stream and the keepalive pings are the liveness. A manager that answers
Connect UNIMPLEMENTED gets the unary RPCs on the same channel, and the
stream is tried again after `stream_retry_seconds`. A broken stream is a
failed connection like any other: jittered backoff, next address.

Artifact downloads (`download_artifact`, for daemon.artifacts) use the same
address, credentials and keepalive but a channel of their own, so a large
download never queues the heartbeats behind it on one HTTP/2 connection.

Certificate renewal (daemon.renewal) calls `renew_certificate` on the open
connection, replaces the TLS files and then calls `use_new_credentials`: a
new channel with the new files is dialled and proven (one call through it)
while the old connection carries on; only then the old connection's loops
stop and the link goes on over the new channel at once (no backoff, not a
reconnect). Nothing in flight is lost: a metric batch leaves the buffer only
when answered, so one cut short is sent again on the new connection (the
manager stores a sequence once), and job reports resume from the manager's
acknowledged offsets, as after any reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import platform
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
from grpc import aio

from daemon.commands import CommandRunner
from daemon.config import ManagerLinkConfig
from daemon.control import ControlStream, StreamBroken, StreamUnimplemented, manager_auth
from daemon.link_buffer import MetricBatch, MetricBuffer, SequenceFile, split_batches
from daemon.stalls import Stalls
from daemon.supervisor.policy import STALL_SLACK
from fleet.clockskew import clock_words
from fleet.control import retry_after
from fleet.errors import FleetError, NotFound, Unavailable, from_rpc_error
from fleet.keepalive import keepalive_args
from fleet.tls import TLSConfig, channel_credentials, channel_options
from fleet.v1 import common_pb2, manager_pb2, manager_pb2_grpc

__all__ = ["LinkState", "ManagerLink", "NodeInfo", "PushedSet", "keep_for_retry", "stream_break"]

log = logging.getLogger(__name__)

CLOCK_WARN_MS = 10_000
"""A clock this far off the manager's (by its welcome) is logged: beyond NTP's business."""

LinkState = Literal["connecting", "connected", "disconnected", "stopped"]

_TRANSPORT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}
_MAX_PENDING_CUSTOM = 100_000
_SLOW = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
"""Answers that mean "the manager is behind": back off, keep the connection."""
_CUT_SHORT = {grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL}
"""How a hello's stream ends when gRPC cancels it before the welcome (INTERNAL: seen on
our write) while the connection stands: the manager's gRPC core shedding calls its event
loop has not taken yet, past 1,000 waiting, after a restart (docs/benchmarks-log.md,
i15-herd). The manager is behind: over a READY connection, kept as a slow one."""


@dataclass(frozen=True)
class NodeInfo:
    """What RegisterNode says about this node."""

    node_id: str
    """The name in this node's certificate."""
    daemon_address: str
    """host:port where the manager reaches our DaemonService."""
    labels: dict[str, str]
    """Node labels from the config."""
    daemon_version: str = ""
    """Version of the daemon software."""
    jobs_disabled: bool = False
    """This host refuses remote jobs (``[jobs] enabled = false``)."""


@dataclass(frozen=True)
class PushedSet:
    """What this node holds of the manager's pushed agents (RegisterNode, SyncAgentStates)."""

    version: int
    """The pushed set's version (0: nothing pushed yet)."""
    errors: Sequence[common_pb2.UpdateError]
    """Pushed agents not run as pushed, and why (the complete list)."""


Calls = manager_pb2_grpc.ManagerServiceStub | ControlStream
"""Where the loops send their requests: the unary stub, or the open control stream."""

JobsHook = Callable[
    [Calls, Callable[[Any, Any], Awaitable[Any]]],
    Coroutine[Any, Any, None],
]
"""Runs while connected (daemon.jobs.reporter.JobReporter.run): given the stub (or the
control stream) and the link's call wrapper; its transport errors end the connection
like the heartbeat's."""


def keep_for_retry(
    error: BaseException, *, welcomed: bool, state: grpc.ChannelConnectivity
) -> bool:
    """Whether the next attempt reuses this attempt's channel (same address, no new dial).

    Only for a hello (or RegisterNode) refused RESOURCE_EXHAUSTED, not answered
    within its deadline, or whose stream was cancelled before the welcome, and only
    if the channel is still READY (its TLS handshake completed, the connection
    stands). Anything else -- refused or broken connection, TLS error, a failure
    after the welcome -- drops the channel and moves to the next address.
    """
    if welcomed or state != grpc.ChannelConnectivity.READY:
        return False
    if isinstance(error, FleetError):
        return error.code in _SLOW
    return isinstance(error, _Reconnect) and error.code in _CUT_SHORT


class _Reconnect(Exception):
    """The current manager connection is unusable; dial again."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code
        """The call's status, if a call failed."""


class _Handover(Exception):
    """A channel with renewed credentials is ready: continue over it."""


class ManagerLink:
    """Keeps one manager informed about this node, through outages.

    `collect` returns the samples gathered since the last call (host and
    agent metrics); `snapshot` returns every agent's current state.
    `on_state` is told about link-state changes (for the Prometheus gauge);
    `pushed` says which pushed set the node runs and what it refused.
    `commands` is the DaemonService servicer the manager's commands run on
    (stream mode); without it commands are not served on the stream.
    `stalls` tells when this process last stopped running (`daemon.stalls`), so a
    stream the manager gave up on meanwhile is not blamed on the network.
    """

    def __init__(
        self,
        cfg: ManagerLinkConfig,
        *,
        tls: TLSConfig,
        trust_domain: str,
        node: NodeInfo,
        state_dir: Path,
        collect: Callable[[], Sequence[common_pb2.MetricData]],
        snapshot: Callable[[], Sequence[manager_pb2.AgentState]],
        on_state: Callable[[LinkState, str], None] | None = None,
        pushed: Callable[[], PushedSet] | None = None,
        jobs: JobsHook | None = None,
        commands: object | None = None,
        stalls: Stalls | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self._tls = tls
        self._server_name = cfg.server_name or f"manager.{trust_domain}"
        self._trust_domain = trust_domain
        self.node = node
        self._collect = collect
        self._snapshot = snapshot
        self._on_state = on_state
        self._pushed = pushed or (lambda: PushedSet(0, ()))
        self._jobs = jobs
        self.commands = commands
        """The DaemonService servicer the manager's commands run on (stream mode); None:
        commands on the stream are not served."""
        self._stalls = stalls
        self._rng = rng or random.Random()  # noqa: S311  # jitter, not crypto
        self.sequence = SequenceFile(state_dir / "metrics-sequence")
        self.buffer = MetricBuffer(cfg.buffer_batches)
        self.state: LinkState = "disconnected"
        self.address = ""
        self.heartbeat_interval = cfg.heartbeat_interval_seconds
        self.registrations = 0
        self.mode: Literal["", "stream", "unary"] = ""
        """How the current connection talks to the manager ("" while not connected)."""
        self.reconnects = 0
        """Connections (stream or unary) that failed and were dialled again."""
        self.commands_run: dict[tuple[str, str], int] = {}
        """Commands from the control stream by (method, status code name)."""
        self._stream_after = 0.0  # monotonic time before which Connect is not tried again
        self._calls_ok = 0  # successful calls, to tell a useful connection from a flapping one
        self._custom: list[common_pb2.MetricData] = []
        self.dropped_custom = 0
        self._sequence_stuck = False  # the last take() failed (a full state_dir)
        self._batch_ready = asyncio.Event()
        self._dirty = asyncio.Event()
        self._syncs = 0  # SyncAgentStates calls started
        self._syncing = False  # one is in flight
        self._answered: manager_pb2.SyncAgentStatesRequest | None = None
        self._stopping = asyncio.Event()
        self._live: aio.Channel | None = None  # the connected channel (None while not connected)
        self._is_live = asyncio.Event()
        self._next: aio.Channel | None = None  # proven with renewed credentials, not yet used
        self._kept: aio.Channel | None = None  # connected; its hello was refused or timed out
        self._retry_hint: float | None = None  # when the manager said to come back (refused hello)
        self._clock_said: int | None = None  # the clock offset last logged
        self._handover = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # --- inputs ---------------------------------------------------------

    def agents_changed(self) -> None:
        """An agent's state changed: send a snapshot soon (coalesced)."""
        self._dirty.set()

    def sync_request(self) -> manager_pb2.SyncAgentStatesRequest:
        """The SyncAgentStates this link would send now (also what a PushUpdate answer
        carries, so that the link can tell it need not send it)."""
        pushed = self._pushed()
        return manager_pb2.SyncAgentStatesRequest(
            node_id=self.node.node_id,
            states=list(self._snapshot()),
            spec_version=pushed.version,
            update_errors=pushed.errors,
        )

    def push_mark(self) -> int:
        """Taken as a PushUpdate begins; given back to `answered_with` (-1: a
        SyncAgentStates is in flight, so the answer cannot stand for the next one)."""
        return -1 if self._syncing else self._syncs

    def answered_with(self, snapshot: manager_pb2.SyncAgentStatesRequest, mark: int) -> None:
        """A PushUpdate answer carried `snapshot` to the manager, which stores it as a
        SyncAgentStates: the next sync is not sent if it would say the same. Only if no
        sync was in flight or sent while the push applied: the manager may store such
        a report after the answer, and must then get the newest snapshot after it."""
        if mark >= 0 and mark == self._syncs and not self._syncing:
            self._answered = snapshot

    def add_metrics(self, metrics: Sequence[common_pb2.MetricData]) -> None:
        """Custom samples from SDK agents, sent with the next batch."""
        room = _MAX_PENDING_CUSTOM - len(self._custom)
        if len(metrics) > room:
            self.dropped_custom += len(metrics) - max(room, 0)
            metrics = metrics[: max(room, 0)]
        self._custom.extend(metrics)

    # --- lifecycle ------------------------------------------------------

    async def start(self) -> None:
        """Start producing batches and connecting (returns at once)."""
        self._dirty.set()
        self._tasks = [
            asyncio.create_task(self._produce_loop(), name="manager-link-produce"),
            asyncio.create_task(self._run(), name="manager-link"),
        ]

    async def stop(self) -> None:
        """Stop every task and close the channel; buffered batches are not sent."""
        if not self._tasks and self.state != "stopped":
            self._stopping.set()  # never started (a daemon start that failed): nothing to say
            return
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for spare in (self._next, self._kept):
            if spare is not None:
                with contextlib.suppress(Exception):
                    await spare.close(None)
        self._next = self._kept = None
        self._set_state("stopped")

    def cut_batch(self) -> list[MetricBatch]:
        """Gather samples now and buffer them as numbered batches."""
        metrics = list(self._collect())
        metrics.extend(self._custom)
        self._custom = []
        made: list[MetricBatch] = []
        chunks = split_batches(metrics, self.cfg.batch_max_samples)
        for i, chunk in enumerate(chunks):
            try:
                number = self.sequence.take()
            except OSError as exc:
                # No number can be persisted (a full state_dir): keep the samples for the
                # next cut rather than lose them, and say so once, not every interval.
                self.add_metrics([m for rest in chunks[i:] for m in rest])
                if not self._sequence_stuck:
                    self._sequence_stuck = True
                    log.error(  # noqa: TRY400 -- one clear line, no traceback
                        "cannot persist the metric sequence number in %s (%s); metric "
                        "samples are kept in memory (up to %d) until it can",
                        self.sequence.path,
                        exc.strerror or exc,
                        _MAX_PENDING_CUSTOM,
                    )
                break
            if self._sequence_stuck:
                self._sequence_stuck = False
                log.warning("metric sequence number persisted again; sending kept samples")
            batch = MetricBatch(number, tuple(chunk))
            dropped = self.buffer.add(batch)
            if dropped is not None:
                log.warning(
                    "manager unreachable: metric buffer full (%d batches); dropped batch %d "
                    "with %d samples (%d batches dropped so far)",
                    self.buffer.capacity,
                    dropped.sequence,
                    len(dropped.metrics),
                    self.buffer.dropped_batches,
                )
            made.append(batch)
        if made:
            self._batch_ready.set()
        return made

    async def download_artifact(
        self, digest: str, offset: int
    ) -> AsyncIterator[manager_pb2.DownloadArtifactResponse]:
        """DownloadArtifact from `offset`, from the manager the link uses (or last tried).

        Every failure is a FleetError: the manager's answer, or Unavailable
        naming the address when it cannot be reached, the stream breaks, or
        no piece arrives within rpc_timeout_seconds.
        """
        address = self.address or self.cfg.addresses[0]
        timeout = self.cfg.rpc_timeout_seconds
        channel = self._channel(address)
        call = None
        try:
            stub = manager_pb2_grpc.ManagerServiceStub(channel)
            call = stub.DownloadArtifact(
                manager_pb2.DownloadArtifactRequest(
                    node_id=self.node.node_id, digest=digest, offset=offset
                )
            )
            pieces = aiter(call)
            while True:
                async with asyncio.timeout(timeout):
                    piece = await anext(pieces, None)
                if piece is None:
                    return
                yield piece
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, target=f"manager {address}") from None
        except TimeoutError:
            raise Unavailable(f"manager {address}: no data for {timeout:g}s") from None
        finally:
            if call is not None:
                call.cancel()
            with contextlib.suppress(Exception):
                await channel.close(None)

    async def renew_certificate(
        self, request: manager_pb2.RenewCertificateRequest
    ) -> manager_pb2.RenewCertificateResponse:
        """RenewCertificate on the open connection (the node's current mTLS identity).

        Waits up to rpc_timeout_seconds for a connection; Unavailable if there
        is none, else the manager's answer or its error as a FleetError.
        """
        timeout = self.cfg.rpc_timeout_seconds
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._is_live.wait()
        channel = self._live
        if channel is None:
            raise Unavailable(f"not connected to a manager (tried {self.address or 'none yet'})")
        address = self.address
        try:
            reply: manager_pb2.RenewCertificateResponse = await manager_pb2_grpc.ManagerServiceStub(
                channel
            ).RenewCertificate(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, target=f"manager {address}") from None
        return reply

    async def use_new_credentials(self) -> bool:
        """The TLS files were replaced: move the connection to a channel that uses them.

        The new channel is dialled and proven with one call while the current
        connection carries on; then the link continues over it (module doc).
        False, with a warning, if it cannot be proven: the current connection
        stays, and the next reconnect reads the new files anyway.
        """
        address = self.address
        if self._live is None or self._stopping.is_set():
            return False  # not connected: the next dial reads the new files
        try:
            creds = await asyncio.to_thread(channel_credentials, self._tls)
        except FleetError as exc:
            log.warning(
                "the renewed TLS files are unusable, staying on the old connection: %s", exc
            )
            return False
        channel = self._channel(address, creds)
        try:
            await _prove(channel, self.cfg.rpc_timeout_seconds)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await channel.close(None)
            log.warning(
                "manager %s: cannot connect with the renewed certificate (%s); the current"
                " connection stays until it ends",
                address,
                _describe(exc),
            )
            return False
        if self._live is None or address != self.address or self._stopping.is_set():
            with contextlib.suppress(Exception):
                await channel.close(None)
            return False
        if self._next is not None:
            with contextlib.suppress(Exception):
                await self._next.close(None)
        self._next = channel
        self._handover.set()
        return True

    # --- internals ------------------------------------------------------

    def _set_state(self, state: LinkState) -> None:
        if state != self.state:
            log.info("manager link %s%s", state, f" ({self.address})" if self.address else "")
        self.state = state
        if self._on_state is not None:
            self._on_state(state, self.address)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, waking early only when the link is being stopped.

        asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that
        races with the inner wait finishing, which would leave a loop running.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(seconds, 0.0)):
                await self._stopping.wait()

    async def _produce_loop(self) -> None:
        while not self._stopping.is_set():
            await self._sleep(self.cfg.metrics_interval_seconds)
            try:
                self.cut_batch()
            except Exception:
                log.exception("could not gather metrics; trying again next interval")

    def _channel(
        self, address: str, credentials: grpc.ChannelCredentials | None = None
    ) -> aio.Channel:
        options: list[tuple[str, Any]] = [
            *channel_options(self._server_name),
            *keepalive_args(
                self.cfg.keepalive_time_seconds,
                self.cfg.keepalive_timeout_seconds,
                self.cfg.ping_timeout_seconds,
            ),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # Every attempt gets a new channel and the link does its own jittered
            # backoff, so gRPC's reconnects never help: make them rare, so that a
            # closed channel a failed call still holds cannot redial during the wait.
            ("grpc.initial_reconnect_backoff_ms", 60_000),
            ("grpc.max_reconnect_backoff_ms", 120_000),
        ]
        creds = credentials if credentials is not None else channel_credentials(self._tls)
        return aio.secure_channel(address, creds, options=options)

    async def _run(self) -> None:
        attempt = 0
        index = 0
        addresses = self.cfg.addresses
        while not self._stopping.is_set():
            self.address = addresses[index % len(addresses)]
            self._set_state("connecting")
            kept, self._kept = self._kept, None
            if kept is not None and (
                self._next is not None
                or kept.get_state(try_to_connect=False) != grpc.ChannelConnectivity.READY
            ):
                # The kept connection went meanwhile (or renewed files came): dial anew.
                with contextlib.suppress(Exception):
                    await kept.close(None)
                kept = None
            dialled = self._next is None and kept is None
            channel, self._next = self._next or kept or self._channel(self.address), None
            calls_at_register: int | None = None
            delay: float | None = None
            self._retry_hint = None
            try:
                if dialled:
                    await _connection(channel, self.cfg.connect_timeout_seconds)
                stub = manager_pb2_grpc.ManagerServiceStub(channel)
                stream = await self._open_stream(stub)
                if stream is not None:
                    calls_at_register = self._calls_ok
                    self.mode = "stream"
                    self._went_live(channel)
                    try:
                        await self._connected(stream, stream.wait_broken())
                    finally:
                        await stream.close()
                else:
                    await self._register(stub)
                    calls_at_register = self._calls_ok
                    self.mode = "unary"
                    self._went_live(channel)
                    await self._connected(stub, self._heartbeat_loop(stub))
            except _Handover:
                # Renewed credentials: the new channel is proven, go on over it now.
                self.mode = ""
                log.info("manager %s: continuing with the renewed certificate", self.address)
            except Exception as exc:  # any failure: drop the connection and dial again
                if not isinstance(
                    exc, _Reconnect | StreamBroken | grpc.RpcError | FleetError | OSError
                ):
                    log.exception("manager link failed unexpectedly")
                streamed = self.mode == "stream"
                self.mode = ""
                self.reconnects += 1
                self._set_state("disconnected")
                hint = self._take_retry_hint()
                if calls_at_register is not None and self._calls_ok > calls_at_register:
                    attempt = 0  # the connection was useful: the manager is not struggling
                delay = self.cfg.reconnect.delay(attempt, self._rng)
                attempt += 1
                if keep_for_retry(
                    exc,
                    welcomed=calls_at_register is not None,
                    state=channel.get_state(try_to_connect=False),
                ):
                    if hint is not None:
                        # The manager said when its turn is (it queues the refused in
                        # time): that instead of a backoff step, plus a little jitter.
                        delay = hint * self._rng.uniform(1.0, 1.1)
                        attempt -= 1
                    # The hello was refused or not answered in time over a connection whose
                    # TLS handshake completed: the retry after the backoff is a new stream on
                    # it, not a new handshake (~3 ms of the manager's CPU each, which after a
                    # restart is most of its work). Same address: a busy replica that refuses
                    # is still the one holding this node's connection.
                    self._kept = channel
                    log.warning(
                        "manager %s: %s; next try in %.1fs on the same connection",
                        self.address,
                        _describe(exc),
                        delay,
                    )
                elif streamed:  # a live stream broke: said in our words, not gRPC's
                    index += 1
                    log.warning(
                        "manager %s: %s; reconnecting with backoff, next try in %.1fs",
                        self.address,
                        self._stream_break(_describe(exc)),
                        delay,
                    )
                else:
                    index += 1
                    log.warning(
                        "manager %s: %s; next try in %.1fs", self.address, _describe(exc), delay
                    )
            finally:
                self._live = None
                self._is_live.clear()
                if self._kept is not channel:
                    with contextlib.suppress(Exception):
                        await channel.close(None)
            if delay is not None:
                # Not inside `except`: the caught error holds the failed call, which keeps the
                # closed channel alive and gRPC redialing every <= 2 s for the whole backoff.
                # (A kept channel is open and connected: its failed hello holds nothing closed.)
                # A failed stream's call ends in a reference cycle with gRPC's own callbacks,
                # which only the collector frees, once those callbacks ran: free it now.
                # Only with streams: a full collection per retry is a cost many links in
                # one process (bench/fleetsim) would pay on every reconnect.
                if self.cfg.control_stream:
                    await asyncio.sleep(0.05)
                    gc.collect()
                    delay = max(0.0, delay - 0.05)
                await self._sleep(delay)

    def _stream_break(self, error: str) -> str:
        # A stream that broke just after this process stalled was given up by the manager's
        # keepalive while this daemon could not answer: the network is not to blame.
        cfg = self.cfg
        within = cfg.keepalive_time_seconds + cfg.keepalive_timeout_seconds + STALL_SLACK
        stalled = self._stalls.stalled(time.monotonic(), within) if self._stalls else None
        if stalled is not None:
            return (
                f"the control stream ended after this daemon was not running for {stalled:.1f} s"
                " (stopped by a signal, swapped out or its VM paused): the manager stopped"
                " waiting for it"
            )
        return stream_break(error, cfg.keepalive_timeout_seconds)

    def _take_retry_hint(self) -> float | None:
        """When the manager said to come back after refusing this attempt's hello (once)."""
        hint, self._retry_hint = self._retry_hint, None
        return hint

    def _went_live(self, channel: aio.Channel) -> None:
        self._live = channel
        self._is_live.set()
        self._handover.clear()  # renewed files are what this channel was dialled with
        self._set_state("connected")

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            reply = await method(request, timeout=self.cfg.rpc_timeout_seconds)
        except grpc.RpcError as exc:
            if exc.code() in _TRANSPORT:
                raise _Reconnect(f"{exc.code().name}: {exc.details()}", exc.code()) from exc
            raise from_rpc_error(exc, target=self.address) from exc
        self._calls_ok += 1
        return reply

    def _hello(self) -> manager_pb2.RegisterNodeRequest:
        """What RegisterNode (and the stream's hello) says about this node."""
        return manager_pb2.RegisterNodeRequest(
            node_id=self.node.node_id,
            hostname=socket.gethostname(),
            # No listen address (control stream only): the address it reaches the manager from.
            ip=_host_ip(self.node.daemon_address) or _route_ip(self.address),
            os=platform.system().lower(),
            arch=platform.machine(),
            labels=self.node.labels,
            daemon_version=self.node.daemon_version,
            daemon_address=self.node.daemon_address,
            spec_version=self._pushed().version,
            jobs_disabled=self.node.jobs_disabled,
            time=int(time.time() * 1000),  # the manager shows how far this host's clock is off
        )

    async def _open_stream(self, stub: manager_pb2_grpc.ManagerServiceStub) -> ControlStream | None:
        """The open control stream after its welcome; None: use the unary RPCs."""
        if not self.cfg.control_stream or time.monotonic() < self._stream_after:
            return None
        try:
            stream, welcome = await ControlStream.open(
                stub,
                self._hello(),
                rpc_timeout=self.cfg.rpc_timeout_seconds,
                # Longer than a call's: a hello given up is sent again at the back of
                # the restarted manager's queue, and the one given up was work for nobody.
                welcome_timeout=self.cfg.welcome_timeout_seconds,
                commands=self._runner if self.commands is not None else None,
            )
        except StreamUnimplemented as exc:
            self._stream_after = time.monotonic() + self.cfg.stream_retry_seconds
            log.warning(
                "manager %s does not serve the control stream (%s): using the unary RPCs,"
                " trying the stream again in %.0fs",
                self.address,
                exc,
                self.cfg.stream_retry_seconds,
            )
            return None
        except grpc.RpcError as exc:  # the hello refused: as RegisterNode's error
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self._retry_hint = retry_after(exc.trailing_metadata())
            if exc.code() in _TRANSPORT:
                raise _Reconnect(f"{exc.code().name}: {exc.details()}", exc.code()) from exc
            raise from_rpc_error(exc, target=self.address) from exc
        self._calls_ok += 1
        self._welcomed(welcome)
        return stream

    def _runner(self, stream: ControlStream) -> CommandRunner:
        return CommandRunner(
            self.commands,
            stream.send_result,
            auth=manager_auth(self._server_name, self._trust_domain),
            peer=self.address,
            on_done=self._command_done,
        )

    def _command_done(self, method: str, code: grpc.StatusCode) -> None:
        key = (method, code.name)
        self.commands_run[key] = self.commands_run.get(key, 0) + 1

    def _check_clock(self, reply: manager_pb2.RegisterNodeResponse) -> None:
        """Say (once, and again if it changes) that this host's clock is off the manager's:
        the welcome's `server_time` was stamped a moment ago."""
        if reply.server_time <= 0:
            return
        offset = int(time.time() * 1000) - reply.server_time
        if abs(offset) < CLOCK_WARN_MS:
            self._clock_said = None
            return
        if self._clock_said is not None and abs(offset - self._clock_said) < CLOCK_WARN_MS:
            return
        self._clock_said = offset
        log.warning("this host's clock is %s", clock_words(offset))

    def _welcomed(self, reply: manager_pb2.RegisterNodeResponse) -> None:
        self._check_clock(reply)
        self.registrations += 1
        if reply.heartbeat_interval_ms > 0:
            self.heartbeat_interval = reply.heartbeat_interval_ms / 1000
        self._dirty.set()  # a (re)registered node gets a full snapshot
        self._answered = None
        log.info(
            "connected to manager %s as node %s over the control stream",
            self.address,
            self.node.node_id,
        )

    async def _register(self, stub: Calls) -> None:
        if isinstance(stub, ControlStream):
            # The manager forgot this node mid-stream: a new stream says hello again.
            raise _Reconnect("the manager does not know this node; saying hello again")
        reply: manager_pb2.RegisterNodeResponse = await self._call(stub.RegisterNode, self._hello())
        self._check_clock(reply)
        self.registrations += 1
        if reply.heartbeat_interval_ms > 0:
            self.heartbeat_interval = reply.heartbeat_interval_ms / 1000
        self._dirty.set()  # a (re)registered node gets a full snapshot
        self._answered = None
        log.info(
            "registered with manager %s as node %s (heartbeat every %.1fs)",
            self.address,
            self.node.node_id,
            self.heartbeat_interval,
        )

    async def _connected(self, stub: Calls, liveness: Coroutine[Any, Any, None]) -> None:
        """Run the loops until one fails; `liveness` is the heartbeat loop, or the
        stream's end (no heartbeat calls on a stream)."""
        tasks = [
            asyncio.create_task(liveness, name="manager-liveness"),
            asyncio.create_task(self._send_loop(stub), name="manager-metrics"),
            asyncio.create_task(self._sync_loop(stub), name="manager-sync"),
        ]
        if self._jobs is not None:
            tasks.append(asyncio.create_task(self._jobs(stub, self._call), name="manager-jobs"))
        if not isinstance(stub, ControlStream) and self.cfg.control_stream:
            tasks.append(asyncio.create_task(self._stream_retry(), name="manager-stream-retry"))
        tasks.append(asyncio.create_task(self._wait_handover(), name="manager-handover"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            exc = task.exception()
            if exc is not None:
                raise exc

    async def _wait_handover(self) -> None:
        """Ends the connection once `use_new_credentials` proved a new channel."""
        await self._handover.wait()
        raise _Handover

    async def _stream_retry(self) -> None:
        """In unary mode after an UNIMPLEMENTED Connect: reconnect to try the stream again."""
        await self._sleep(self._stream_after - time.monotonic())
        if not self._stopping.is_set():
            raise _Reconnect("trying the control stream again")

    async def _heartbeat_loop(self, stub: manager_pb2_grpc.ManagerServiceStub) -> None:
        while True:
            await self._sleep(self.heartbeat_interval)
            if self._stopping.is_set():
                return
            try:
                reply: manager_pb2.HeartbeatResponse = await self._call(
                    stub.Heartbeat,
                    manager_pb2.HeartbeatRequest(
                        node_id=self.node.node_id, timestamp=int(time.time() * 1000)
                    ),
                )
            except NotFound:
                log.info("manager %s does not know this node; registering again", self.address)
                await self._register(stub)
                continue
            except FleetError as exc:
                if exc.code not in _SLOW:
                    raise
                log.info("manager slow on heartbeat (%s); next one on schedule", exc.code.name)
                continue
            if reply.heartbeat_interval_ms > 0:
                self.heartbeat_interval = reply.heartbeat_interval_ms / 1000

    async def _send_loop(self, stub: Calls) -> None:
        busy = 0  # consecutive RESOURCE_EXHAUSTED answers
        while not self._stopping.is_set():
            batch = self.buffer.peek()
            if batch is None:
                self._batch_ready.clear()
                await self._batch_ready.wait()
                continue
            try:
                await self._call(
                    stub.ReportMetrics,
                    manager_pb2.ReportMetricsRequest(
                        node_id=self.node.node_id, metrics=batch.metrics, sequence=batch.sequence
                    ),
                )
            except FleetError as exc:
                if exc.code in _SLOW:
                    # Safe to resend: the manager stores a (node, sequence) once.
                    delay = self.cfg.reconnect.delay(busy, self._rng)
                    busy += 1
                    log.info(
                        "manager busy (%s); batch %d kept, retry in %.1fs",
                        exc.code.name,
                        batch.sequence,
                        delay,
                    )
                    await self._sleep(delay)
                    continue
                if exc.code == grpc.StatusCode.NOT_FOUND:
                    await self._register(stub)
                    continue
                # The manager refuses this batch's content: retrying cannot help.
                log.warning("manager refused metric batch %d, dropped: %s", batch.sequence, exc)
                self.buffer.pop(batch.sequence)
                continue
            busy = 0
            self.buffer.pop(batch.sequence)

    async def _sync_loop(self, stub: Calls) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.sync_interval_seconds):
                    await self._dirty.wait()
            await self._sleep(self.cfg.sync_coalesce_seconds)  # gather a burst of changes
            if self._stopping.is_set():
                return
            self._dirty.clear()
            request = self.sync_request()
            answered, self._answered = self._answered, None
            if answered is not None and _same_report(answered, request):
                continue  # a push's answer carried this very snapshot
            self._syncs += 1
            self._syncing = True
            try:
                await self._call(stub.SyncAgentStates, request)
            except NotFound:
                self._dirty.set()
                await self._register(stub)
            except FleetError as exc:
                if exc.code in _SLOW:
                    self._dirty.set()  # send the newest snapshot after a pause
                    await self._sleep(self.cfg.reconnect.delay(0, self._rng))
                    continue
                log.warning("manager refused the agent states: %s", exc)
            finally:
                self._syncing = False


def _same_report(
    a: manager_pb2.SyncAgentStatesRequest, b: manager_pb2.SyncAgentStatesRequest
) -> bool:
    """The two snapshots say the same, the ages aside (they grow by the time between)."""
    return bool(_without_ages(a) == _without_ages(b))


def _without_ages(
    request: manager_pb2.SyncAgentStatesRequest,
) -> manager_pb2.SyncAgentStatesRequest:
    out = manager_pb2.SyncAgentStatesRequest()
    out.CopyFrom(request)
    for st in out.states:
        st.ClearField("health_age_ms")
        st.ClearField("start_age_ms")
    return out


async def _connection(channel: aio.Channel, timeout: float) -> None:  # noqa: ASYNC109
    """Wait for a new channel's connection (TCP + TLS handshake) to be up or to fail
    (the hello then fails at once, with gRPC's reason); _Reconnect after `timeout`.

    The hello's deadline starts only then: after a manager restart its handshakes
    are slow, and a hello deadline that counted the handshake abandoned handshakes
    the manager had half done, to dial again and start another.
    """
    done = (
        grpc.ChannelConnectivity.READY,
        grpc.ChannelConnectivity.TRANSIENT_FAILURE,
        grpc.ChannelConnectivity.SHUTDOWN,
    )
    state = channel.get_state(try_to_connect=True)
    try:
        async with asyncio.timeout(timeout):
            while state not in done:
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)
    except TimeoutError:
        raise _Reconnect(f"no connection (TCP + TLS) within {timeout:g}s") from None


async def _prove(channel: aio.Channel, timeout: float) -> None:  # noqa: ASYNC109
    """Raise unless a call reaches the server through `channel` within `timeout`.

    A TLS 1.3 client sees its handshake done before the server checked its
    certificate, so readiness proves nothing: one health check does. Any
    answer but UNAVAILABLE or DEADLINE_EXCEEDED (UNIMPLEMENTED from a server
    without health, say) came from the server over the new credentials.
    """
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=lambda raw: raw,
        response_deserializer=lambda raw: raw,
    )
    try:
        await check(b"", timeout=timeout)
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# gRPC's words for a connection its keepalive (or TCP_USER_TIMEOUT, which gRPC sets to
# the keepalive timeout) gave up on: "keepalive watchdog timeout", "Stream removed
# (recvmsg:Connection timed out (110))", "ping timeout".
_TIMED_OUT = ("keepalive", "ping timeout", "timed out")
# What grpc's asyncio client says when the call ends while it writes, whatever the cause
# (grpc/grpc#36066): after a cut, a write that loses the race with the read.
_HIDDEN = "internal error from core"


def stream_break(error: str, keepalive_timeout: float) -> str:
    """Why a live control stream ended, in the daemon's words, from gRPC's error text
    (the log says "manager <address>: <this>; reconnecting ...")."""
    low = error.lower()
    if any(m in low for m in _TIMED_OUT):
        return (
            f"unreachable, its keepalive ping unanswered for {keepalive_timeout:g} s"
            " (network cut, or the manager host down)"
        )
    if _HIDDEN in low:
        return (
            "the control stream ended while the daemon was sending: the manager closed it"
            " or became unreachable (gRPC does not say which)"
        )
    return f"the control stream ended: {error}"


def _host_ip(address: str) -> str:
    host = address.rpartition(":")[0].strip("[]")
    try:
        return socket.gethostbyname(host) if host else ""
    except OSError:
        return ""


def _route_ip(manager: str) -> str:
    """This host's source address toward `manager` (host:port); "" if there is no route.

    A UDP socket's connect only picks the route and source address: nothing is sent.
    """
    host, _, port = manager.rpartition(":")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host.strip("[]"), int(port or 0), type=socket.SOCK_DGRAM
        )[0]
        with socket.socket(family, kind, proto) as sock:
            sock.connect(addr)
            return str(sock.getsockname()[0])
    except (OSError, ValueError, IndexError):
        return ""
