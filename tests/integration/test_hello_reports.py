"""DaemonReports (the spec version a hello reports) against real SQLite and PostgreSQL
databases: hellos that come together share the read that decides whether anything
changed, and each is still judged on its own node's row."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from manager.service.reports import DaemonReports
from manager.storage import Database, NodeRecord, NodeRepository
from manager.storage.desired import DesiredStateRepository, DesiredTx
from manager.storage.records import NodeDesiredRecord

T = TypeVar("T")

_NOW = 1_700_000_000.0


class _ReadsCounted(DesiredStateRepository):
    """The real repository; counts its read transactions."""

    reads = 0

    async def run(self, body: Callable[[DesiredTx], Awaitable[T]], *, write: bool = True) -> T:
        if not write:
            self.reads += 1
        return await super().run(body, write=write)


async def test_hellos_at_once_share_their_read_and_each_is_judged_on_its_row(
    database: Database,
) -> None:
    """20 nodes say hello at once after a restart: fewer reads than hellos; the one whose
    push failed while it was away has it retried at once (one poke), the others write
    nothing."""
    ids = [f"n{i:02d}" for i in range(20)]
    nodes = NodeRepository(database)
    for nid in ids:
        await nodes.upsert(
            NodeRecord(nid, nid, "10.0.0.1", "linux", "x86_64", {}, "1", "1", ""), now_ms=1
        )
    repo = _ReadsCounted(database)
    failed = NodeDesiredRecord("n00", 4, "c4", 3, 3, "unreachable", 2, int(_NOW * 1000) + 60_000)
    in_sync = [NodeDesiredRecord(nid, 3, "c3", 3, 3, updated_ms=5) for nid in ids[1:]]

    async def put(tx: DesiredTx) -> None:
        await tx.put_node_desired([failed, *in_sync])

    await repo.run(put)
    pokes: list[int] = []
    reports = DaemonReports(repo, clock=lambda: _NOW, on_change=lambda: pokes.append(1))
    repo.reads = 0

    await asyncio.gather(
        *(reports.report(nid, spec_version=3, update_errors=None, registered=True) for nid in ids)
    )

    assert repo.reads < len(ids)  # one read each before
    assert pokes == [1]

    async def read(tx: DesiredTx) -> dict[str, NodeDesiredRecord]:
        return await tx.node_desired(ids)

    rows = await repo.run(read, write=False)
    assert (rows["n00"].push_attempts, rows["n00"].next_push_ms) == (0, 0)
    assert [rows[nid] for nid in ids[1:]] == in_sync
