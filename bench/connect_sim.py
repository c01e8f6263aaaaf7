"""Simulated daemons on the control channel (`ManagerService.Connect`).

Written from the protocol alone (manager.proto's Connect messages and
fleet/control.py), not from the daemon's code, so the tests and the
benchmark check the manager against the protocol as specified:

- `ControlStream`: one open Connect stream, with ids for upward messages,
  answers matched by `reply_to`, and commands handed to a callback. The
  fuzzers and fault tests drive it message by message.
- `ConnectNode`: a whole simulated daemon on one stream: hello, a snapshot
  of its agents, numbered metric batches kept until acknowledged (resent in
  order after a reconnect, so an acknowledged batch is stored once and none
  is lost), state changes now and then, and the manager's commands served by
  a `bench.sim.SimDaemon` (in-memory agents) with pieces, deadlines,
  cancellation and credit, reconnecting with full-jitter backoff.

Every metric batch carries one sample ``values["batch"] = <its sequence>``
(as bench/fleetsim.py), so a test can check each was stored exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from bench.sim import SimDaemon
from fleet.control import METHODS, PIECE_BYTES, Reassembler, pieces, retry_after
from fleet.errors import FleetError
from fleet.keepalive import keepalive_args
from fleet.retry import Backoff
from fleet.tls import TLSConfig, channel_credentials, channel_options
from fleet.v1 import common_pb2, manager_pb2

__all__ = [
    "ConnectNode",
    "ControlStream",
    "NoConnection",
    "Refused",
    "StreamEnded",
    "keepalive_options",
]

CONNECT = "/fleet.v1.ManagerService/Connect"
REQUEST_LIMIT = 16 * 1024 * 1024
"""Largest command request a simulated daemon reassembles."""


class StreamEnded(Exception):
    """The stream ended (or failed) before the answer came."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


_KEPT_ON = ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "TimeoutError", "CANCELLED", "INTERNAL")
"""How a hello may fail and its connection still serve the next one (if READY)."""


class NoConnection(Exception):
    """A new connection (TCP + TLS) was not up within the connect timeout."""


async def _connection(channel: aio.Channel, timeout: float) -> bool:  # noqa: ASYNC109
    """Wait until `channel`'s connection is up (True) or failed (False); NoConnection
    after `timeout`."""
    state = channel.get_state(try_to_connect=True)
    try:
        async with asyncio.timeout(timeout):
            while state not in _SETTLED:
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)
    except TimeoutError:
        raise NoConnection(f"no connection within {timeout:g}s") from None
    return state == grpc.ChannelConnectivity.READY


_SETTLED = (
    grpc.ChannelConnectivity.READY,
    grpc.ChannelConnectivity.TRANSIENT_FAILURE,
    grpc.ChannelConnectivity.SHUTDOWN,
)


