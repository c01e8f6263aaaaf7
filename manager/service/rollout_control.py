"""Operators and rollouts: pause, resume, promote, abort; reads and a watch.

Each action is one transaction on the rollout's row (FOR UPDATE, so it
serialises with the convergence leader's steps), applies the pure operator
function of `manager.service.rollout`, records the audit entry and the event,
and pokes convergence so the next batch (or the revert) starts at once. Any
replica may take an action; only the leader steps rollouts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncGenerator, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Literal

from fleet.errors import FailedPrecondition, InvalidArgument, NotFound
from fleet.labels import LabelError, validate_label_value
from manager.service import rollout as ro
from manager.service.rollout_store import note_kind, observations, persist_step, progress_of
from manager.storage import NodeRepository
from manager.storage.desired import AgentBrief, DesiredStateRepository, DesiredTx
from manager.storage.records import RolloutNodeRecord, RolloutRecord

__all__ = ["Action", "RolloutControl", "RolloutView", "ViewNode"]

Action = Literal["pause", "resume", "promote", "abort"]


@dataclass(frozen=True)
class ViewNode:
    """One node of a rollout, with what its daemon last reported."""

    record: RolloutNodeRecord
    """The rollout's record of the node."""
    online: bool
    """The node is online."""
    agent: AgentBrief | None
    """The definition's agent on it, as last synced (what the view shows of it)."""


@dataclass(frozen=True)
class RolloutView:
    """A rollout as operators read it."""

    record: RolloutRecord
    """The stored row."""
    rollout: ro.Rollout
    """The decision record."""
    nodes: tuple[ViewNode, ...] = ()
    """Per node (GetRollout / WatchRollout)."""
    node_counts: Mapping[str, int] | None = None
    """Nodes per phase and offline, when `nodes` is left out (lists)."""

    def counts(self) -> dict[str, int]:
        """Nodes per phase, and how many are offline."""
        out = {phase.value: 0 for phase in ro.NodePhase}
        out["offline"] = 0
        if self.node_counts is not None:
            out.update(self.node_counts)
            return out
        for n in self.nodes:
            out[n.record.phase] += 1
            out["offline"] += not n.online
        return out


def _check_name(name: str) -> None:
    if not name:
        raise InvalidArgument("is required", field="name")
    try:
        validate_label_value(name)
    except LabelError as exc:
        raise InvalidArgument(exc.message.split(": ", 1)[-1], field="name") from None


async def _no_rollout(tx: DesiredTx, name: str) -> NotFound:
    """What to say when `name` has no rollout: mostly, a mistyped name."""
    if name not in await tx.definitions([name]):
        return NotFound(f"definition {name!r} does not exist")
    return NotFound(f"definition {name!r} has no rollout")


