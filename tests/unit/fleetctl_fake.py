"""A real grpc.aio FleetService over mTLS, in a thread, for fleetctl's CliRunner tests.

Not a mock of our code: a small in-memory FleetService with the contract's
semantics (operator-only, NotFound for unknown nodes/agents, selectors via
fleet.selectors, a fan-out with a window and an error budget, a plan that
touches nothing), served by a real grpc.aio server on 127.0.0.1:0 with the
real mTLS credentials and error interceptor. fleetctl runs in the test's
thread with its own event loop, as it does as a command. The manager's own
FleetService replaces this in tests/system once it lands.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpc import aio
from typer.testing import CliRunner, Result

from fleet import selectors
from fleet.errors import InvalidArgument, NotFound, Unavailable
from fleet.interceptors import ErrorMappingInterceptor
from fleet.tls import TLSConfig, require_role, server_credentials
from fleet.v1 import common_pb2, fleet_pb2, fleet_pb2_grpc
from fleetctl.app import app

NOW_MS = 1_800_000_000_000


@dataclass
class FakeFleet:
    """The fleet the fake manager knows; tests read and change it."""

    nodes: dict[str, fleet_pb2.Node] = field(default_factory=dict)
    agents: dict[str, list[common_pb2.AgentInfo]] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    slow: set[str] = field(default_factory=set)
    """Nodes whose operations never answer (the caller's deadline ends them)."""
    events: list[fleet_pb2.Event] = field(default_factory=list)
    series: dict[tuple[str, str, str], list[fleet_pb2.MetricSeries]] = field(default_factory=dict)
    logs: dict[tuple[str, str], bytes] = field(default_factory=dict)
    operations: list[tuple[str, str, str]] = field(default_factory=list)
    requests: list[tuple[str, Any]] = field(default_factory=list)
    callers: list[str] = field(default_factory=list)
    max_in_flight: int = 0
    break_after: int | None = None
    batches: list[int] = field(default_factory=list)
    """Results per OperateAgents message sent to clients that asked for batches."""
    ignores_filters: bool = False
    """Answer ListAgents as a manager from before its status/health filters would."""

    def add_node(self, node_id: str, labels: dict[str, str], agents: list[str]) -> None:
        """A node with agents (id == type unless 'id:type') all RUNNING."""
        self.nodes[node_id] = fleet_pb2.Node(
            node_id=node_id,
            hostname=f"{node_id}.example",
            labels=labels,
            status=common_pb2.NODE_STATUS_ONLINE,
            last_heartbeat=NOW_MS,
            daemon_version="0.1.0",
        )
        infos = []
        for i, spec in enumerate(agents):
            agent_id, _, agent_type = spec.partition(":")
            kind = agent_type or agent_id
            infos.append(
                common_pb2.AgentInfo(
                    id=agent_id,
                    type=kind,
                    status=common_pb2.AGENT_STATUS_RUNNING,
                    pid=1000 + len(self.nodes) * 100 + i,
                    start_time=NOW_MS - 60_000,
                    # What a daemon shows of its spec: env names, never values.
                    spec=common_pb2.AgentSpec(
                        id=agent_id,
                        argv=[f"/opt/{kind}/bin/{kind}", "--port", "8080"],
                        env={"DB_PASSWORD": "", "LOG_LEVEL": ""},
                        restart=common_pb2.RESTART_POLICY_ON_FAILURE,
                        autostart=True,
                        start_secs=1.0,
                        max_retries=5,
                        stop_signal="SIGTERM",
                        stop_timeout_seconds=10.0,
                    ),
                    log_path=f"/var/log/fleet/agents/{agent_id}.log",
                )
            )
        self.agents[node_id] = infos

    def take_offline(self, node_id: str, last_heartbeat_ms: int) -> None:
        """The node stopped heartbeating at `last_heartbeat_ms`; its daemon is unreachable."""
        self.nodes[node_id].status = common_pb2.NODE_STATUS_OFFLINE
        self.nodes[node_id].last_heartbeat = last_heartbeat_ms
        self.down.add(node_id)


def _node(fleet: FakeFleet, node_id: str) -> fleet_pb2.Node:
    if node_id not in fleet.nodes:
        raise NotFound(f"node {node_id!r} is not registered")
    return fleet.nodes[node_id]


def _wanted(agent: common_pb2.AgentInfo, request: Any) -> bool:
    """ListAgents' status and health filters."""
    if request.statuses and agent.status not in request.statuses:
        return False
    return not request.unhealthy or agent.health == common_pb2.AGENT_HEALTH_UNHEALTHY


def _agent(fleet: FakeFleet, node_id: str, agent_id: str) -> common_pb2.AgentInfo:
    _node(fleet, node_id)
    for agent in fleet.agents[node_id]:
        if agent.id == agent_id:
            return agent
    raise NotFound(f"agent {agent_id!r} not found on node {node_id!r}")


class FakeFleetService(fleet_pb2_grpc.FleetServiceServicer):
    """FleetService over a FakeFleet."""

    def __init__(self, fleet: FakeFleet) -> None:
        self.fleet = fleet
        self._in_flight = 0

    def _enter(self, name: str, request: Any, context: Any) -> None:
        identity = require_role(context, "operator")
        self.fleet.callers.append(str(identity))
        self.fleet.requests.append((name, request))

    def _select(self, msg: common_pb2.LabelSelector) -> list[str]:
        sel = selectors.from_proto(msg)
        return sorted(n for n, node in self.fleet.nodes.items() if sel.matches(node.labels))

    async def ListNodes(self, request: Any, context: Any) -> Any:
        self._enter("ListNodes", request, context)
        return fleet_pb2.FleetServiceListNodesResponse(
            nodes=[self.fleet.nodes[n] for n in self._select(request.selector)]
        )

    async def GetNode(self, request: Any, context: Any) -> Any:
        self._enter("GetNode", request, context)
        return fleet_pb2.FleetServiceGetNodeResponse(node=_node(self.fleet, request.node_id))

    async def UpdateNodeLabels(self, request: Any, context: Any) -> Any:
        self._enter("UpdateNodeLabels", request, context)
        node = _node(self.fleet, request.node_id)
        absent = sorted(k for k in set(request.remove) if k not in node.labels)
        for key in request.remove:
            node.labels.pop(key, None)
        node.labels.update(request.set)
        return fleet_pb2.FleetServiceUpdateNodeLabelsResponse(node=node, absent_keys=absent)

    async def ListAgents(self, request: Any, context: Any) -> Any:
        self._enter("ListAgents", request, context)
        names = [request.node_id] if request.node_id else self._select(request.selector)
        reply = fleet_pb2.FleetServiceListAgentsResponse()
        for name in names:
            node = _node(self.fleet, name)
            if request.live and name in self.fleet.down:
                reply.errors.add(
                    node_id=name, message=f"{name}: daemon at 127.0.0.1:1 refused the connection"
                )
                continue
            for agent in self.fleet.agents[name]:
                if not self.fleet.ignores_filters and not _wanted(agent, request):
                    continue
                item = reply.agents.add(node_id=name, agent=agent)
                if request.live:
                    continue
                # As the manager: synced states have no spec; an offline node's are stale.
                item.agent.ClearField("spec")
                item.agent.ClearField("log_path")
                item.reported_at = node.last_heartbeat
                item.stale = node.status == common_pb2.NODE_STATUS_OFFLINE
        return reply

    async def _operate(self, node_id: str, agent_id: str, op: int) -> common_pb2.AgentInfo:
        agent = _agent(self.fleet, node_id, agent_id)
        if node_id in self.fleet.down:
            raise Unavailable(f"node {node_id}: daemon at 127.0.0.1:1 unreachable")
        if node_id in self.fleet.slow:
            await asyncio.sleep(60)
        self._in_flight += 1
        self.fleet.max_in_flight = max(self.fleet.max_in_flight, self._in_flight)
        try:
            await asyncio.sleep(0.01)
        finally:
            self._in_flight -= 1
        name = common_pb2.AgentOperation.Name(op).removeprefix("AGENT_OPERATION_").lower()
        self.fleet.operations.append((node_id, agent_id, name))
        if op == common_pb2.AGENT_OPERATION_STOP:
            agent.status, agent.pid = common_pb2.AGENT_STATUS_STOPPED, 0
        else:
            agent.status, agent.pid = common_pb2.AGENT_STATUS_RUNNING, agent.pid + 7
            agent.restart_count += op == common_pb2.AGENT_OPERATION_RESTART
        return agent

    async def OperateAgent(self, request: Any, context: Any) -> Any:
        self._enter("OperateAgent", request, context)
        if request.operation == common_pb2.AGENT_OPERATION_UNSPECIFIED:
            raise InvalidArgument("unset", field="operation")
        agent = await self._operate(request.node_id, request.agent_id, request.operation)
        return fleet_pb2.FleetServiceOperateAgentResponse(
            agent=fleet_pb2.NodeAgent(node_id=request.node_id, agent=agent)
        )

    async def OperateAgents(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self._enter("OperateAgents", request, context)
        if bool(request.agent_id) == bool(request.agent_type):
            raise InvalidArgument("set exactly one of agent_id and agent_type", field="agent_id")
        targets = [
            (n, a)
            for n in self._select(request.selector)
            for a in self.fleet.agents[n]
            if a.id == request.agent_id or a.type == request.agent_type
        ]
        counts = {"ok": 0, "failed": 0, "skipped": 0, "planned": 0}
        Response = fleet_pb2.FleetServiceOperateAgentsResponse

        def messages(results: list[fleet_pb2.TargetResult]) -> list[Any]:
            # As the manager: with batch_results one message per batch, else one each.
            if not results:
                return []
            if request.batch_results:
                self.fleet.batches.append(len(results))
                return [Response(results=results)]
            return [Response(result=r) for r in results]

        if request.plan:
            counts["planned"] = len(targets)
            planned = [
                fleet_pb2.TargetResult(
                    node_id=n, agent_id=a.id, outcome=fleet_pb2.TARGET_OUTCOME_PLANNED, agent=a
                )
                for n, a in targets
            ]
            for msg in messages(planned):
                yield msg
        else:
            window = max(1, request.max_concurrency)
            pending = list(targets)
            while pending:
                if request.max_errors and counts["failed"] >= request.max_errors:
                    break
                batch, pending = pending[:window], pending[window:]
                outcomes = await asyncio.gather(
                    *(self._one(n, a.id, request.operation) for n, a in batch)
                )
                sent: list[fleet_pb2.TargetResult] = []
                for result in outcomes:
                    if self.fleet.break_after is not None and sum(counts.values()) >= (
                        self.fleet.break_after
                    ):
                        for msg in messages(sent):
                            yield msg
                        raise Unavailable("the manager is shutting down")
                    key = "ok" if result.outcome == fleet_pb2.TARGET_OUTCOME_OK else "failed"
                    counts[key] += 1
                    sent.append(result)
                for msg in messages(sent):
                    yield msg
            skipped = [
                fleet_pb2.TargetResult(
                    node_id=n,
                    agent_id=a.id,
                    outcome=fleet_pb2.TARGET_OUTCOME_SKIPPED,
                    message="max_errors reached",
                )
                for n, a in pending
            ]
            counts["skipped"] = len(skipped)
            for msg in messages(skipped):
                yield msg
        yield fleet_pb2.FleetServiceOperateAgentsResponse(
            summary=fleet_pb2.OperationSummary(
                operation_id="op-1", total=len(targets), duration_ms=12, **counts
            )
        )

    async def _one(self, node_id: str, agent_id: str, op: int) -> fleet_pb2.TargetResult:
        try:
            agent = await self._operate(node_id, agent_id, op)
        except Unavailable as exc:
            return fleet_pb2.TargetResult(
                node_id=node_id,
                agent_id=agent_id,
                outcome=fleet_pb2.TARGET_OUTCOME_FAILED,
                message=exc.message,
            )
        return fleet_pb2.TargetResult(
            node_id=node_id,
            agent_id=agent_id,
            outcome=fleet_pb2.TARGET_OUTCOME_OK,
            agent=agent,
            duration_ms=10,
        )

    async def QueryMetrics(self, request: Any, context: Any) -> Any:
        self._enter("QueryMetrics", request, context)
        _node(self.fleet, request.node_id)
        key = (request.node_id, request.agent_id, request.type)
        series = [
            s for s in self.fleet.series.get(key, []) if not request.name or s.name == request.name
        ]
        return fleet_pb2.FleetServiceQueryMetricsResponse(
            series=series, step_seconds=request.step_seconds or 60
        )

    async def GetAgentMetrics(self, request: Any, context: Any) -> Any:
        self._enter("GetAgentMetrics", request, context)
        _agent(self.fleet, request.node_id, request.agent_id)
        return fleet_pb2.FleetServiceGetAgentMetricsResponse(
            node_id=request.node_id,
            agent_id=request.agent_id,
            data_points=[
                common_pb2.ResourceDataPoint(
                    timestamp=NOW_MS - i * 1000, cpu=float(i), memory_rss=(i + 1) << 20, threads=2
                )
                for i in range(5)
            ],
        )

    async def ReadAgentLog(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self._enter("ReadAgentLog", request, context)
        _agent(self.fleet, request.node_id, request.agent_id)
        data = self.fleet.logs.get((request.node_id, request.agent_id), b"")
        start = max(0, len(data) + request.offset) if request.offset < 0 else request.offset
        yield fleet_pb2.FleetServiceReadAgentLogResponse(
            data=data[start:], offset=start, next_offset=len(data)
        )
        if request.follow:  # one "new" line, then the fake's stream ends
            more = b"followed line\n"
            yield fleet_pb2.FleetServiceReadAgentLogResponse(
                data=more, offset=len(data), next_offset=len(data) + len(more)
            )

    async def WatchEvents(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self._enter("WatchEvents", request, context)
        for event in self.fleet.events:
            if event.id <= request.from_event_id:
                continue
            if request.kinds and event.kind not in request.kinds:
                continue
            if request.node_id and event.node_id != request.node_id:
                continue
            yield fleet_pb2.FleetServiceWatchEventsResponse(event=event)


@dataclass(frozen=True)
class FakeManager:
    """Where the fake manager listens and what it knows."""

    address: str
    fleet: FakeFleet


@contextmanager
def serve(tls: TLSConfig, fleet: FakeFleet) -> Iterator[FakeManager]:
    """Serve `fleet` on 127.0.0.1:<free port> with `tls` (a manager certificate)."""
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        server = aio.server(interceptors=[ErrorMappingInterceptor()])
        fleet_pb2_grpc.add_FleetServiceServicer_to_server(FakeFleetService(fleet), server)
        state["port"] = server.add_secure_port("127.0.0.1:0", server_credentials(tls))
        await server.start()
        stop = asyncio.Event()
        state["loop"], state["stop"] = asyncio.get_running_loop(), stop
        ready.set()
        await stop.wait()
        await server.stop(0)

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced to the test below
            state["error"] = exc
            ready.set()

    thread = threading.Thread(target=run, name="fake-fleet-manager", daemon=True)
    thread.start()
    ready.wait(10)
    if "error" in state:
        raise state["error"]
    try:
        yield FakeManager(f"127.0.0.1:{state['port']}", fleet)
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(10)


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    """Poll `predicate` until true (for state changed by the server thread)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def demo_fleet() -> FakeFleet:
    """Three nodes: two prod web nodes (web, worker) and one staging node."""
    fleet = FakeFleet()
    fleet.add_node("node-1", {"env": "prod", "tier": "web"}, ["web", "worker-1:worker"])
    fleet.add_node("node-2", {"env": "prod", "tier": "web"}, ["web", "worker-2:worker"])
    fleet.add_node("node-3", {"env": "staging"}, ["web"])
    return fleet


@dataclass(frozen=True)
class Fleetctl:
    """Runs fleetctl in-process (Typer's CliRunner) against a fake manager."""

    manager: FakeManager
    operator: TLSConfig
    home: Path

    def flags(self) -> list[str]:
        """The connection flags for this manager and operator."""
        return [
            "--manager",
            self.manager.address,
            "--ca",
            str(self.operator.ca_file),
            "--cert",
            str(self.operator.cert_file),
            "--key",
            str(self.operator.key_file),
        ]

    def __call__(
        self, *args: str, connect: bool = True, env: dict[str, str | None] | None = None, **kw: Any
    ) -> Result:
        """`fleetctl [connection flags] *args`, isolated from the user's config and env."""
        isolated: dict[str, str | None] = {
            "XDG_CONFIG_HOME": str(self.home),
            "FLEETCTL_CONFIG": None,
            "COLUMNS": "200",
            **{f"FLEET_{k}": None for k in ("MANAGER", "CA", "CERT", "KEY", "TIMEOUT", "OUTPUT")},
            "FLEET_TRUST_DOMAIN": None,
            **(env or {}),
        }
        argv = [*(self.flags() if connect else []), *args]
        return CliRunner().invoke(app, argv, env=isolated, **kw)