class Refused(Exception):
    """The manager answered a message with a ConnectError."""

    def __init__(self, code: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{_code_name(code)}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after
        """When the manager said to come back (a hello refused RESOURCE_EXHAUSTED)."""


def _code_name(value: int) -> str:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code.name
    return f"code {value}"


def keepalive_options(time_s: float, timeout_s: float) -> list[tuple[str, Any]]:
    """The daemon side's HTTP/2 keepalive: pings even with no call active."""
    return [
        *keepalive_args(time_s, timeout_s),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def open_channel(
    address: str,
    tls: TLSConfig,
    trust_domain: str,
    *,
    keepalive: tuple[float, float] = (10.0, 5.0),
) -> aio.Channel:
    """An mTLS channel of its own (no shared subchannel) to the manager at `address`."""
    options = [
        *channel_options(f"manager.{trust_domain}"),
        *keepalive_options(*keepalive),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    return aio.secure_channel(address, channel_credentials(tls), options=options)


class ControlStream:
    """One Connect stream: numbered upward messages, answers by reply_to, commands out."""

    def __init__(
        self,
        channel: aio.Channel,
        *,
        on_command: Callable[[manager_pb2.Command], None] | None = None,
        timeout: float | None = None,
    ) -> None:
        bidi = channel.stream_stream(
            CONNECT,
            request_serializer=manager_pb2.ConnectRequest.SerializeToString,
            response_deserializer=manager_pb2.ConnectResponse.FromString,
        )
        self.call: Any = bidi(timeout=timeout)
        self.on_command = on_command
        self.commands: list[manager_pb2.Command] = []
        """Commands received when no `on_command` callback is set."""
        self.stray: list[manager_pb2.ConnectResponse] = []
        """Answers to no message waiting for one (e.g. to a message sent raw)."""
        self.ended: StreamEnded | None = None
        """Set once the stream is over, with its status."""
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[manager_pb2.ConnectResponse]] = {}
        self._answers: dict[int, manager_pb2.ConnectResponse] = {}
        self._write_lock = asyncio.Lock()
        self._reader = asyncio.create_task(self._read())

    def next_id(self) -> int:
        """A fresh id, larger than every one used on this stream."""
        self._next_id += 1
        return self._next_id

    @property
    def ids_left(self) -> int:
        """Fresh ids still available (ids are uint64 and must increase)."""
        return 2**64 - 1 - self._next_id

    async def write(self, message: manager_pb2.ConnectRequest) -> None:
        """Send one message as is (the fuzzers set the id themselves)."""
        if message.id > self._next_id:
            self._next_id = message.id
        async with self._write_lock:
            await self.call.write(message)

    async def request(self, message: manager_pb2.ConnectRequest, within: float = 30.0) -> Any:
        """Send `message` with a fresh id; its answer's body (Refused on a ConnectError)."""
        message.id = self.next_id()
        answer = await self.exchange(message, within)
        body = answer.WhichOneof("body")
        if body == "error":
            error = answer.error
            raise Refused(error.code, error.message, retry_after(error.trailing_metadata))
        return getattr(answer, body)

    async def exchange(
        self, message: manager_pb2.ConnectRequest, within: float = 30.0
    ) -> manager_pb2.ConnectResponse:
        """Send `message` (its id as set) and wait for the answer to it.

        StreamEnded if the stream ends first; TimeoutError after `within` seconds.
        """
        future = asyncio.get_running_loop().create_future()
        self._waiting[message.id] = future
        try:
            # The deadline covers the write too: on a new stream that is the connection
            # and TLS handshake, as a daemon's call deadline does.
            async with asyncio.timeout(within):
                await self.write(message)
                return await asyncio.shield(future)
        except (aio.AioRpcError, asyncio.InvalidStateError) as exc:
            await self._reader_done()
            raise self.ended or StreamEnded(grpc.StatusCode.UNKNOWN, str(exc)) from exc
        finally:
            self._waiting.pop(message.id, None)

    async def answer_to(self, message_id: int, within: float) -> manager_pb2.ConnectResponse:
        """The answer to a message already sent raw (StreamEnded / TimeoutError)."""
        deadline = time.monotonic() + within
        while True:
            for i, answer in enumerate(self.stray):
                if answer.reply_to == message_id:
                    del self.stray[i]
                    return answer
            if self.ended is not None:
                raise self.ended
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer to message {message_id} within {within}s")
            await asyncio.sleep(0.01)

    async def send_result(self, result: manager_pb2.CommandResult) -> None:
        """One piece of a command's result (id 0: results carry their own)."""
        await self.write(manager_pb2.ConnectRequest(result=result))

    async def _reader_done(self) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), 5)

    @property
    def reader(self) -> asyncio.Task[None]:
        """The task reading the stream; done once the stream ended (`ended` says how)."""
        return self._reader

    async def _read(self) -> None:
        try:
            while True:
                message = await self.call.read()
                if message is aio.EOF:
                    break
                if message.WhichOneof("body") == "command":
                    if self.on_command is not None:
                        self.on_command(message.command)
                    else:
                        self.commands.append(message.command)
                    continue
                future = self._waiting.get(message.reply_to)
                if future is not None and not future.done():
                    future.set_result(message)
                else:
                    self.stray.append(message)
            code = await self.call.code()
            self.ended = StreamEnded(code, await self.call.details() or "")
        except aio.AioRpcError as exc:
            self.ended = StreamEnded(exc.code(), exc.details() or "")
        except asyncio.CancelledError:
            self.ended = StreamEnded(grpc.StatusCode.CANCELLED, "closed by the client")
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(self.ended)
                future.exception()  # retrieved here: the waiter may have gone already

    async def wait_ended(self, within: float) -> StreamEnded:
        """The stream's end status, once the manager ends it."""
        await asyncio.wait_for(asyncio.shield(self._reader), within)
        assert self.ended is not None
        return self.ended

    async def close(self) -> None:
        """End the stream from this side."""
        self.call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


