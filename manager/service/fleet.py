"""What operators read and change about nodes and agents (FleetService's use cases).

Nodes are selected by their labels with `fleet.selectors`, matched here in
Python over the registry (one read of the nodes table; fleets of thousands
of nodes fit easily). Agents come from the states the daemons last synced,
or, with `live`, from the daemons themselves through the pool (concurrently,
`live_concurrency` at a time; a daemon that cannot be asked becomes an entry
in `errors`, not a failed call). Agent metrics and logs are passthroughs to
the daemon through the pool.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from fleet.errors import FleetError, InvalidArgument, NotFound, Resource
from fleet.labels import MAX_LABELS, validate_label_key, validate_label_value, validate_labels
from fleet.selectors import Selector
from fleet.v1 import common_pb2, daemon_pb2
from manager.pool import ConnectionState, DaemonPool
from manager.pool.routing import Route
from manager.pool.stream import ControlStreams
from manager.service.desired import drift
from manager.service.liveness import stream_offline_at
from manager.service.metrics import MetricsService, MetricType, metric_types, missing_metric
from manager.service.operations import OperationRecorder, Operations, record_from_info
from manager.storage import AgentStateRecord, AgentStateRepository, NodeRecord, NodeRepository
from manager.storage.desired import DesiredStateRepository, DesiredTx
from manager.storage.records import AssignmentRecord, NodeDesiredRecord

__all__ = [
    "AgentListing",
    "FleetQueries",
    "LabelsUpdated",
    "NodeAgent",
    "NodeView",
    "StreamState",
    "StreamView",
    "last_heard_ms",
    "stream_view",
]

DEFAULT_BUCKETS = 60
"""Buckets a metric query gets when it does not name a step."""
DEFAULT_RANGE_MS = 3600 * 1000
"""A metric query without a start looks back this far."""
MAX_STEP_SECONDS = 10 * 366 * 86400
"""Largest bucket a metric query may ask for (ten years; beyond, ms overflow int64)."""


class StreamState(enum.Enum):
    """A node's control stream as this replica knows it."""

    UNKNOWN = "unknown"
    """Not on this replica, and the stream directory was not asked (a list on a cluster)."""
    NONE = "none"
    """No stream: the daemon heartbeats over unary calls, or is offline."""
    CONNECTED = "connected"
    """Open on this replica."""
    LOST = "lost"
    """Broke here; the node stays online for the grace unless it reconnects."""
    ELSEWHERE = "elsewhere"
    """Open on another replica."""


@dataclass(frozen=True)
class StreamView:
    """`stream_view`'s answer."""

    state: StreamState
    since: float = 0.0
    """CONNECTED: when it opened; LOST: when it broke."""
    offline_at: float = 0.0
    """LOST: when the node goes offline unless it reconnects first."""
    replica: str = ""
    """ELSEWHERE: the replica holding it."""


def stream_view(
    *,
    opened_at: float | None,
    broken_at: float | None,
    grace: float,
    route: Route | None,
    asked_directory: bool,
    quiet_until: float = 0.0,
) -> StreamView:
    """What to say of a node's stream from this replica's sessions and, when asked, the
    stream directory's route. Why this matters to an operator: during a lost stream's
    grace the node stays ONLINE and its last heartbeat is kept fresh."""
    if opened_at is not None:
        return StreamView(StreamState.CONNECTED, since=opened_at)
    if route is not None:  # it reconnected to another replica: its stream here is history
        return StreamView(StreamState.ELSEWHERE, replica=route.replica_id)
    if broken_at is not None:
        offline_at = stream_offline_at(broken_at, grace, quiet_until)
        return StreamView(StreamState.LOST, since=broken_at, offline_at=offline_at)
    return StreamView(StreamState.NONE if asked_directory else StreamState.UNKNOWN)


def last_heard_ms(last_seen_ms: int, stream: StreamView) -> int:
    """When the manager last heard the node, for `Node.last_heartbeat`. A lost stream's
    node has its last-seen kept fresh through the grace (so no sweeper takes it offline),
    but nothing was heard from it since the stream broke: its age counts from then, the
    time it is recorded last seen at if it goes offline."""
    if stream.state is StreamState.LOST:
        return min(last_seen_ms, int(stream.since * 1000))
    return last_seen_ms


@dataclass(frozen=True)
class NodeView:
    """A node with what the manager knows about it beyond its record."""

    node: NodeRecord
    """The registry's record."""
    connection: ConnectionState
    """The pool's connection state to its daemon."""
    agent_counts: Mapping[str, int]
    """Agents (as last synced) per status name."""
    desired: NodeDesiredRecord | None = None
    """Its managed set's versions and the daemon's update errors (None: never managed)."""
    drift: str = ""
    """Why it does not run what it should ("" when it does)."""
    revoke_ms: int = 0
    """When it was revoked, if it was and enrolled no certificate since (0: not revoked)."""
    stream: StreamView = StreamView(StreamState.UNKNOWN)
    """Its control stream."""


