"""The job updates' committer gathers StartJob answers into a batch, commits at once
what a caller waits for, and answers nobody before the commit (real SQLite and PG)."""

from __future__ import annotations

import asyncio

from manager.service.group_commit import GroupCommitPolicy
from manager.service.job_updates import Change, JobUpdates, Upload
from manager.service.jobs import TargetState
from manager.storage import Database
from manager.storage.jobs import JobRecord, JobRepository, JobTargetRecord, JobTx

JOB = "20261207-070000-000-abc123"
NODES = [f"n{i}" for i in range(6)]


async def _job(repo: JobRepository) -> None:
    async def body(tx: JobTx) -> None:
        await tx.add_job(
            JobRecord(id=JOB, name="t", spec="{}", actor="operator/t", created_ms=1),
            [JobTargetRecord(JOB, n, idx=i, state="PENDING") for i, n in enumerate(NODES)],
        )

    await repo.run(body)


async def _states(repo: JobRepository) -> dict[str, str]:
    async def body(tx: JobTx) -> dict[str, str]:
        return {n: t.state for n, t in (await tx.targets(JOB)).items()}

    return await repo.run(body, write=False)


def _end(node_id: str, finish: str | None = None) -> Change:
    return Change(
        JOB, node_id, "ended", state=TargetState.SUCCESS, output=b"ok", bound=64, finish=finish
    )


async def test_answers_wait_for_a_batch_and_are_answered_only_once_stored(
    database: Database,
) -> None:
    """StartJob answers submitted a few milliseconds apart, within the wait, are one
    commit; until the wait is over none is answered and none is stored (committing at
    once would make three commits and answer the first before the others came)."""
    repo = JobRepository(database)
    await _job(repo)
    updates = JobUpdates(repo, clock=lambda: 1000.0, policy=GroupCommitPolicy(wait=0.5))
    updates.start()
    try:
        waiting = []
        for n in NODES[:3]:
            waiting.append(asyncio.ensure_future(updates.submit(_end(n))))
            await asyncio.sleep(0.02)
        assert not any(w.done() for w in waiting)
        assert set((await _states(repo)).values()) == {"PENDING"}
        outcomes = await asyncio.gather(*waiting)
        # Acknowledged means stored: every answered change is in the database.
        assert all(o.applied for o in outcomes)
        states = await _states(repo)
        assert [states[n] for n in NODES[:3]] == ["SUCCESS"] * 3
    finally:
        await updates.stop()
    assert updates.commits == 1


async def test_an_answer_holding_its_window_slot_waits_the_shorter_bound(
    database: Database,
) -> None:
    """Ended answers (their window slots freed when they came) wait the long bound; an
    answer without the end, which holds its slot until its commit, is committed once it
    waited the short one, and takes the ended answers queued before it along (one bound
    for every answer made it wait the long one: nothing within 0.5 s here)."""
    repo = JobRepository(database)
    await _job(repo)
    policy = GroupCommitPolicy(wait=60.0, holding_wait=0.05)
    updates = JobUpdates(repo, clock=lambda: 1000.0, policy=policy)
    updates.start()
    try:
        ended = asyncio.ensure_future(updates.submit(_end("n0")))
        await asyncio.sleep(0.1)
        assert not ended.done()  # the long bound
        accepted = Change(JOB, "n1", "accepted", state=TargetState.QUEUED)
        async with asyncio.timeout(0.5):
            assert (await updates.submit(accepted)).applied
            assert (await ended).applied  # went with it
        assert updates.commits == 1
    finally:
        await updates.stop()
    states = await _states(repo)
    assert [states[n] for n in NODES[:2]] == ["SUCCESS", "QUEUED"]


async def test_a_full_batch_is_committed_without_waiting(database: Database) -> None:
    """As many answers as the batch holds are committed at once, the wait not over."""
    repo = JobRepository(database)
    await _job(repo)
    policy = GroupCommitPolicy(batch=3, wait=60.0)
    updates = JobUpdates(repo, clock=lambda: 1000.0, policy=policy)
    updates.start()
    try:
        async with asyncio.timeout(10):
            outcomes = await asyncio.gather(*(updates.submit(_end(n)) for n in NODES[:3]))
    finally:
        await updates.stop()
    assert all(o.applied for o in outcomes)
    assert updates.commits == 1


async def test_what_a_caller_waits_for_is_committed_at_once(database: Database) -> None:
    """A daemon's report, an output chunk, a planner's decision and the answer that ends
    a job do not wait the gathering time, and take the answers queued before them along
    into their commit."""
    repo = JobRepository(database)
    await _job(repo)
    updates = JobUpdates(repo, clock=lambda: 1000.0, policy=GroupCommitPolicy(wait=60.0))
    updates.start()
    try:
        async with asyncio.timeout(10):
            gathered = asyncio.ensure_future(updates.submit(_end("n0")))
            await asyncio.sleep(0.02)
            assert not gathered.done()
            report = await updates.submit(Change(JOB, "n1", "report", state=TargetState.RUNNING))
            assert report.applied
            assert (await gathered).applied  # went with the report's commit
            assert (await updates.submit_output(Upload(JOB, "n2", 0, b"x", bound=64))).acked == 1
            decided = Change(JOB, "n3", "decision", state=TargetState.SKIPPED, reason="r")
            assert (await updates.submit(decided)).applied
            assert (await updates.submit(_end("n4", finish="all done"))).applied
    finally:
        await updates.stop()
    assert updates.commits == 4
    states = await _states(repo)
    assert [states[n] for n in NODES[:5]] == ["SUCCESS", "RUNNING", "PENDING", "SKIPPED", "SUCCESS"]


async def test_stopping_commits_a_gathering_batch_at_once(database: Database) -> None:
    """Stopping the manager does not wait out the gathering time: what is queued is
    committed and answered."""
    repo = JobRepository(database)
    await _job(repo)
    updates = JobUpdates(repo, clock=lambda: 1000.0, policy=GroupCommitPolicy(wait=60.0))
    updates.start()
    gathered = asyncio.ensure_future(updates.submit(_end("n5")))
    await asyncio.sleep(0.02)
    async with asyncio.timeout(10):
        await updates.stop()
        assert (await gathered).applied
    assert (await _states(repo))["n5"] == "SUCCESS"
