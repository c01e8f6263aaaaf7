"""What daemons report about their managed set: the version they run, and what they refused.

RegisterNode and every SyncAgentStates carry the version of the pushed set
the daemon runs; SyncAgentStates also carries the complete set of pushed
agents it does not run as pushed (`update_errors`), as does the daemon's
answer to a PushUpdate (stored by convergence). Both are stored on the
node's `node_desired` row; a changed error set is a NODE_UPDATE_ERROR event.
Convergence is poked so a delivered set, a new refusal or a returning node
is acted on at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from manager.storage.desired import DesiredStateRepository, DesiredTx
from manager.storage.events import event_row
from manager.storage.records import NodeDesiredRecord, UpdateErrorRecord

__all__ = ["DaemonReports", "reported_row", "update_errors_event", "update_errors_event_row"]


class DaemonReports:
    """Stores daemons' spec versions and update errors."""

    def __init__(
        self,
        repo: DesiredStateRepository,
        *,
        clock: Callable[[], float],
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._repo = repo
        self._clock = clock
        self._on_change = on_change

    async def report(
        self,
        node_id: str,
        *,
        spec_version: int,
        update_errors: Sequence[UpdateErrorRecord] | None,
        registered: bool = False,
    ) -> None:
        """Record what `node_id` says it runs; `update_errors` None keeps the stored ones.

        `registered`: the daemon (re)started or came back: a push that failed
        while it was away is retried at once instead of after its backoff.
        """
        now_ms = int(self._clock() * 1000)

        async def body(tx: DesiredTx) -> bool:
            return await self.apply(
                tx,
                node_id,
                spec_version=spec_version,
                update_errors=update_errors,
                registered=registered,
                now_ms=now_ms,
            )

        async def peek(tx: DesiredTx) -> bool:
            row = (await tx.node_desired([node_id])).get(node_id)
            return reported_row(row, node_id, spec_version, update_errors, registered, now_ms)[1]

        # Almost always nothing changed (a daemon reconnecting with the set it had):
        # a read then, not a write transaction per hello queued on SQLite's one
        # writer, which made a whole fleet's reconnect wait on each other.
        if not await self._repo.run(peek, write=False):
            return
        if await self._repo.run(body):
            self._on_change()

    @staticmethod
    async def apply(
        tx: DesiredTx,
        node_id: str,
        *,
        spec_version: int,
        update_errors: Sequence[UpdateErrorRecord] | None,
        registered: bool = False,
        now_ms: int,
    ) -> bool:
        """`report` inside the caller's transaction; True if anything changed
        (the caller pokes convergence)."""
        changed = await DaemonReports.apply_many(
            tx, [(node_id, spec_version, update_errors)], registered=registered, now_ms=now_ms
        )
        return bool(changed)

    @staticmethod
    async def apply_many(
        tx: DesiredTx,
        reports: Sequence[tuple[str, int, Sequence[UpdateErrorRecord] | None]],
        *,
        registered: bool = False,
        now_ms: int,
        rows: Mapping[str, NodeDesiredRecord] | None = None,
    ) -> set[str]:
        """`apply` for several nodes' (node, spec version, update errors), each node at
        most once, in one read and one write; the nodes whose row changed. `rows`: their
        node_desired rows read earlier in this transaction (then not read again)."""
        if rows is None:
            rows = await tx.node_desired([node_id for node_id, _, _ in reports])
        after_rows, events = DaemonReports.judge(
            rows, reports, registered=registered, now_ms=now_ms
        )
        tx.queued_events.extend(events)
        await tx.put_node_desired(after_rows)
        return {row.node_id for row in after_rows}

    @staticmethod
    def judge(
        rows: Mapping[str, NodeDesiredRecord],
        reports: Sequence[tuple[str, int, Sequence[UpdateErrorRecord] | None]],
        *,
        registered: bool = False,
        now_ms: int,
    ) -> tuple[list[NodeDesiredRecord], list[dict[str, Any]]]:
        """`apply_many`'s decision (pure): the node_desired rows to write (those that
        changed) and the NODE_UPDATE_ERROR events, from the rows as they are."""
        after_rows: list[NodeDesiredRecord] = []
        events: list[dict[str, Any]] = []
        for node_id, spec_version, update_errors in reports:
            row = rows.get(node_id)
            after, changed = reported_row(
                row, node_id, spec_version, update_errors, registered, now_ms
            )
            if not changed:
                continue
            after_rows.append(after)
            before = row if row is not None else NodeDesiredRecord(node_id)
            if after.update_errors != before.update_errors:
                events.append(update_errors_event_row(node_id, after.update_errors, now_ms))
        return after_rows, events


def reported_row(
    row: NodeDesiredRecord | None,
    node_id: str,
    spec_version: int,
    update_errors: Sequence[UpdateErrorRecord] | None,
    registered: bool,
    now_ms: int,
) -> tuple[NodeDesiredRecord, bool]:
    """The node's `node_desired` row after its report, and whether it changed (pure).

    `registered`: a push that failed while it was away is retried at once.
    """
    if row is None:
        row = NodeDesiredRecord(node_id)
        if not spec_version and not update_errors:
            return row, False  # never managed: nothing to remember
    errors = row.update_errors if update_errors is None else tuple(update_errors)
    retry = registered and (row.next_push_ms > now_ms or row.push_attempts > 0)
    if row.reported_version == spec_version and errors == row.update_errors and not retry:
        return row, False
    after = dataclasses.replace(
        row, reported_version=spec_version, update_errors=errors, updated_ms=now_ms
    )
    if retry:
        after = dataclasses.replace(after, next_push_ms=0, push_attempts=0)
    return after, True


def update_errors_event(
    tx: DesiredTx, node_id: str, errors: Sequence[UpdateErrorRecord], now_ms: int
) -> None:
    """The NODE_UPDATE_ERROR event of a node whose error set changed to `errors`
    (reported by a sync, or in the answer to a push)."""
    tx.queued_events.append(update_errors_event_row(node_id, errors, now_ms))


def update_errors_event_row(
    node_id: str, errors: Sequence[UpdateErrorRecord], now_ms: int
) -> dict[str, Any]:
    """`update_errors_event`'s events row (pure)."""
    text = "; ".join(f"{e.agent_id}: {e.reason}" for e in errors)
    return event_row(
        "NODE_UPDATE_ERROR",
        now_ms=now_ms,
        node_id=node_id,
        actor=f"node/{node_id}",
        message=f"{node_id} cannot run what it was pushed: {text}"
        if errors
        else f"{node_id} runs everything it was pushed again",
        attributes={"errors": str(len(errors))},
    )
