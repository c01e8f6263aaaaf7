"""FleetService's desired-state RPCs: definitions and rollouts. Translation only.

Mixed into `FleetServicer` (`manager/servicers/fleet_service.py`), which
provides the caller's identity check (`_operator`). The decisions are in
`manager.service.definitions` and `manager.service.rollout_control`.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from fleet.errors import InvalidArgument
from fleet.tls import require_role
from fleet.v1 import common_pb2, desired_pb2, fleet_pb2
from manager.service import rollout as ro
from manager.service.definitions import Change, Definitions, DefinitionState, load_definition
from manager.service.rollout_control import Action, RolloutControl, RolloutView
from manager.storage.records import RevisionRecord

__all__ = ["DesiredRpcs", "OperatorCalls", "definition_revision", "rollout_message"]

_Context = aio.ServicerContext[Any, Any]

_ACTIONS = {
    "add": desired_pb2.NODE_CHANGE_ACTION_ADD,
    "restart": desired_pb2.NODE_CHANGE_ACTION_RESTART,
    "reconfigure": desired_pb2.NODE_CHANGE_ACTION_RECONFIGURE,
    "remove": desired_pb2.NODE_CHANGE_ACTION_REMOVE,
    "unchanged": desired_pb2.NODE_CHANGE_ACTION_UNCHANGED,
    "refused": desired_pb2.NODE_CHANGE_ACTION_REFUSED,
}


def _change(c: Change) -> desired_pb2.DefinitionChange:
    return desired_pb2.DefinitionChange(
        name=c.name,
        revision=c.revision,
        previous_revision=c.previous_revision,
        changed=c.changed,
        summary=c.summary,
        nodes=[
            desired_pb2.NodeChange(node_id=n.node_id, action=_ACTIONS[n.action], reason=n.reason)
            for n in c.nodes
        ],
        batches=[desired_pb2.RolloutBatch(number=k, node_ids=b) for k, b in c.batches],
        rollout_id=c.rollout_id,
    )


def _int64(value: int, field: str) -> int:
    """A uint64 request field that names a stored number (SQL keeps int64)."""
    if value >= 2**63:
        raise InvalidArgument(f"must be at most 2^63-1, got {value}", field=field)
    return value


def definition_revision(record: RevisionRecord) -> desired_pb2.DefinitionRevision:
    """A stored revision as its message."""
    return desired_pb2.DefinitionRevision(
        definition=load_definition(record.body),
        revision=record.revision,
        actor=record.actor,
        message=record.message,
        created_at=record.created_ms,
        deleted=record.deleted,
    )


def _policy(p: ro.UpdatePolicy) -> desired_pb2.UpdatePolicy:
    return desired_pb2.UpdatePolicy(
        max_parallel=str(p.max_parallel),
        canary=str(p.canary) if p.canary.value else "",
        auto_promote=p.auto_promote,
        min_healthy_time_seconds=p.min_healthy_time,
        healthy_deadline_seconds=p.healthy_deadline,
        progress_deadline_seconds=p.progress_deadline,
        auto_revert=p.auto_revert,
        pause_between_batches_seconds=p.pause_between_batches,
    )


@functools.lru_cache(maxsize=256)  # a handful of names; WatchRollout asks per node per poll
def _status(name: str, enum: Any, prefix: str) -> Any:
    try:
        return enum.Value(prefix + name.upper())
    except ValueError:
        return 0


def rollout_message(view: RolloutView, *, with_nodes: bool) -> desired_pb2.Rollout:
    """A rollout as its message (per-node records only `with_nodes`)."""
    r, rec = view.rollout, view.record
    msg = desired_pb2.Rollout(
        id=rec.id,
        name=rec.name,
        target_revision=r.target,
        previous_revision=r.previous,
        state=_status(r.state.value, desired_pb2.RolloutState, "ROLLOUT_STATE_"),
        reason=r.reason,
        policy=_policy(r.policy),
        batch=r.batch,
        promoted=r.promoted,
        reverted_from=r.reverted_from,
        created_at=rec.created_ms,
        updated_at=rec.updated_ms,
        ended_at=rec.ended_ms,
        actor=rec.actor,
        message=rec.message,
    )
    counts = view.counts()
    msg.pending, msg.updating = counts["PENDING"], counts["UPDATING"]
    msg.done, msg.failed, msg.offline = counts["DONE"], counts["FAILED"], counts["offline"]
    if with_nodes:
        for n in view.nodes:
            agent = n.agent
            msg.nodes.add(
                node_id=n.record.node_id,
                phase=_status(n.record.phase, desired_pb2.RolloutNodePhase, "ROLLOUT_NODE_PHASE_"),
                batch=n.record.batch,
                since=n.record.since_ms,
                offline=not n.online,
                reason=n.record.reason,
                running_revision=agent.revision if agent else 0,
                status=_status(agent.status, common_pb2.AgentStatus, "AGENT_STATUS_")
                if agent
                else 0,
                health=_status(agent.health, common_pb2.AgentHealth, "AGENT_HEALTH_")
                if agent
                else 0,
            )
    return msg


def _definition_status(state: DefinitionState) -> desired_pb2.DefinitionStatus:
    view = None
    if state.rollout is not None:
        view = RolloutView(
            state.rollout,
            ro.from_dict(json.loads(state.rollout.record)),
            node_counts=state.rollout_counts,
        )
    return desired_pb2.DefinitionStatus(
        current=definition_revision(state.current),
        stable_revision=state.head.stable_revision,
        nodes=state.nodes,
        nodes_current=state.nodes_current,
        nodes_failed=state.nodes_failed,
        rollout=rollout_message(view, with_nodes=False) if view is not None else None,
        unplaced=state.unplaced,
        unplaced_reason=state.unplaced_reason,
    )


class OperatorCalls:
    """What every FleetService handler starts with: the caller must be an operator."""

    _td: str
    """The fleet's trust domain."""

    def _operator(self, context: _Context) -> str:
        """The caller's identity ("operator/alice"); PermissionDenied for anyone else."""
        return str(require_role(context, "operator", trust_domain=self._td))