# --- a whole simulated daemon on the stream ----------------------------------------------


class _Context:
    """What SimDaemon's handlers ask of a servicer context, for a command on the stream.

    The stream is the node's own connection to the manager; a command on it
    comes from the manager, so the handlers see a manager caller.
    """

    def __init__(self, trust_domain: str, manager: str) -> None:
        self._auth = {"peer_uri": [f"spiffe://{trust_domain}/manager/{manager}".encode()]}

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def peer(self) -> str:
        return "control-stream:0"


@dataclass
class _Call:
    """A command being served."""

    method: str
    reassembler: Reassembler
    credit: int = 1
    timeout: float = 0.0
    task: asyncio.Task[None] | None = None
    credit_changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class NodeRecord:
    """What one simulated node saw (the fault tests and the benchmark read it)."""

    acked: set[int] = field(default_factory=set)
    """Metric batch sequences the manager acknowledged."""
    welcomes: list[float] = field(default_factory=list)
    """Wall times the manager welcomed this node (one per stream)."""
    attempts: list[float] = field(default_factory=list)
    """Wall times a stream was opened."""
    dials: list[float] = field(default_factory=list)
    """Wall times a connection was dialled (a TLS handshake; a kept one is not)."""
    failed_dials: list[float] = field(default_factory=list)
    """Wall times a dial failed before any hello (refused while the manager was down,
    or no handshake within `connect_timeout`)."""
    ends: list[str] = field(default_factory=list)
    """How each stream ended (status names)."""
    ended_at: list[tuple[float, str, str]] = field(default_factory=list)
    """Wall time, how each stream ended ("+welcomed" if after its welcome) and why."""
    commands: int = 0
    """Commands served."""
    ages: list[tuple[float, str]] = field(default_factory=list)
    """Wall time and "<end> <age>" of each end before a welcome: how long after its stream
    opened ("<0.1s", "<1s", "<10s", ">=10s"; a shed call ends at once)."""


def age_bucket(seconds: float) -> str:
    """The bucket of an end's age since its stream opened."""
    for bound, name in ((0.1, "<0.1s"), (1.0, "<1s"), (10.0, "<10s")):
        if seconds < bound:
            return name
    return ">=10s"


