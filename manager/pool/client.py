"""`DaemonPool`: the manager's pooled, mTLS client of every daemon's DaemonService.

Channels are opened lazily, one per daemon, each its own connection; how
they are opened, watched, bounded and reaped is `manager.pool.channels`.
This module sends the requests.

Calls have one deadline each (`call_timeout`, retries included), so a
fan-out never hangs on a dead daemon. Idempotent calls are retried with
jittered backoff on UNAVAILABLE, and only on UNAVAILABLE:

    =============================  ======================================
    call                           retried on UNAVAILABLE
    =============================  ======================================
    list_agents, get_agent_metrics yes (reads)
    operate_agent start / stop     yes (the daemon contract: idempotent)
    operate_agent restart          no  (a hidden success would restart twice)
    push_update                    no  (a hidden success makes the retry stale)
    read_agent_log                 its start, until the first chunk arrives
    start_job, cancel_job          yes (the daemon contract: idempotent per job id)
    read_job_output                its start, until the first chunk arrives
    =============================  ======================================

Per call the pool picks a transport (`manager.pool.routing`): the node's
control stream on this replica, else the replica the stream directory says
holds it (`routes`, with several replicas on PostgreSQL), else dialling the
daemon. When that way fails under the call (the stream closed, the replica
holding it could not be reached: `manager.pool.outcome.TransportFailed`), an
idempotent call, or one certainly not delivered, is sent once more by the
next way there is within its deadline: the node's new stream once the daemon
reconnects, another replica, or its address. Anything else fails UNAVAILABLE
saying that its outcome is unknown. A replica that could not be reached gets
no routes until it refreshes its row in the directory.

When an idempotent call runs out of attempts against a connection that
failed, the pool gives the channel up (RECONNECTING -> IDLE) so the next call
starts from a fresh connection instead of gRPC's growing reconnect backoff.
Errors leave as `fleet.errors` exceptions whose message starts with the node
id; a daemon presenting the wrong certificate is `WrongDaemonIdentity` (an
Unavailable that is never retried).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from types import TracebackType
from typing import Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from fleet.errors import (
    ConfigError,
    DeadlineExceeded,
    FailedPrecondition,
    FleetError,
    InvalidArgument,
    Resource,
    Unavailable,
)
from fleet.pki import check_trust_domain
from fleet.tls import TLSConfig
from fleet.v1 import common_pb2, daemon_pb2, replica_pb2_grpc
from manager.pool.channel import NodeStats, ReloadingCredentials
from manager.pool.channels import Channels
from manager.pool.config import PoolConfig
from manager.pool.outcome import TransportFailed, may_send_again, outcome_unknown
from manager.pool.relay import PeerUnreachable, RelayTransport
from manager.pool.routing import Route, Via, choose_transport
from manager.pool.state import ConnectionState
from manager.pool.stream import ControlSession, ControlStreams
from manager.pool.transport import DialledTransport, StreamTransport, Transport, stream_budget

__all__ = ["Clock", "DaemonPool", "Routes"]

log = logging.getLogger(__name__)

Clock = Callable[[], float]
"""Monotonic seconds; the pool's notion of "now" for idle times and stats."""

_Resp = TypeVar("_Resp", bound=Message)

RELAY_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Default receive limit of relay channels: a daemon's result may be this large on
its stream (`control.max_message_bytes`), so it must fit relayed too."""

WAIT_POLL_SECONDS = 0.5
"""While a call waits for its node's stream to come back, this often it also looks in
the stream directory (the daemon may reconnect to another replica) and notices a pool
that closed; the stream coming back here wakes it at once."""


class Routes(Protocol):
    """Where a node's control stream is when it is not on this replica (the stream
    directory, `manager.service.replicas`)."""

    async def route(self, node_id: str) -> Route | None:
        """The live replica holding `node_id`'s stream, or None (not known to be anywhere)."""
        ...

    def unreachable(self, route: Route) -> None:
        """The replica `route` names could not be reached: route nothing to it for now."""
        ...


