"""Operator operations on agents: one (OperateAgent) or a fan-out (OperateAgents).

Targets are resolved from what the manager knows: `agent_id` or
`agent_type` picks agents from the states the daemons last synced (an agent
the daemon has not reported yet is not a target), and the selector keeps
those whose node's labels match (one joined read, `TargetRepository`).
Each target is then one pooled `DaemonService.OperateAgent` call, run
through `sliding_window`.

Every mutating call is written to the operations audit with the operator's
identity and produces OPERATION events (a fan-out: one when it starts, one
with the summary when it ends, so a watcher sees a rollout in progress).
A plan (dry run) resolves and lists the targets and records nothing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from fleet.errors import FleetError, InvalidArgument, NotFound, Resource, Unavailable
from fleet.labels import validate_label_value, validate_node_id
from fleet.selectors import Selector
from fleet.v1 import common_pb2
from manager.pool import DaemonPool
from manager.service.agents import age_field, on_manager_clock
from manager.service.fanout import Outcome, sliding_window
from manager.storage import AgentStateRecord, NodeRecord, NodeRepository
from manager.storage.operation_log import OperationLog
from manager.storage.targets import Candidate, TargetRepository

__all__ = [
    "Action",
    "OperationRecorder",
    "Operations",
    "Summary",
    "Target",
    "TargetResult",
    "check_agent_choice",
    "resolve_targets",
]

log = logging.getLogger(__name__)

Action = Literal["start", "stop", "restart"]

_PB_OPERATION: dict[Action, common_pb2.AgentOperation.ValueType] = {
    "start": common_pb2.AGENT_OPERATION_START,
    "stop": common_pb2.AGENT_OPERATION_STOP,
    "restart": common_pb2.AGENT_OPERATION_RESTART,
}


@dataclass(frozen=True)
class Target:
    """One agent on one node that an operation acts on."""

    node_id: str
    """The node."""
    agent_id: str
    """The agent on it."""
    address: str
    """The daemon's address the pool dials."""


@dataclass(frozen=True)
class TargetResult:
    """How one target ended (or, for a plan, that it would be acted on)."""

    target: Target
    """The target."""
    outcome: Literal["planned", "ok", "failed", "skipped"]
    """What happened."""
    message: str = ""
    """Why it failed or was skipped."""
    agent: common_pb2.AgentInfo | None = None
    """The agent after the operation, as its daemon answered (ok only)."""
    duration_ms: int = 0
    """How long its call took."""


@dataclass(frozen=True)
class Summary:
    """The end of a fan-out."""

    operation_id: str
    """Audit id of the fan-out ("" for a plan, which records nothing)."""
    total: int
    """Targets resolved."""
    ok: int
    """Targets operated on successfully."""
    failed: int
    """Targets whose call failed."""
    skipped: int
    """Targets not attempted because max_errors was reached."""
    planned: int
    """Targets listed by a plan."""
    duration_ms: int
    """Wall time of the whole fan-out."""


def check_agent_choice(agent_id: str, agent_type: str) -> None:
    """InvalidArgument unless exactly one of agent_id and agent_type is given (and valid)."""
    if bool(agent_id) == bool(agent_type):
        raise InvalidArgument(
            "set exactly one of agent_id and agent_type (got "
            + ("both" if agent_id else "neither")
            + ")",
            field="agent_id",
        )
    if agent_id:
        validate_label_value(agent_id, field="agent_id")
    else:
        validate_label_value(agent_type, field="agent_type")


def resolve_targets(candidates: Sequence[Candidate], selector: Selector) -> list[Target]:
    """The candidates whose node matches `selector`, in the candidates' order. Pure."""
    return [
        Target(c.node_id, c.agent_id, c.daemon_address)
        for c in candidates
        if selector.matches(c.node_labels)
    ]


def record_from_info(
    node_id: str, info: common_pb2.AgentInfo, *, received_ms: int
) -> AgentStateRecord:
    """A daemon's AgentInfo (from the pool, received at `received_ms`) as the manager's
    agent record (times re-based as `agents.on_manager_clock` says)."""
    try:
        status = common_pb2.AgentStatus.Name(info.status).removeprefix("AGENT_STATUS_")
        health = common_pb2.AgentHealth.Name(info.health).removeprefix("AGENT_HEALTH_")
    except ValueError:  # a newer daemon's enum value
        status, health = "UNKNOWN", ""
    return AgentStateRecord(
        node_id=node_id,
        agent_id=info.id,
        status=status,
        pid=info.pid,
        last_heartbeat_ms=info.last_heartbeat,
        type=info.type,
        version=info.version,
        start_time_ms=on_manager_clock(
            info.start_time, age_field(info, "start_age_ms"), received_ms
        ),
        restart_count=info.restart_count,
        exit_code=info.exit_code,
        message=info.message,
        labels=dict(info.labels),
        health=health,
        config_version=info.config_version,
        last_exit_kind=_exit_kind(info),
        last_exit_code=info.last_exit.exit_code,
        last_exit_reason=info.last_exit.reason,
        last_exit_ms=info.last_exit.time,
        revision=info.revision,
        health_message=info.health_message,
        health_since_ms=on_manager_clock(
            info.health_since, age_field(info, "health_age_ms"), received_ms
        ),
        log_problem=info.log_problem,
    )


