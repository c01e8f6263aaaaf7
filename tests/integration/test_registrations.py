"""Group commit of registrations (RegistrationBatches) on real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest
from manager_harness import node_record
from sqlalchemy import event

from fleet.errors import InvalidArgument
from manager.service.registry import RegistrationBatches
from manager.storage import Database, NodeRepository
from manager.storage.nodes import Upserted


def _count_commits(database: Database) -> list[int]:
    commits: list[int] = []
    event.listen(database.engine.sync_engine, "commit", lambda _conn: commits.append(1))
    return commits


async def test_registrations_arriving_together_share_one_transaction(database: Database) -> None:
    """50 nodes queued at once are one commit; a repeat of one waits for the next batch."""
    nodes = NodeRepository(database)
    batches = RegistrationBatches(nodes)
    commits = _count_commits(database)
    created = await asyncio.gather(
        *(batches.submit(node_record(f"n{i}"), 1_000 + i) for i in range(50)),
        batches.submit(node_record("n0", hostname="again"), 2_000),
    )
    assert [u.created for u in created] == [True] * 50 + [False]
    assert len(commits) == 2
    assert await nodes.count() == 50
    again = await nodes.get("n0")
    assert again is not None
    assert (again.hostname, again.last_seen_ms, again.registered_at_ms) == ("again", 2_000, 1_000)


async def test_a_batch_the_database_refuses_fails_only_the_bad_registration(
    database: Database,
) -> None:
    """A row the database rejects (NOT NULL) fails alone; its batch mates are stored."""
    nodes = NodeRepository(database)
    batches = RegistrationBatches(nodes)
    outcomes = await asyncio.gather(
        batches.submit(node_record("good-1"), 1_000),
        batches.submit(node_record("bad", hostname=None), 1_000),
        batches.submit(node_record("good-2"), 1_000),
        return_exceptions=True,
    )
    assert outcomes[0] == Upserted(created=True, changed=True)
    assert outcomes[2] == Upserted(created=True, changed=True)
    assert isinstance(outcomes[1], InvalidArgument)
    assert sorted(await nodes.known_ids()) == ["good-1", "good-2"]


@pytest.mark.parametrize("size", [1, 7])
async def test_max_batch_bounds_each_transaction(database: Database, size: int) -> None:
    """With max_batch = size, 20 queued registrations take ceil(20 / size) commits."""
    batches = RegistrationBatches(NodeRepository(database), max_batch=size)
    commits = _count_commits(database)
    await asyncio.gather(*(batches.submit(node_record(f"n{i}"), 1_000) for i in range(20)))
    assert len(commits) == -(-20 // size)


async def test_a_registration_whose_caller_left_while_queued_is_not_written(
    database: Database,
) -> None:
    """A daemon that gave up (stream broken, deadline passed) before its registration was
    taken from the queue was never answered: it is dropped, not written, so a
    reconnect storm does not keep writing registrations nobody waits for."""
    nodes = NodeRepository(database)
    batches = RegistrationBatches(nodes, max_batch=1)  # one at a time: c waits behind a, b
    a, b, c = (asyncio.create_task(batches.submit(node_record(n), 1_000)) for n in ("a", "b", "c"))
    await asyncio.sleep(0)  # all three queued; a's transaction starts next
    c.cancel()
    assert [u.created for u in await asyncio.gather(a, b)] == [True, True]
    with pytest.raises(asyncio.CancelledError):
        await c
    await asyncio.sleep(0.2)  # anything still queued would be written by now
    assert sorted(await nodes.known_ids()) == ["a", "b"]