_Op = common_pb2.AgentOperation
# The daemon contract makes start and stop idempotent (starting a running
# agent succeeds and changes nothing). A restart is not: a retry after an
# UNAVAILABLE that hid a success would restart the agent twice.
_IDEMPOTENT_OPERATIONS = frozenset({_Op.AGENT_OPERATION_START, _Op.AGENT_OPERATION_STOP})
_OPERATIONS = _IDEMPOTENT_OPERATIONS | {_Op.AGENT_OPERATION_RESTART}


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
        streams: ControlStreams | None = None,
        routes: Routes | None = None,
        replica_id: str = "",
        relay_max_message_bytes: int = RELAY_MAX_MESSAGE_BYTES,
        on_relayed: Callable[[grpc.StatusCode], None] = lambda _: None,
    ) -> None:
        """`streams`: this replica's control streams; `routes`: where other replicas
        hold theirs (None: a single manager, never relay); `replica_id`: this
        replica's name, in messages; `on_relayed`: told how each relayed call ended."""
        config = config or PoolConfig()
        try:
            config.validate()
            check_trust_domain(trust_domain)
        except ValueError as exc:
            raise ConfigError(f"daemon pool: {exc}") from None
        self._config = config
        credentials = ReloadingCredentials(tls)  # ConfigError for unusable files
        self._channels = Channels(credentials, trust_domain, config, clock)
        rng = rng or random.Random()  # noqa: S311  # jitter, not cryptography
        self._dialled = DialledTransport(self._channels, config, rng)
        self._streams = streams
        self._routes = routes
        self._replica_id = replica_id
        self._on_relayed = on_relayed
        self.dial_refusal: Callable[[str], str | None] = lambda _node_id: None
        """Why a node must not be dialled (the deny list: a revoked node), or None."""
        # Peer replicas, pooled like daemons: lazily opened, bounded, closed when idle.
        self._peers = Channels(
            credentials,
            trust_domain,
            config,
            clock,
            role="manager",
            stub=replica_pb2_grpc.ReplicaServiceStub,
            extra_args=[("grpc.max_receive_message_length", relay_max_message_bytes)],
        )
        self._closed = False

    # -- observing --------------------------------------------------------

    @property
    def config(self) -> PoolConfig:
        """The settings the pool runs with."""
        return self._config

    @property
    def open_channels(self) -> int:
        """Channels open now (never more than `config.max_channels`)."""
        return len(self._channels)

    @property
    def connections_opened(self) -> int:
        """Connections established over the pool's life (entries into READY)."""
        return self._channels.connections_opened

    @property
    def channels_opened(self) -> int:
        """Channels created over the pool's life."""
        return self._channels.channels_opened

    def state(self, node_id: str) -> ConnectionState:
        """The connection state to `node_id` (IDLE for a daemon never called)."""
        return self._channels.state(node_id)

    def stats(self) -> dict[str, NodeStats]:
        """Per-daemon counters and state, for every daemon the pool has called."""
        return self._channels.stats()

    def peer_stats(self) -> dict[str, NodeStats]:
        """Per-replica counters and state of the relay's channels to peer replicas."""
        return self._peers.stats()

    async def wait_for_state(self, node_id: str, *states: ConnectionState) -> ConnectionState:
        """Wait until `node_id` is in one of `states` (bound it with asyncio.timeout)."""
        return await self._channels.wait_for_state(node_id, *states)

    # -- calls ------------------------------------------------------------

    async def list_agents(
        self, node_id: str, address: str, *, call_timeout: float | None = None
    ) -> daemon_pb2.ListAgentsResponse:
        """The daemon's agents. Idempotent: retried on UNAVAILABLE."""
        return await self._unary(
            node_id,
            address,
            "ListAgents",
            daemon_pb2.ListAgentsResponse,
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
            "OperateAgent",
            daemon_pb2.OperateAgentResponse,
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
            "GetAgentMetrics",
            daemon_pb2.GetAgentMetricsResponse,
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
        want_agent_states: bool = False,
        call_timeout: float | None = None,
    ) -> daemon_pb2.PushUpdateResponse:
        """Replace the daemon's agent specs with version `version`. Never retried:
        a retry after a hidden success would be refused as a stale version.
        `want_agent_states`: the answer carries the node's agents after the apply."""
        return await self._unary(
            node_id,
            address,
            "PushUpdate",
            daemon_pb2.PushUpdateResponse,
            daemon_pb2.PushUpdateRequest(
                version=version, agents=agents, want_agent_states=want_agent_states
            ),
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
        Without `call_timeout` a followed stream has no deadline; otherwise
        the whole stream is bounded by it. To stop early, close the generator
        (``async with contextlib.aclosing(pool.read_agent_log(...)) as chunks``)
        so the stream and its channel slot are released at once.
        """
        request = daemon_pb2.ReadAgentLogRequest(
            agent_id=agent_id, offset=offset, max_bytes=max_bytes, follow=follow
        )
        # aclosing: a reader that leaves closes the inner stream (and its slot) at once.
        async with contextlib.aclosing(
            self._stream(
                node_id,
                address,
                "ReadAgentLog",
                daemon_pb2.ReadAgentLogResponse,
                request,
                follow=follow,
                call_timeout=call_timeout,
            )
        ) as responses:
            async for response in responses:
                yield response

    async def start_job(
        self,
        node_id: str,
        address: str,
        request: daemon_pb2.StartJobRequest,
        *,
        call_timeout: float | None = None,
    ) -> daemon_pb2.StartJobResponse:
        """Send one target of a job to its daemon. Idempotent per job id (the daemon
        answers where a job it knows is): retried on UNAVAILABLE."""
        return await self._unary(
            node_id,
            address,
            "StartJob",
            daemon_pb2.StartJobResponse,
            request,
            idempotent=True,
            call_timeout=call_timeout,
        )

    async def cancel_job(
        self, node_id: str, address: str, job_id: str, *, call_timeout: float | None = None
    ) -> daemon_pb2.CancelJobResponse:
        """Stop a queued or running job on the node. Idempotent: retried on UNAVAILABLE."""
        return await self._unary(
            node_id,
            address,
            "CancelJob",
            daemon_pb2.CancelJobResponse,
            daemon_pb2.CancelJobRequest(job_id=job_id),
            idempotent=True,
            call_timeout=call_timeout,
        )

    async def read_job_output(
        self,
        node_id: str,
        address: str,
        job_id: str,
        *,
        offset: int = 0,
        max_bytes: int = 0,
        follow: bool = False,
        call_timeout: float | None = None,
    ) -> AsyncGenerator[daemon_pb2.ReadJobOutputResponse, None]:
        """A job's full output as the node keeps it, from `offset` (as `read_agent_log`:
        the start is retried, a followed stream has no deadline unless given one)."""
        request = daemon_pb2.ReadJobOutputRequest(
            job_id=job_id, offset=offset, max_bytes=max_bytes, follow=follow
        )
        # aclosing: a reader that leaves closes the inner stream (and its slot) at once.
        async with contextlib.aclosing(
            self._stream(
                node_id,
                address,
                "ReadJobOutput",
                daemon_pb2.ReadJobOutputResponse,
                request,
                follow=follow,
                call_timeout=call_timeout,
            )
        ) as responses:
            async for response in responses:
                yield response

    # -- the relay's receiving side: this replica's streams only --------------

    async def local_unary(
        self, node_id: str, method: str, request: Message, *, call_timeout: float | None
    ) -> Message:
        """Run unary DaemonService `method` on the node's stream on this replica, never
        anywhere else (a relayed call: no second hop, no loop). `call_timeout` None:
        the pool's default. Unavailable if the stream is not here."""
        session = self._local_session(node_id)
        transport = StreamTransport(session, self._config, self._channels.record(node_id))
        return await transport.unary(
            node_id, "", method, request, idempotent=False, call_timeout=call_timeout
        )

    async def local_stream(
        self, node_id: str, method: str, request: Message, *, call_timeout: float | None
    ) -> AsyncGenerator[Message, None]:
        """As `local_unary` for a server-streaming method; `call_timeout` None: none."""
        session = self._local_session(node_id)
        transport = StreamTransport(session, self._config, self._channels.record(node_id))
        async with contextlib.aclosing(
            transport.stream(node_id, "", method, request, follow=True, call_timeout=call_timeout)
        ) as responses:
            async for response in responses:
                yield response

    def _local_session(self, node_id: str) -> ControlSession:
        self._check_open()
        session = self._streams.get(node_id) if self._streams is not None else None
        if session is None:
            here = f"manager replica {self._replica_id}" if self._replica_id else "this manager"
            raise TransportFailed(
                f"{node_id}: its control stream is not on {here} (it closed or moved to "
                "another replica); try again",
                delivered=False,  # nothing was sent
            )
        return session

    async def forget(self, node_id: str) -> bool:
        """Close the channel to `node_id` (e.g. the node was deleted); calls in flight fail.

        True if a channel was open.
        """
        return await self._channels.forget(node_id)

    # -- lifecycle --------------------------------------------------------

    def reap_idle(self) -> list[str]:
        """Close every channel unused for `idle_close_after` per the pool's clock, now.

        The reaper task calls this when the next channel is due; tests call it
        with a fake clock. Returns the node ids whose channels were closed.
        """
        return self._channels.reap_idle()

    async def close(self) -> None:
        """Close every channel (calls in flight are cancelled) and stop the tasks."""
        self._closed = True
        await self._channels.close()
        await self._peers.close()

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

    async def _transport(self, node_id: str, address: str) -> Transport:
        """How to reach the node now; Unavailable if there is no way at all (its daemon
        is down or between two control streams: it may be back in a moment)."""
        way = await self._way(node_id, address)
        if way is None:
            raise Unavailable(
                f"{node_id}: the node has no control stream and no listen address "
                "(is its daemon running and connected to a manager?)"
            )
        return way

    async def _way(
        self, node_id: str, address: str, *, avoid: Route | None = None
    ) -> Transport | None:
        """The node's control stream here, else its stream's replica, else dialling;
        None if there is none of them. A route read from the same record as `avoid`
        (one that just failed) is not taken again.

        The stream is the one whose certificate is `node_id`'s (the Connect
        handler registers it under the hello's node id only after the
        identity check), so a command can only reach that node; the replica
        holding a relayed one checks the same.
        """
        self._check_open()
        session = self._streams.get(node_id) if self._streams is not None else None
        route: Route | None = None
        if session is None and self._routes is not None:
            try:
                route = await self._routes.route(node_id)
            except FleetError as exc:
                if not address:
                    raise Unavailable(
                        f"{node_id}: cannot tell which manager replica holds its control "
                        f"stream: {exc.message}"
                    ) from exc
                log.warning("%s: stream directory unavailable, dialling: %s", node_id, exc)
            if route is not None and route.same_record(avoid):
                route = None
        via = choose_transport(local_stream=session is not None, route=route, address=address)
        if via is Via.STREAM:
            assert session is not None
            return StreamTransport(session, self._config, self._channels.record(node_id))
        if via is Via.RELAY:
            assert route is not None
            return RelayTransport(
                self._peers,
                self._config,
                route,
                self._channels.record(node_id),
                on_done=self._on_relayed,
            )
        if via is Via.NOWHERE:
            return None
        # A stream or a relay was opened with a certificate the deny list passed;
        # a dialled daemon's certificate is checked by name only.
        if (refusal := self.dial_refusal(node_id)) is not None:
            raise FailedPrecondition(refusal)
        return self._dialled

    async def _way_again(
        self,
        node_id: str,
        address: str,
        method: str,
        error: TransportFailed,
        failed: Transport,
        *,
        idempotent: bool,
        deadline: float,
    ) -> Transport:
        """Where to send a call once more after its way failed under it (`error`).

        Raises the outcome-unknown error unless `may_send_again`. A peer that
        could not be reached gets no routes for now. Then the first way there
        is other than the failed one: the node's stream here (a new one: the
        closed one is gone), another stream record, its address; without any,
        wait for the daemon to reconnect until `deadline` (loop time), then
        raise Unavailable (at once if the manager is stopping).
        """
        if not may_send_again(idempotent=idempotent, delivered=error.delivered):
            raise outcome_unknown(error, method) from error
        if isinstance(error, PeerUnreachable) and self._routes is not None:
            self._routes.unreachable(error.route)
        avoid = failed.route if isinstance(failed, RelayTransport) else None
        loop = asyncio.get_running_loop()
        while (way := await self._way(node_id, address, avoid=avoid)) is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise Unavailable(
                    f"{error.message}; it did not come back within the call's deadline "
                    f"({method} was not sent again)"
                ) from error
            if self._streams is not None and self._streams.closing:
                # No stream attaches here again; waiting would only hold up the shutdown.
                raise Unavailable(
                    f"{error.message}; {method} was not sent again: this manager is stopping"
                ) from error
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, WAIT_POLL_SECONDS)):
                    if self._streams is not None:
                        await self._streams.attached(node_id)
                    else:
                        await asyncio.sleep(remaining)
        self._channels.record(node_id).retries += 1
        log.info("%s; sending %s again (%s)", error.message, method, type(way).__name__)
        return way

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the daemon pool is closed (the manager is shutting down)")

    async def _unary(
        self,
        node_id: str,
        address: str,
        method: str,
        response_type: type[_Resp],
        request: Message,
        *,
        idempotent: bool,
        call_timeout: float | None,
    ) -> _Resp:
        with _about_node(node_id):
            loop = asyncio.get_running_loop()
            budget = self._config.call_timeout if call_timeout is None else call_timeout
            deadline = loop.time() + budget
            transport = await self._transport(node_id, address)
            try:
                response = await transport.unary(
                    node_id, address, method, request, idempotent=idempotent, call_timeout=budget
                )
            except TransportFailed as exc:
                failed = exc
            else:
                assert isinstance(response, response_type)
                return response
            again = await self._way_again(
                node_id,
                address,
                method,
                failed,
                transport,
                idempotent=idempotent,
                deadline=deadline,
            )
            response = await again.unary(
                node_id,
                address,
                method,
                request,
                idempotent=idempotent,
                call_timeout=max(0.0, deadline - loop.time()),
            )
            assert isinstance(response, response_type)
            return response

    async def _stream(
        self,
        node_id: str,
        address: str,
        method: str,
        response_type: type[_Resp],
        request: Message,
        *,
        follow: bool,
        call_timeout: float | None,
    ) -> AsyncGenerator[_Resp, None]:
        with _about_node(node_id):
            loop = asyncio.get_running_loop()
            budget = stream_budget(self._config, follow=follow, call_timeout=call_timeout)
            start = loop.time()
            transport = await self._transport(node_id, address)
            started = False
            try:
                async with contextlib.aclosing(
                    transport.stream(
                        node_id, address, method, request, follow=follow, call_timeout=budget
                    )
                ) as responses:
                    async for response in responses:
                        started = True
                        assert isinstance(response, response_type)
                        yield response
            except TransportFailed as exc:
                if started:
                    raise  # the caller resumes from the last chunk's next_offset
                failed = exc
            else:
                return
            # Nothing arrived yet: the start of a read is idempotent, as on a dialled channel.
            again = await self._way_again(
                node_id,
                address,
                method,
                failed,
                transport,
                idempotent=True,
                deadline=start + (budget or self._config.call_timeout),
            )
            rest = None if budget is None else max(0.0, start + budget - loop.time())
            async with contextlib.aclosing(
                again.stream(node_id, address, method, request, follow=follow, call_timeout=rest)
            ) as responses:
                async for response in responses:
                    assert isinstance(response, response_type)
                    yield response


@contextlib.contextmanager
def _about_node(node_id: str) -> Iterator[None]:
    """An Unavailable or DeadlineExceeded met reaching `node_id` names the node as its
    Resource, so a client can tell "the manager cannot reach the node" or "the node did
    not answer" from "cannot reach the manager" or "the manager did not answer"."""
    try:
        yield
    except (Unavailable, DeadlineExceeded) as exc:
        if exc.resource is None:
            exc.resource = Resource("node", node_id)
        raise