@dataclass(frozen=True)
class LabelsUpdated:
    """The answer to UpdateNodeLabels."""

    view: NodeView
    """The node afterwards."""
    absent: list[str]
    """Keys to remove that the node had no label for: nothing was removed (no error)."""


@dataclass(frozen=True)
class NodeAgent:
    """An agent and the node it runs on."""

    node_id: str
    """The node."""
    agent: AgentStateRecord
    """The agent (as synced, or as the daemon answered just now)."""
    stale: bool = False
    """The node is offline: `agent` is what its daemon last said (at `agent.reported_ms`)."""
    spec: common_pb2.AgentSpec | None = None
    """The spec the daemon runs it with, env values left out (live answers only)."""
    log_path: str = ""
    """Its log file on the node (live answers only)."""


@dataclass(frozen=True)
class AgentListing:
    """The answer to ListAgents."""

    agents: list[NodeAgent]
    """Agents ordered by node then agent id."""
    errors: list[tuple[str, str]] = field(default_factory=list)
    """(node_id, why) for each daemon that could not be asked (live only)."""


class FleetQueries:
    """Node and agent reads, label updates, and daemon passthroughs."""

    def __init__(
        self,
        nodes: NodeRepository,
        agents: AgentStateRepository,
        pool: DaemonPool,
        operations: Operations,
        recorder: OperationRecorder,
        metrics: MetricsService,
        desired: DesiredStateRepository,
        *,
        clock: Callable[[], float] = time.time,
        live_concurrency: int = 64,
        on_labels_changed: Callable[[], None] = lambda: None,
        revoked: Callable[[], Awaitable[Mapping[str, int]]] | None = None,
        streams: ControlStreams | None = None,
        stream_grace: float = 0.0,
        stream_route: Callable[[str], Awaitable[Route | None]] | None = None,
    ) -> None:
        """`streams`: this replica's control streams, `stream_grace` their offline grace
        (and no node offline before `streams.quiet_until`, the failover grace's end);
        `stream_route`: the stream directory's lookup (a cluster of replicas; None alone)."""
        self._streams = streams
        self._stream_grace = stream_grace
        self._stream_route = stream_route
        self._desired = desired
        self._revoked = revoked
        self._on_labels_changed = on_labels_changed
        self._nodes = nodes
        self._agents = agents
        self._pool = pool
        self._ops = operations
        self._recorder = recorder
        self._metrics = metrics
        self._clock = clock
        self._live_concurrency = live_concurrency

    def _counts(self, states: Collection[AgentStateRecord]) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for st in states:
            per = counts.setdefault(st.node_id, {})
            per[st.status] = per.get(st.status, 0) + 1
        return counts

    async def _stream(self, node_id: str, *, ask_directory: bool) -> StreamView:
        opened = broken = None
        quiet_until = 0.0
        if self._streams is not None:
            quiet_until = self._streams.quiet_until
            opened = self._streams.opened_at.get(node_id)
            broken = self._streams.broken_at.get(node_id)
        route = None
        asked = self._stream_route is None  # alone: this replica knows every stream
        if opened is None and self._stream_route is not None and ask_directory:
            route, asked = await self._stream_route(node_id), True
        return stream_view(
            opened_at=opened,
            broken_at=broken,
            grace=self._stream_grace,
            route=route,
            asked_directory=asked,
            quiet_until=quiet_until,
        )

    async def _views(
        self, nodes: Sequence[NodeRecord], *, ask_directory: bool = False
    ) -> list[NodeView]:
        """Nodes with their agent counts, connection, managed versions and drift; the
        stream directory is asked about streams on other replicas only if `ask_directory`
        (one query per node)."""
        ids = [n.node_id for n in nodes]

        async def body(
            tx: DesiredTx,
        ) -> tuple[list[AgentStateRecord], dict[str, NodeDesiredRecord], list[AssignmentRecord]]:
            return (
                await tx.agent_states(node_ids=ids),
                await tx.node_desired(ids),
                await tx.assignments(node_ids=ids),
            )

        states, desired, assigned = await self._desired.run(body, write=False)
        revoked = await self._revoked() if self._revoked is not None and nodes else {}
        counts = self._counts(states)
        agents: dict[str, dict[str, AgentStateRecord]] = {}
        for st in states:
            agents.setdefault(st.node_id, {})[st.agent_id] = st
        per_node: dict[str, list[AssignmentRecord]] = {}
        for a in assigned:
            per_node.setdefault(a.node_id, []).append(a)
        return [
            NodeView(
                n,
                self._pool.state(n.node_id),
                counts.get(n.node_id, {}),
                desired.get(n.node_id),
                drift(
                    desired.get(n.node_id),
                    per_node.get(n.node_id, []),
                    agents.get(n.node_id, {}),
                ),
                revoked.get(n.node_id, 0),
                await self._stream(n.node_id, ask_directory=ask_directory),
            )
            for n in nodes
        ]

    async def _selected(self, selector: Selector) -> list[NodeRecord]:
        return [n for n in await self._nodes.list() if selector.matches(n.labels)]

    async def list_nodes(self, selector: Selector) -> list[NodeView]:
        """Nodes whose labels match, ordered by id."""
        return await self._views(await self._selected(selector))

    async def get_node(self, node_id: str) -> NodeView:
        """One node; NotFound if it never registered."""
        (view,) = await self._views([await self._ops.node(node_id)], ask_directory=True)
        return view

    async def update_labels(
        self, node_id: str, set_: Mapping[str, str], remove: Collection[str], *, actor: str
    ) -> LabelsUpdated:
        """Set and remove operator labels (Kubernetes syntax), audited; the node afterwards.

        Operator labels overlay the daemon's and survive its re-registration; a
        key only the daemon's config sets cannot be removed here
        (FailedPrecondition: only the host can change it).
        """
        validate_labels(set_, field="set")
        for i, key in enumerate(remove):
            validate_label_key(key, field=f"remove[{i}]")
        both = sorted(set(set_) & set(remove))
        if both:
            raise InvalidArgument(f"{', '.join(both)} both set and removed", field="remove")
        if not set_ and not remove:
            raise InvalidArgument("nothing to change: give labels to set or keys to remove")
        node = await self._ops.node(node_id)
        operator = {k: v for k, v in {**node.operator_labels, **set_}.items() if k not in remove}
        merged = {**node.daemon_labels, **operator}
        # Only growth is refused: a daemon may have taken the node past the cap
        # since operators labelled it, and they must still be able to shed labels.
        if len(merged) > MAX_LABELS and len(merged) > len(node.labels):
            raise InvalidArgument(
                f"{node_id} would have {len(merged)} labels; at most {MAX_LABELS} are allowed",
                field="set",
            )
        before, updated = await self._nodes.update_labels(
            node_id, set_, remove, actor=actor, now_ms=int(self._clock() * 1000)
        )
        change = [f"{k}={v}" for k, v in sorted(set_.items())] + [f"{k}-" for k in sorted(remove)]
        await self._recorder.record(
            actor=actor,
            action="nodes.label",
            target=node_id,
            detail={"change": " ".join(change)},
            outcome="ok",
            message=f"{actor} labelled {node_id}: {' '.join(change)}",
            node_id=node_id,
        )
        self._on_labels_changed()  # the node may start or stop matching definitions
        (view,) = await self._views([updated])
        return LabelsUpdated(view, sorted(k for k in set(remove) if k not in before.labels))

    async def _target_nodes(self, node_id: str, selector: Selector) -> list[NodeRecord]:
        if node_id:
            if not selector.is_empty:
                raise InvalidArgument("give a node_id or a selector, not both", field="selector")
            return [await self._ops.node(node_id)]
        return await self._selected(selector)

    async def list_agents(
        self,
        node_id: str,
        selector: Selector,
        *,
        live: bool = False,
        call_timeout: float | None = None,
        statuses: Collection[str] = (),
        unhealthy: bool = False,
    ) -> AgentListing:
        """Agents of one node or of the selected nodes (all nodes if neither is given).

        Only those in `statuses` (names like "FATAL"; empty: any) and, with
        `unhealthy`, only UNHEALTHY ones. Synced states of offline nodes are
        marked stale.
        """
        health = "UNHEALTHY" if unhealthy else ""
        nodes = await self._target_nodes(node_id, selector)
        if not live:
            offline = {n.node_id for n in nodes if n.status == "offline"}
            states = await self._agents.list(
                node_ids=[n.node_id for n in nodes], statuses=statuses, health=health
            )
            return AgentListing([NodeAgent(s.node_id, s, s.node_id in offline) for s in states])
        listing = await self._ask_agents(nodes, call_timeout=call_timeout)
        wanted = set(statuses)
        listing.agents[:] = [
            a
            for a in listing.agents
            if (not wanted or a.agent.status in wanted) and (not health or a.agent.health == health)
        ]
        return listing

    async def _ask_agents(
        self, nodes: Sequence[NodeRecord], *, call_timeout: float | None
    ) -> AgentListing:
        """Every agent of `nodes`, asked of their daemons now."""
        sem = asyncio.Semaphore(self._live_concurrency)

        async def ask(node: NodeRecord) -> list[NodeAgent] | str:
            async with sem:
                try:
                    resp = await self._pool.list_agents(
                        node.node_id, node.daemon_address, call_timeout=call_timeout
                    )
                except FleetError as exc:
                    return exc.message
            received_ms = int(self._clock() * 1000)
            infos = sorted(resp.agents, key=lambda a: a.id)
            return [
                NodeAgent(
                    node.node_id,
                    record_from_info(node.node_id, i, received_ms=received_ms),
                    spec=i.spec if i.HasField("spec") else None,
                    log_path=i.log_path,
                )
                for i in infos
            ]

        answers = await asyncio.gather(*(ask(n) for n in nodes))
        listing = AgentListing([])
        for node, answer in zip(nodes, answers, strict=True):
            if isinstance(answer, str):
                listing.errors.append((node.node_id, answer))
            else:
                listing.agents.extend(answer)
        return listing

    async def agent_metrics(
        self,
        node_id: str,
        agent_id: str,
        duration_seconds: int,
        *,
        call_timeout: float | None = None,
    ) -> daemon_pb2.GetAgentMetricsResponse:
        """The daemon's recent samples of one agent (passthrough)."""
        _require_agent_id(agent_id)
        if duration_seconds < 0:
            raise InvalidArgument(
                f"must be >= 0 (0 reads all the daemon keeps), got {duration_seconds}",
                field="duration_seconds",
            )
        node = await self._ops.node(node_id)
        return await self._pool.get_agent_metrics(
            node_id, node.daemon_address, agent_id, duration_seconds, call_timeout=call_timeout
        )

    async def read_log(
        self, node_id: str, agent_id: str, *, offset: int, max_bytes: int, follow: bool
    ) -> AsyncGenerator[daemon_pb2.ReadAgentLogResponse, None]:
        """The daemon's log chunks of one agent (passthrough; follow keeps it open)."""
        _require_agent_id(agent_id)
        if max_bytes < 0:
            raise InvalidArgument(f"must be >= 0, got {max_bytes}", field="max_bytes")
        node = await self._ops.node(node_id)
        stream = self._pool.read_agent_log(
            node_id,
            node.daemon_address,
            agent_id,
            offset=offset,
            max_bytes=max_bytes,
            follow=follow,
        )
        async for chunk in stream:
            yield chunk

    async def query_metrics(
        self,
        *,
        node_id: str,
        agent_id: str,
        type: str,
        name: str,
        start_ms: int,
        end_ms: int,
        step_s: int,
        aggregate: str,
    ) -> tuple[dict[str, list[tuple[int, float]]], int]:
        """Bucketed series per value name and the step used.

        end 0 = now, start 0 = an hour before end, step 0 = about 60 buckets.
        """
        node = await self._ops.node(node_id)
        end_ms = end_ms or int(self._clock() * 1000)
        start_ms = start_ms or max(0, end_ms - DEFAULT_RANGE_MS)
        if not 0 <= step_s <= MAX_STEP_SECONDS:
            raise InvalidArgument(
                f"must be between 0 (automatic) and {MAX_STEP_SECONDS} (ten years), got {step_s}",
                field="step_seconds",
            )
        if step_s == 0:
            step_s = max(1, math.ceil((end_ms - start_ms) / 1000 / DEFAULT_BUCKETS))
        series = await self._metrics.query(
            node_id=node_id,
            agent_id=agent_id,
            type=type,
            name=name,
            start_ms=start_ms,
            end_ms=end_ms,
            step_s=step_s,
            aggregate=aggregate,
        )
        if not series:  # nothing in range, or nothing ever: say which
            problem = missing_metric(
                await self._metrics.series(node_id),
                node_id=node_id,
                agent_id=agent_id,
                type=type,
                name=name,
                clock_offset_ms=node.clock_offset_ms,
            )
            if problem is not None:
                raise NotFound(problem, resource=Resource("metric-type", type, node=node_id))
        return series, step_s

    async def metric_types(self, node_id: str) -> list[MetricType]:
        """The metric types `node_id` has reported (and the store still holds)."""
        await self._ops.node(node_id)
        return metric_types(await self._metrics.series(node_id))


def _require_agent_id(agent_id: str) -> None:
    if not agent_id:
        raise InvalidArgument("is required", field="agent_id")
    validate_label_value(agent_id, field="agent_id")
