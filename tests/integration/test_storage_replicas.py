"""The stream directory's storage: replica rows and epoch-guarded stream records."""

from __future__ import annotations

import pytest

from fleet.errors import FailedPrecondition
from manager.storage.db import Database
from manager.storage.replicas import ReplicaRepository, StreamRecord

NOW = 1_800_000_000_000


async def test_a_stream_record_names_its_replica_and_where_it_is(database: Database) -> None:
    """stream_of joins the record with its replica's address and last-seen."""
    repo = ReplicaRepository(database)
    await repo.register("mb", "10.0.0.12:7443", now_ms=NOW, live_after_ms=NOW - 10_000)
    epochs = await repo.record_streams("mb", ["n1", "n2"], {}, now_ms=NOW)
    assert epochs == {"n1": 1, "n2": 1}
    assert await repo.stream_of("n1") == StreamRecord("n1", "mb", 1, "10.0.0.12:7443", NOW)
    assert await repo.stream_of("n9") is None
    assert await repo.touch("mb", now_ms=NOW + 2_000)
    record = await repo.stream_of("n2")
    assert record is not None
    assert record.replica_last_seen_ms == NOW + 2_000


async def test_a_replica_that_lost_the_stream_cannot_clear_the_newer_record(
    database: Database,
) -> None:
    """n1 moves from mb (epoch 1) to ma (epoch 2): mb's late delete of epoch 1 changes nothing."""
    repo = ReplicaRepository(database)
    assert await repo.record_streams("mb", ["n1"], {}, now_ms=NOW) == {"n1": 1}
    assert await repo.record_streams("ma", ["n1"], {}, now_ms=NOW + 1) == {"n1": 2}
    await repo.record_streams("mb", [], {"n1": 1}, now_ms=NOW + 2)
    record = await repo.stream_of("n1")
    assert record is not None
    assert (record.replica_id, record.epoch) == ("ma", 2)
    # The holder's own delete (its epoch) does clear it.
    await repo.record_streams("ma", [], {"n1": 2}, now_ms=NOW + 3)
    assert await repo.stream_of("n1") is None


async def test_opens_and_closes_of_one_batch_are_one_transaction(database: Database) -> None:
    """Many opened and closed nodes in one call; a record without a replica row has no address."""
    repo = ReplicaRepository(database)
    ids = [f"n{i:04d}" for i in range(1200)]  # more than one multi-row INSERT
    epochs = await repo.record_streams("ma", ids, {}, now_ms=NOW)
    assert len(epochs) == 1200
    assert set(epochs.values()) == {1}
    closed = dict.fromkeys(ids[:700], 1)
    again = await repo.record_streams("ma", ["n0000"], closed, now_ms=NOW + 1)
    assert again == {"n0000": 2}
    left = await repo.streams_of("ma")
    assert set(left) == {"n0000", *ids[700:]}
    record = await repo.stream_of("n0000")
    assert record is not None
    assert (record.replica_address, record.replica_last_seen_ms) == ("", 0)


async def test_claim_missing_takes_only_nodes_nobody_recorded(database: Database) -> None:
    """The repair inserts where no record exists and leaves another replica's alone."""
    repo = ReplicaRepository(database)
    await repo.record_streams("mb", ["n1"], {}, now_ms=NOW)
    claimed = await repo.claim_missing("ma", ["n1", "n2"], now_ms=NOW)
    assert claimed == {"n2": 1}
    assert await repo.streams_of("ma") == {"n2": 1}
    assert await repo.streams_of("mb") == {"n1": 1}


async def test_register_refuses_a_live_namesake_and_clears_what_a_crash_left(
    database: Database,
) -> None:
    """Same name at another address while it is live: refused; stale or same address: taken over."""
    repo = ReplicaRepository(database)
    await repo.register("ma", "10.0.0.11:7443", now_ms=NOW, live_after_ms=NOW - 10_000)
    await repo.record_streams("ma", ["n1"], {}, now_ms=NOW)
    with pytest.raises(FailedPrecondition, match=r"'ma' is running at 10\.0\.0\.11:7443"):
        await repo.register("ma", "10.0.0.99:7443", now_ms=NOW + 1_000, live_after_ms=NOW - 9_000)
    assert await repo.streams_of("ma") == {"n1": 1}  # the refused start changed nothing
    # The same replica restarting (kill -9, same address): its old records go.
    await repo.register("ma", "10.0.0.11:7443", now_ms=NOW + 2_000, live_after_ms=NOW - 8_000)
    assert await repo.streams_of("ma") == {}
    # Silent for longer than the stale window: another address may take the name.
    await repo.register("ma", "10.0.0.99:7443", now_ms=NOW + 60_000, live_after_ms=NOW + 50_000)
    (row,) = await repo.replicas()
    assert (row.replica_id, row.address) == ("ma", "10.0.0.99:7443")


async def test_leave_removes_the_replica_and_its_records(database: Database) -> None:
    """A replica that stops takes its row and its records with it; touch then says so."""
    repo = ReplicaRepository(database)
    await repo.register("ma", "10.0.0.11:7443", now_ms=NOW, live_after_ms=NOW)
    await repo.register("mb", "10.0.0.12:7443", now_ms=NOW, live_after_ms=NOW)
    await repo.record_streams("ma", ["n1"], {}, now_ms=NOW)
    await repo.record_streams("mb", ["n2"], {}, now_ms=NOW)
    await repo.leave("ma")
    assert [r.replica_id for r in await repo.replicas()] == ["mb"]
    assert await repo.stream_of("n1") is None
    assert await repo.stream_of("n2") is not None
    assert not await repo.touch("ma", now_ms=NOW + 1)