def _exit_kind(info: common_pb2.AgentInfo) -> str:
    try:
        name = common_pb2.AgentExitKind.Name(info.last_exit.kind)
    except ValueError:  # a newer daemon's enum value
        return "unknown"
    kind = name.removeprefix("AGENT_EXIT_KIND_").lower()
    return "" if kind == "unspecified" else kind


class OperationRecorder:
    """Writes the audit entry and the OPERATION event of an operator action (atomically)."""

    def __init__(self, log: OperationLog, *, clock: Callable[[], float]) -> None:
        self._log = log
        self._clock = clock

    async def record(
        self,
        *,
        actor: str,
        action: str,
        target: str,
        detail: Mapping[str, str],
        outcome: str,
        message: str,
        node_id: str = "",
        agent_id: str = "",
    ) -> int:
        """Audit entry and event in one transaction; returns the audit id (the event has it)."""

        def attributes(audit_id: int) -> dict[str, str]:
            # operation_id: the fan-out's first audit entry (detail carries it on
            # the closing entry); audit_id: this entry.
            return {
                "operation_id": str(audit_id),
                **detail,
                "audit_id": str(audit_id),
                "action": action,
                "outcome": outcome,
            }

        return await self._log.record(
            actor=actor,
            action=action,
            target=target,
            detail=detail,
            outcome=outcome,
            now_ms=int(self._clock() * 1000),
            message=message,
            event_attributes=attributes,
            node_id=node_id,
            agent_id=agent_id,
        )