class DesiredRpcs(OperatorCalls):
    """The definitions and rollouts RPCs of FleetService."""

    _definitions: Definitions
    _rollouts: RolloutControl

    async def ApplyDefinitions(
        self, request: fleet_pb2.FleetServiceApplyDefinitionsRequest, context: _Context
    ) -> fleet_pb2.FleetServiceApplyDefinitionsResponse:
        actor = self._operator(context)
        changes = await self._definitions.apply(
            list(request.definitions),
            expected={
                name: _int64(rev, f"expected_revisions[{name}]")
                for name, rev in request.expected_revisions.items()
            },
            message=request.message,
            plan=request.plan,
            actor=actor,
        )
        return fleet_pb2.FleetServiceApplyDefinitionsResponse(changes=[_change(c) for c in changes])

    async def ListDefinitions(
        self, request: fleet_pb2.FleetServiceListDefinitionsRequest, context: _Context
    ) -> fleet_pb2.FleetServiceListDefinitionsResponse:
        self._operator(context)
        states = await self._definitions.states(include_deleted=request.include_deleted)
        return fleet_pb2.FleetServiceListDefinitionsResponse(
            definitions=[_definition_status(s) for s in states]
        )

    async def GetDefinition(
        self, request: fleet_pb2.FleetServiceGetDefinitionRequest, context: _Context
    ) -> fleet_pb2.FleetServiceGetDefinitionResponse:
        self._operator(context)
        _, record = await self._definitions.get(request.name, _int64(request.revision, "revision"))
        (state,) = await self._definitions.states(names=[request.name], include_deleted=True)
        return fleet_pb2.FleetServiceGetDefinitionResponse(
            status=_definition_status(state), revision=definition_revision(record)
        )

    async def ListDefinitionRevisions(
        self, request: fleet_pb2.FleetServiceListDefinitionRevisionsRequest, context: _Context
    ) -> fleet_pb2.FleetServiceListDefinitionRevisionsResponse:
        self._operator(context)
        history = await self._definitions.history(request.name)
        return fleet_pb2.FleetServiceListDefinitionRevisionsResponse(
            revisions=[definition_revision(r) for r in history]
        )

    async def DeleteDefinition(
        self, request: fleet_pb2.FleetServiceDeleteDefinitionRequest, context: _Context
    ) -> fleet_pb2.FleetServiceDeleteDefinitionResponse:
        actor = self._operator(context)
        change = await self._definitions.delete(
            request.name, message=request.message, plan=request.plan, actor=actor
        )
        return fleet_pb2.FleetServiceDeleteDefinitionResponse(change=_change(change))

    async def UndoRollout(
        self, request: fleet_pb2.FleetServiceUndoRolloutRequest, context: _Context
    ) -> fleet_pb2.FleetServiceUndoRolloutResponse:
        actor = self._operator(context)
        change = await self._definitions.undo(
            request.name,
            to_revision=_int64(request.to_revision, "to_revision"),
            message=request.message,
            plan=request.plan,
            actor=actor,
        )
        return fleet_pb2.FleetServiceUndoRolloutResponse(change=_change(change))

    async def GetRollout(
        self, request: fleet_pb2.FleetServiceGetRolloutRequest, context: _Context
    ) -> fleet_pb2.FleetServiceGetRolloutResponse:
        self._operator(context)
        view = await self._rollouts.get(request.name, _int64(request.rollout_id, "rollout_id"))
        return fleet_pb2.FleetServiceGetRolloutResponse(
            rollout=rollout_message(view, with_nodes=True)
        )

    async def ListRollouts(
        self, request: fleet_pb2.FleetServiceListRolloutsRequest, context: _Context
    ) -> fleet_pb2.FleetServiceListRolloutsResponse:
        self._operator(context)
        views = await self._rollouts.list(request.name, live=request.live, limit=request.limit)
        return fleet_pb2.FleetServiceListRolloutsResponse(
            rollouts=[rollout_message(v, with_nodes=False) for v in views]
        )

    async def WatchRollout(
        self, request: fleet_pb2.FleetServiceWatchRolloutRequest, context: _Context
    ) -> AsyncIterator[fleet_pb2.FleetServiceWatchRolloutResponse]:
        self._operator(context)
        stream = self._rollouts.watch(request.name, _int64(request.rollout_id, "rollout_id"))
        async with contextlib.aclosing(stream):
            async for view in stream:
                yield fleet_pb2.FleetServiceWatchRolloutResponse(
                    rollout=rollout_message(view, with_nodes=True)
                )

    async def _act(
        self, name: str, action: Action, why: str, context: _Context
    ) -> desired_pb2.Rollout:
        actor = self._operator(context)
        if not name:
            raise InvalidArgument("is required", field="name")
        view = await self._rollouts.act(name, action, actor=actor, why=why)
        return rollout_message(view, with_nodes=True)

    async def PauseRollout(
        self, request: fleet_pb2.FleetServicePauseRolloutRequest, context: _Context
    ) -> fleet_pb2.FleetServicePauseRolloutResponse:
        return fleet_pb2.FleetServicePauseRolloutResponse(
            rollout=await self._act(request.name, "pause", request.message, context)
        )

    async def ResumeRollout(
        self, request: fleet_pb2.FleetServiceResumeRolloutRequest, context: _Context
    ) -> fleet_pb2.FleetServiceResumeRolloutResponse:
        return fleet_pb2.FleetServiceResumeRolloutResponse(
            rollout=await self._act(request.name, "resume", request.message, context)
        )

    async def PromoteRollout(
        self, request: fleet_pb2.FleetServicePromoteRolloutRequest, context: _Context
    ) -> fleet_pb2.FleetServicePromoteRolloutResponse:
        return fleet_pb2.FleetServicePromoteRolloutResponse(
            rollout=await self._act(request.name, "promote", request.message, context)
        )

    async def AbortRollout(
        self, request: fleet_pb2.FleetServiceAbortRolloutRequest, context: _Context
    ) -> fleet_pb2.FleetServiceAbortRolloutResponse:
        return fleet_pb2.FleetServiceAbortRolloutResponse(
            rollout=await self._act(request.name, "abort", request.message, context)
        )