class ConnectNode:
    """One simulated daemon holding a Connect stream to the manager."""

    def __init__(
        self,
        node_id: str,
        tls: TLSConfig,
        trust_domain: str,
        addresses: tuple[str, ...],
        *,
        metrics_interval: float = 60.0,
        state_change_interval: float = 0.0,
        keepalive: tuple[float, float] = (10.0, 5.0),
        reconnect: Backoff | None = None,
        rpc_timeout: float = 10.0,
        welcome_timeout: float = 30.0,
        connect_timeout: float = 20.0,
        rng: random.Random | None = None,
        labels: dict[str, str] | None = None,
        reuse: bool = True,
    ) -> None:
        self.node_id = node_id
        self.reuse = reuse
        """Keep the connection across a refused or unanswered hello, as the daemon does."""
        self.tls = tls
        self.trust_domain = trust_domain
        self.addresses = addresses
        self.metrics_interval = metrics_interval
        self.state_change_interval = state_change_interval
        self.keepalive = keepalive
        # A daemon's defaults (daemon/config.py): full-jitter backoff from 0.5 s to 30 s,
        # started over after a connection that carried a call past its hello; every
        # call with a 10 s deadline, the hello 30 s for its welcome (welcome_timeout_seconds),
        # which start once a new connection is up (TCP + TLS, itself given up to 20 s).
        self.reconnect = reconnect or Backoff(initial=0.5, maximum=30.0)
        self.rpc_timeout = rpc_timeout
        self.welcome_timeout = welcome_timeout
        self.connect_timeout = connect_timeout
        self.rng = rng or random.Random()
        self.labels = labels or {"sim": "connect"}
        self.daemon = SimDaemon(node_id)
        """What commands run on (in-memory agents)."""
        self.record = NodeRecord()
        self.sequence = 1
        """The next metric batch's sequence number."""
        self.unacked: dict[int, manager_pb2.ReportMetricsRequest] = {}
        """Batches cut and not acknowledged yet, resent after a reconnect."""
        self.connected = asyncio.Event()
        self.stream: ControlStream | None = None
        self._channel: aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None
        self._calls: dict[int, _Call] = {}
        self._context = _Context(trust_domain, "m1")
        self._useful = False
        self._welcomed = False
        self._opened: float | None = None  # when the current attempt's stream opened

    # -- lifecycle --

    def start(self) -> None:
        """Connect (and keep reconnecting) in the background."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Close the stream and stop reconnecting."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._drop()

    async def _drop(self, *, keep_channel: bool = False) -> None:
        for call in self._calls.values():
            if call.task is not None:
                call.task.cancel()
        self._calls.clear()
        self.connected.clear()
        if self.stream is not None:
            await self.stream.close()
            self.stream = None
        if self._channel is not None and not keep_channel:
            await self._channel.close(None)
            self._channel = None

    async def _run(self) -> None:
        attempt = 0
        index = 0
        while True:
            address = self.addresses[index % len(self.addresses)]
            self._useful = False
            self._welcomed = False
            self._opened = None
            keep = False
            hint: float | None = None
            try:
                await self._session(address)
            except (StreamEnded, Refused, aio.AioRpcError, TimeoutError, NoConnection) as exc:
                code = getattr(exc, "code", None)
                name = code.name if isinstance(code, grpc.StatusCode) else type(exc).__name__
                if isinstance(exc, Refused):
                    name = _code_name(exc.code)
                    hint = exc.retry_after
                self.record.ends.append(name)
                welcomed = "+welcomed" if self._welcomed else ""
                self.record.ended_at.append((time.time(), name + welcomed, str(exc)[:160]))
                if not self._welcomed and self._opened is not None:
                    age = age_bucket(time.monotonic() - self._opened)
                    self.record.ages.append((time.time(), f"{name} {age}"))
                # As the daemon (daemon.manager_link.keep_for_retry): a hello refused
                # RESOURCE_EXHAUSTED, unanswered in time, or whose stream was cancelled
                # (CANCELLED; INTERNAL on our write) over a connection still READY keeps
                # it; the retry is a new stream on it.
                keep = (
                    self.reuse
                    and not self._welcomed
                    and name in _KEPT_ON
                    and self._channel is not None
                    and self._channel.get_state() == grpc.ChannelConnectivity.READY
                )
            finally:
                await self._drop(keep_channel=keep)
            if self._useful:
                attempt = 0  # the manager served this connection: it is not struggling
            delay = self.reconnect.delay(min(attempt, 30), self.rng)
            attempt += 1
            if keep and hint is not None:
                # As the daemon: the manager's time to come back, not a backoff step.
                delay = hint * self.rng.uniform(1.0, 1.1)
                attempt -= 1
            if not keep:
                index += 1
            await asyncio.sleep(delay)

    def hello(self) -> manager_pb2.RegisterNodeRequest:
        """What RegisterNode carries; no daemon_address: this host listens nowhere."""
        return manager_pb2.RegisterNodeRequest(
            node_id=self.node_id,
            hostname=f"{self.node_id}.sim",
            ip="127.0.0.1",
            os="linux",
            arch="x86_64",
            labels=self.labels,
            daemon_version="connect-sim",
            agent_version="connect-sim",
            spec_version=self.daemon.spec_version,
        )

    async def _session(self, address: str) -> None:
        ready = grpc.ChannelConnectivity.READY
        if self._channel is not None and self._channel.get_state() != ready:
            await self._channel.close(None)  # the kept connection went meanwhile
            self._channel = None
        if self._channel is None:
            self._channel = open_channel(
                address, self.tls, self.trust_domain, keepalive=self.keepalive
            )
            self.record.dials.append(time.time())
            # As the daemon (daemon.manager_link._connection): the hello's deadline starts
            # once the connection is up; a failed one fails the hello at once.
            try:
                up = await _connection(self._channel, self.connect_timeout)
            except NoConnection:
                self.record.failed_dials.append(time.time())
                raise
            if not up:
                self.record.failed_dials.append(time.time())
        self.record.attempts.append(time.time())
        self._opened = time.monotonic()
        stream = ControlStream(self._channel, on_command=self._command)
        self.stream = stream
        await stream.request(manager_pb2.ConnectRequest(hello=self.hello()), self.welcome_timeout)
        self.record.welcomes.append(time.time())
        self._welcomed = True
        await self._until_answered(
            stream, lambda: manager_pb2.ConnectRequest(agent_states=self.snapshot())
        )
        self._useful = True
        # What was cut before (and not acknowledged) goes first, in order.
        for seq in sorted(self.unacked):
            await self._send_batch(stream, self.unacked[seq])
        self.connected.set()
        next_metrics = time.monotonic() + self.rng.uniform(0, self.metrics_interval)
        next_change = time.monotonic() + (
            self.rng.uniform(0, self.state_change_interval)
            if self.state_change_interval
            else float("inf")
        )
        while stream.ended is None:
            now = time.monotonic()
            if now >= next_metrics:
                batch = self.cut_batch()
                await self._send_batch(stream, batch)
                next_metrics = now + self.metrics_interval
            if now >= next_change:
                self.change_state()
                await self._until_answered(
                    stream, lambda: manager_pb2.ConnectRequest(agent_states=self.snapshot())
                )
                next_change = now + self.state_change_interval
            # Until the next batch or change, or the stream's end (a daemon notices a
            # broken stream at once and reconnects; sleeping through it to the next
            # batch made every reconnect after a kill -9 take up to a metrics interval).
            await asyncio.wait(
                {stream.reader},
                timeout=max(0.05, min(next_metrics, next_change) - time.monotonic()),
            )
        raise stream.ended or StreamEnded(grpc.StatusCode.UNKNOWN, "the stream's reader failed")

    # -- upward --

    def cut_batch(self) -> manager_pb2.ReportMetricsRequest:
        """The next numbered batch, kept until acknowledged."""
        seq = self.sequence
        self.sequence += 1
        batch = manager_pb2.ReportMetricsRequest(
            node_id=self.node_id,
            sequence=seq,
            metrics=[
                common_pb2.MetricData(
                    type="sim",
                    timestamp=int(time.time() * 1000),
                    values={"batch": float(seq), "v0": 0.0},
                )
            ],
        )
        self.unacked[seq] = batch
        return batch

    async def _send_batch(
        self, stream: ControlStream, batch: manager_pb2.ReportMetricsRequest
    ) -> None:
        await self._until_answered(stream, lambda: manager_pb2.ConnectRequest(metrics=batch))
        self.record.acked.add(batch.sequence)
        self.unacked.pop(batch.sequence, None)

    async def _until_answered(
        self, stream: ControlStream, message: Callable[[], manager_pb2.ConnectRequest]
    ) -> None:
        """Send `message()` until it is answered. As the daemon (manager_link's `_SLOW`):
        no answer in time, or a busy refusal, is a slow manager, not a dead stream; the
        stream is kept and the newest message sent again after a backoff pause."""
        busy = 0
        while True:
            try:
                await stream.request(message(), self.rpc_timeout)
                return
            except TimeoutError:
                pass
            except Refused as exc:
                if _code_name(exc.code) not in ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"):
                    raise
            await asyncio.sleep(self.reconnect.delay(busy, self.rng))
            busy += 1

    def snapshot(self) -> manager_pb2.SyncAgentStatesRequest:
        """Every agent of the simulated daemon."""
        return self.daemon.agent_states()

    def change_state(self) -> None:
        """An agent restarts by itself (a state change to report)."""
        info = self.rng.choice(list(self.daemon.agents.values()))
        info.restart_count += 1
        info.pid += 1

    # -- downward: commands --

    def _command(self, command: manager_pb2.Command) -> None:
        call = self._calls.get(command.request_id)
        if command.cancel:
            if call is not None and call.task is not None:
                call.task.cancel()
            return
        if call is None:
            call = _Call(command.method, Reassembler(REQUEST_LIMIT), credit=command.credit or 1)
            call.timeout = command.timeout_seconds
            self._calls[command.request_id] = call
        elif call.task is not None:  # more credit for a running stream
            call.credit += command.credit
            call.credit_changed.set()
            return
        try:
            whole = call.reassembler.add(command.request, command.more)
        except ValueError as exc:
            self._finish(command.request_id, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            return
        if whole is not None:
            call.task = asyncio.create_task(self._serve(command.request_id, call, whole))

    def _finish(self, request_id: int, code: grpc.StatusCode, message: str) -> None:
        self._calls.pop(request_id, None)
        stream = self.stream
        if stream is None:
            return
        end = manager_pb2.CommandResult(
            request_id=request_id, end=True, code=code.value[0], message=message
        )
        task = asyncio.create_task(stream.send_result(end))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _serve(self, request_id: int, call: _Call, data: bytes) -> None:
        code, message = grpc.StatusCode.OK, ""
        stream = self.stream
        assert stream is not None
        try:
            method = METHODS.get(call.method)
            if method is None:
                raise _Status(grpc.StatusCode.UNIMPLEMENTED, f"no method {call.method!r}")
            request = method.request.FromString(data)
            handler = getattr(self.daemon, call.method)
            async with asyncio.timeout(call.timeout or None):
                if method.server_streaming:
                    async for response in handler(request, self._context):
                        while call.credit < 1:
                            call.credit_changed.clear()
                            await call.credit_changed.wait()
                        call.credit -= 1
                        await self._send_response(stream, request_id, response)
                else:
                    await self._send_response(
                        stream, request_id, await handler(request, self._context)
                    )
            self.record.commands += 1
        except TimeoutError:
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded on the node"
        except asyncio.CancelledError:
            code, message = grpc.StatusCode.CANCELLED, "cancelled by the manager"
        except FleetError as exc:
            code, message = exc.code, exc.message
        except _Status as exc:
            code, message = exc.code, exc.message
        except Exception as exc:  # a bad request (parse error): the manager's caller hears it
            code, message = grpc.StatusCode.INVALID_ARGUMENT, f"{type(exc).__name__}: {exc}"
        self._calls.pop(request_id, None)
        with contextlib.suppress(Exception):
            await stream.send_result(
                manager_pb2.CommandResult(
                    request_id=request_id, end=True, code=code.value[0], message=message
                )
            )

    async def _send_response(self, stream: ControlStream, request_id: int, response: Any) -> None:
        for piece, more in pieces(response.SerializeToString(), PIECE_BYTES):
            await stream.send_result(
                manager_pb2.CommandResult(request_id=request_id, response=piece, more=more)
            )


class _Status(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