class RolloutControl:
    """Operator actions on rollouts and their reads (see the module docstring)."""

    def __init__(
        self,
        repo: DesiredStateRepository,
        nodes: NodeRepository,
        *,
        clock: Callable[[], float],
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._repo = repo
        self._nodes = nodes
        self._clock = clock
        self._on_change = on_change

    async def act(self, name: str, action: Action, *, actor: str, why: str = "") -> RolloutView:
        """Pause, resume, promote or abort the definition's live rollout (`why`: the cause)."""
        _check_name(name)
        if len(why) > 1000 or "\x00" in why:
            raise InvalidArgument("at most 1000 characters, without NUL", field="message")
        now = self._clock()
        now_ms = int(now * 1000)
        nodes = {n.node_id: n for n in await self._nodes.list()}

        async def body(tx: DesiredTx) -> RolloutView:
            live = await tx.rollouts(name=name, live=True, limit=1, for_update=True)
            if not live:
                latest = await tx.rollouts(name=name, limit=1)
                if not latest:
                    raise await _no_rollout(tx, name)
                raise FailedPrecondition(
                    f"{name}: its latest rollout (of revision {latest[0].target}) already"
                    f" ended: {latest[0].state}"
                )
            record = live[0]
            before = ro.from_dict(json.loads(record.record))
            try:
                if action == "abort":
                    progress = {
                        n: progress_of(r) for n, r in (await tx.rollout_nodes(record.id)).items()
                    }
                    observed = await observations(tx, name, list(progress), nodes)
                    step = ro.abort(before, progress, observed, now, actor, why)
                    await persist_step(tx, record, step, now_ms)
                else:
                    do = {"pause": ro.pause, "resume": ro.resume, "promote": ro.promote}[action]
                    after, note = do(before, now, actor, why)
                    await tx.update_rollout(
                        dataclasses.replace(
                            record,
                            state=after.state.value,
                            record=json.dumps(ro.to_dict(after)),
                            updated_ms=now_ms,
                        )
                    )
                    tx.event(
                        note_kind(note.kind),
                        now_ms=now_ms,
                        actor=actor,
                        message=note.message,
                        attributes={"name": name, "rollout_id": str(record.id)},
                    )
            except ValueError as exc:  # the pure functions refuse the wrong state
                raise FailedPrecondition(str(exc)) from None
            tx.audit(
                actor=actor,
                action=f"rollout.{action}",
                target=name,
                detail={
                    "rollout_id": str(record.id),
                    "revision": str(before.target),
                    **({"message": why} if why else {}),
                },
                outcome="ok",
                now_ms=now_ms,
            )
            online = {n for n, node in nodes.items() if node.status == "online"}
            return await self._view(tx, record.id, online)

        view = await self._repo.run(body)
        self._on_change()
        return view

    async def get(self, name: str, rollout_id: int = 0) -> RolloutView:
        """One rollout with its nodes (the definition's latest by default)."""
        _check_name(name)

        async def body(tx: DesiredTx) -> RolloutView:
            # Statuses only: WatchRollout polls this every 0.5 s while a rollout runs, and
            # decoding every node row was a fifth of a 500-node rollout's manager CPU.
            online = await tx.online_ids()
            target = rollout_id
            if not target:
                latest = await tx.rollouts(name=name, limit=1)
                if not latest:
                    raise await _no_rollout(tx, name)
                target = latest[0].id
            view = await self._view(tx, target, online)
            if view.record.name != name:
                raise NotFound(f"rollout {rollout_id} is not a rollout of {name!r}")
            return view

        # One read hop on SQLite (plain sqlite3 rows, no SQLAlchemy): a watch's first read
        # comes as its rollout starts, and 500 nodes through SQLAlchemy on the event loop
        # held the driver's first batch back.
        return await self._repo.run_in_one_hop(body, write=False)

    async def list(
        self, name: str = "", *, live: bool = False, limit: int = 100
    ) -> list[RolloutView]:
        """Rollouts newest first, without their nodes."""
        if name:
            _check_name(name)
        if not 0 <= limit <= 1000:
            raise InvalidArgument(f"must be 0..1000, got {limit}", field="limit")

        online = await self._nodes.online_ids()

        async def body(tx: DesiredTx) -> list[RolloutView]:
            records = await tx.rollouts(name=name, live=live, limit=limit or 100)
            counts = await tx.rollout_node_counts([r.id for r in records], online)
            return [
                RolloutView(r, ro.from_dict(json.loads(r.record)), node_counts=counts.get(r.id, {}))
                for r in records
            ]

        return await self._repo.run(body, write=False)

    async def watch(
        self, name: str, rollout_id: int = 0, *, interval: float = 0.5
    ) -> AsyncGenerator[RolloutView, None]:
        """The rollout now, then again whenever it changes, until it ends."""
        view = await self.get(name, rollout_id)
        yield view
        last = view
        while not last.record.ended_ms:
            await asyncio.sleep(interval)
            view = await self.get(name, view.record.id)
            if view != last:
                yield view
                last = view

    async def _view(self, tx: DesiredTx, rollout_id: int, online: Collection[str]) -> RolloutView:
        record = await tx.rollout(rollout_id)
        if record is None:
            raise NotFound(f"rollout {rollout_id} does not exist")
        records = await tx.rollout_nodes(rollout_id)
        # Only the columns shown: the watch reads this for every node twice a second, and
        # a whole agent state row per node was most of it. It also yields only when
        # something shown changed (not on every report's heartbeat time).
        agents = await tx.agent_briefs(records, record.name)
        return RolloutView(
            record,
            ro.from_dict(json.loads(record.record)),
            tuple(ViewNode(r, n in online, agents.get(n)) for n, r in sorted(records.items())),
        )