class Operations:
    """OperateAgent and OperateAgents: resolve, call the daemons, record."""

    def __init__(
        self,
        nodes: NodeRepository,
        targets: TargetRepository,
        pool: DaemonPool,
        recorder: OperationRecorder,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._nodes = nodes
        self._targets = targets
        self._pool = pool
        self._recorder = recorder
        self._clock = clock

    async def node(self, node_id: str) -> NodeRecord:
        """The registered node; NotFound otherwise."""
        validate_node_id(node_id)
        node = await self._nodes.get(node_id)
        if node is None:
            raise NotFound(
                f"node {node_id!r} is not registered", resource=Resource("node", node_id)
            )
        return node

    async def _call(
        self, target: Target, action: Action, call_timeout: float | None
    ) -> common_pb2.AgentInfo:
        # The pool's errors name the node and say why in words already.
        response = await self._pool.operate_agent(
            target.node_id,
            target.address,
            target.agent_id,
            _PB_OPERATION[action],
            call_timeout=call_timeout,
        )
        if not response.success:  # the contract answers errors as codes; be safe anyway
            raise Unavailable(f"{target.node_id}: {response.error_message or 'operation failed'}")
        return response.agent

    async def operate_one(
        self,
        node_id: str,
        agent_id: str,
        action: Action,
        *,
        actor: str,
        call_timeout: float | None = None,
    ) -> common_pb2.AgentInfo:
        """Act on one agent through the pool (its new state as the daemon answers); audited."""
        validate_label_value(agent_id, field="agent_id")
        if not agent_id:
            raise InvalidArgument("is required", field="agent_id")
        node = await self.node(node_id)
        target = Target(node_id, agent_id, node.daemon_address)
        detail = {"node_id": node_id, "agent_id": agent_id}
        outcome, message = "failed", f"{actor}: {action} {agent_id} on {node_id} failed"
        try:
            agent = await self._call(target, action, call_timeout)
        except FleetError as exc:
            detail["error"] = exc.message
            raise
        except BaseException:  # cancelled by the caller: not known to have happened
            outcome = "cancelled"
            raise
        else:
            outcome, message = "ok", f"{actor}: {action} {agent_id} on {node_id}: done"
            return agent
        finally:
            await self._recorder.record(
                actor=actor,
                action=f"agents.{action}",
                target=f"{node_id}/{agent_id}",
                detail=detail,
                outcome=outcome,
                message=message,
                node_id=node_id,
                agent_id=agent_id,
            )

    async def resolve(self, selector: Selector, *, agent_id: str, agent_type: str) -> list[Target]:
        """The targets of a fan-out; NotFound when nothing matches (so a typo is not silent)."""
        check_agent_choice(agent_id, agent_type)
        candidates = await self._targets.candidates(agent_id=agent_id, agent_type=agent_type)
        targets = resolve_targets(candidates, selector)
        if targets:
            return targets
        # Only now read the nodes, to say which half of the request matched nothing.
        where = str(selector) or "(all)"
        matched = [n for n in await self._nodes.list() if selector.matches(n.labels)]
        if not matched:
            raise NotFound(f"no registered node matches selector {where!r}")
        what = f"agent {agent_id!r}" if agent_id else f"agents of type {agent_type!r}"
        raise NotFound(f"no {what} on the {len(matched)} node(s) matching {where!r}")

    async def fan_out(
        self,
        selector: Selector,
        action: Action,
        *,
        agent_id: str = "",
        agent_type: str = "",
        max_concurrency: int = 1,
        max_errors: int = 0,
        plan: bool = False,
        actor: str,
        call_timeout: float | None = None,
        batch_interval: float = 0.0,
    ) -> AsyncGenerator[list[TargetResult] | Summary, None]:
        """Yield every target's TargetResult as it finishes, in batches (each batch:
        all that finished since the caller last asked, or within `batch_interval`
        seconds of its first; see `sliding_window`), then the Summary.

        Resolution errors (bad request, nothing matches) raise before anything
        is yielded or touched. Close the iterator to stop launching targets.
        """
        if max_concurrency < 0:
            raise InvalidArgument(f"must be >= 0, got {max_concurrency}", field="max_concurrency")
        if max_errors < 0:
            raise InvalidArgument(f"must be >= 0, got {max_errors}", field="max_errors")
        started = time.monotonic()
        targets = await self.resolve(selector, agent_id=agent_id, agent_type=agent_type)
        if plan:
            yield [TargetResult(target, "planned") for target in targets]
            yield Summary("", len(targets), 0, 0, 0, len(targets), _ms_since(started))
            return
        what = f"agent {agent_id}" if agent_id else f"agents of type {agent_type}"
        where = str(selector) or "(all nodes)"
        params = {
            "selector": str(selector),
            "agent_id": agent_id,
            "agent_type": agent_type,
            "max_concurrency": str(max(1, max_concurrency)),
            "max_errors": str(max_errors),
            "targets": str(len(targets)),
        }
        op_id = await self._recorder.record(
            actor=actor,
            action=f"agents.{action}",
            target=f"{where}: {what}",
            detail=params,
            outcome="started",
            message=f"{actor} started {action} of {what} on {len(targets)} target(s) ({where})",
        )
        counts = {"ok": 0, "failed": 0, "skipped": 0}
        outcome = "cancelled"
        window = sliding_window(
            targets,
            lambda t: self._call(t, action, call_timeout),
            max_concurrency=max(1, max_concurrency),
            max_errors=max_errors,
            # No window timeout: one pool deadline already bounds the wait for a
            # channel, every attempt and the sleeps between them (and a timer per
            # call was ~5% of the manager's CPU in a 500-target fan-out).
            batch_interval=batch_interval,
        )
        try:
            async with contextlib.aclosing(window):
                async for batch in window:
                    for result in batch:
                        counts[result.kind] += 1
                    yield [_target_result(result) for result in batch]
            outcome = (
                "ok" if counts["ok"] == len(targets) else "partial" if counts["ok"] else "failed"
            )
            yield Summary(
                str(op_id),
                len(targets),
                counts["ok"],
                counts["failed"],
                counts["skipped"],
                0,
                _ms_since(started),
            )
        finally:
            # Also when the client went away: the audit says how far it got.
            summary = {**params, "operation_id": str(op_id)} | {
                k: str(v) for k, v in counts.items()
            }
            try:
                await self._recorder.record(
                    actor=actor,
                    action=f"agents.{action}",
                    target=f"{where}: {what}",
                    detail=summary,
                    outcome=outcome,
                    message=(
                        f"{action} of {what} on {where} {outcome}: {counts['ok']} ok, "
                        f"{counts['failed']} failed, {counts['skipped']} skipped"
                    ),
                )
            except FleetError as exc:  # never mask the rollout's own result
                log.warning("could not record the end of operation %s: %s", op_id, exc)


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _target_result(result: Outcome[Target, common_pb2.AgentInfo]) -> TargetResult:
    return TargetResult(
        result.target,
        result.kind,
        message=result.error,
        agent=result.value,
        duration_ms=int(result.duration * 1000),
    )
