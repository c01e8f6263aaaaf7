"""The jobs planner, state derivation, output acceptance and target merges, on a manual clock."""

from __future__ import annotations

import collections
import dataclasses
import random

import pytest

from fleet.errors import InvalidArgument
from manager.service.job_reports import MAX_OUTPUT_CHUNK, report_change
from manager.service.job_updates import Change, merge
from manager.service.jobs import (
    LOST_GRACE,
    TERMINAL,
    JobLimits,
    JobState,
    JobTargets,
    NodeFacts,
    Target,
    TargetState,
    accept_output,
    foreseen,
    format_time,
    job_state,
    plan,
    replans,
    resolve_concurrency,
    retry_delay,
    stages,
)
from manager.storage.jobs import JobTargetRecord

T = TargetState
NOW = 1_000_000.0


def targets(*specs: tuple[str, TargetState], canary: int = 0) -> dict[str, Target]:
    return {
        n: Target(n, s, stage=0 if i < canary else 1, updated=NOW) for i, (n, s) in enumerate(specs)
    }


def online(*names: str, **facts: object) -> dict[str, NodeFacts]:
    return {n: NodeFacts(online=True, last_seen=NOW, **facts) for n in names}  # type: ignore[arg-type]


LIMITS = JobLimits(created=NOW, concurrency=2)


def test_concurrency_resolves_numbers_percentages_and_empty_as_all() -> None:
    """ "10", "25%" of the targets (rounded up), empty: every target; 0 is refused."""
    assert resolve_concurrency("10", 500) == 10
    assert resolve_concurrency("25%", 10) == 3
    assert resolve_concurrency("", 7) == 7
    with pytest.raises(ValueError, match="max_concurrency"):
        resolve_concurrency("0", 5)
    with pytest.raises(ValueError, match="max_concurrency"):
        resolve_concurrency("ten", 5)


def test_the_window_counts_queued_running_and_in_flight_targets() -> None:
    """Only as many targets are sent as the window has room for."""
    ts = targets(("a", T.RUNNING), ("b", T.PENDING), ("c", T.PENDING), ("d", T.PENDING))
    p = plan(ts, online("a", "b", "c", "d"), LIMITS, NOW)
    assert p.dispatch == ["b"]
    p = plan(ts, online("a", "b", "c", "d"), LIMITS, NOW, in_flight={"b"})
    assert p.dispatch == []


def test_an_offline_node_waits_then_is_undeliverable_at_the_delivery_timeout() -> None:
    """Not dialled while offline; UNDELIVERABLE (not counting as an error) after the timeout."""
    ts = targets(("a", T.PENDING))
    facts = {"a": NodeFacts(online=False, last_seen=NOW - 50)}
    p = plan(ts, facts, LIMITS, NOW + 10)
    assert p.dispatch == []
    assert p.changes == {}
    assert p.wake_at == NOW + LIMITS.delivery_timeout
    p = plan(ts, facts, LIMITS, NOW + LIMITS.delivery_timeout)
    state, reason = p.changes["a"]
    assert state is T.UNDELIVERABLE
    assert "offline since" in reason
    assert "does not count against max_errors" in reason


def test_a_node_that_comes_back_in_time_gets_its_target() -> None:
    """Online again before the delivery timeout: sent."""
    ts = targets(("a", T.PENDING))
    assert plan(ts, online("a"), LIMITS, NOW + 100).dispatch == ["a"]


def test_unreachable_targets_back_off_and_become_undeliverable() -> None:
    """A failed StartJob waits for next_attempt; past the timeout it is UNDELIVERABLE."""
    refused = "a: daemon at 10.0.0.1:7444 refused the connection"
    ts = {"a": Target("a", T.PENDING, attempts=2, next_attempt=NOW + 5, last_error=refused)}
    p = plan(ts, online("a"), LIMITS, NOW)
    assert p.dispatch == []
    assert p.wake_at == NOW + 5
    assert plan(ts, online("a"), LIMITS, NOW + 6).dispatch == ["a"]
    p = plan(ts, online("a"), LIMITS, NOW + LIMITS.delivery_timeout)
    assert p.changes["a"][0] is T.UNDELIVERABLE
    assert p.changes["a"][1].startswith(
        f"node unreachable (2 attempt(s) failed, the last: {refused}); not delivered within"
    )


def test_max_errors_skips_every_pending_target_but_undeliverable_does_not_count() -> None:
    """FAILED + TIMEOUT reach max_errors; UNDELIVERABLE and CANCELLED do not."""
    limits = JobLimits(created=NOW, concurrency=1, max_errors=2)
    ts = targets(("a", T.FAILED), ("b", T.UNDELIVERABLE), ("c", T.CANCELLED), ("d", T.PENDING))
    assert plan(ts, online("d"), limits, NOW).dispatch == ["d"]
    ts = targets(("a", T.FAILED), ("b", T.TIMEOUT), ("c", T.PENDING), ("d", T.PENDING))
    p = plan(ts, online("c", "d"), limits, NOW)
    assert p.dispatch == []
    assert {n: s for n, (s, _) in p.changes.items()} == {"c": T.SKIPPED, "d": T.SKIPPED}
    assert p.changes["c"][1].startswith("max_errors=2 reached: 2 target(s)")
    assert "a FAILED" in p.reason


def test_the_canary_stage_runs_first_and_its_failure_skips_the_rest() -> None:
    """Stage 1 waits for stage 0; a stage-0 target not SUCCESS skips stage 1, naming it."""
    facts = online("a", "b", "c")
    limits = JobLimits(created=NOW, concurrency=3)
    ts = targets(("a", T.PENDING), ("b", T.PENDING), ("c", T.PENDING), canary=1)
    assert plan(ts, facts, limits, NOW).dispatch == ["a"]
    ts = targets(("a", T.RUNNING), ("b", T.PENDING), ("c", T.PENDING), canary=1)
    assert plan(ts, facts, limits, NOW).dispatch == []
    ts = targets(("a", T.SUCCESS), ("b", T.PENDING), ("c", T.PENDING), canary=1)
    assert plan(ts, facts, limits, NOW).dispatch == ["b", "c"]
    ts = targets(("a", T.TIMEOUT), ("b", T.PENDING), ("c", T.PENDING), canary=1)
    p = plan(ts, facts, limits, NOW)
    assert p.dispatch == []
    assert p.changes["b"] == (T.SKIPPED, "the canary stage failed: a TIMEOUT")
    assert stages(["a", "b", "c"], 2) == [("a", 0), ("b", 0), ("c", 1)]


def random_job(
    rng: random.Random,
) -> tuple[dict[str, Target], dict[str, NodeFacts], JobLimits, set[str]]:
    """A random job for property tests: its targets (any state, canary stages, retries,
    cancels, lost ones), its nodes' facts (offline, unknown, jobs disabled), its limits
    and the targets in flight."""
    ts = {
        f"n{i}": Target(
            f"n{i}",
            rng.choice(list(TargetState)),
            stage=0 if i < rng.randint(0, 3) else 1,
            attempts=rng.choice((0, 0, 2)),
            next_attempt=NOW + rng.choice((-5.0, 5.0)),
            updated=NOW - rng.choice((0, 10_000, rng.uniform(0, 5000))),
            cancel_requested=rng.random() < 0.1,
        )
        for i in range(rng.randint(1, 12))
    }
    facts = {
        name: NodeFacts(
            online=rng.random() < 0.8,
            last_seen=NOW - rng.choice((0, 1000, rng.uniform(0, 500))),
            jobs_disabled=rng.random() < 0.1,
        )
        for name in ts
        if rng.random() < 0.9
    }
    limits = JobLimits(
        created=NOW - rng.choice((0, 1000, rng.uniform(0, 400))),
        concurrency=rng.randint(1, 4),
        max_errors=rng.choice((0, 1, 2)),
        timeout=rng.choice((1.0, 3600.0)),
    )
    return ts, facts, limits, {name for name in ts if rng.random() < 0.2}


def test_the_plan_counts_the_targets_as_they_are_after_its_changes() -> None:
    """`Plan.counts` is the count of the targets' states with `changes` applied (the
    driver derives the job's state from it), on random jobs: canary stages, max_errors,
    offline, unknown and disabled nodes, cancels, lost targets, targets in flight."""
    rng = random.Random(14)
    for _ in range(3000):
        ts, facts, limits, in_flight = random_job(rng)
        p = plan(ts, facts, limits, NOW, in_flight=in_flight, cancelled=rng.random() < 0.1)
        after = {name: p.changes.get(name, (t.state, ""))[0] for name, t in ts.items()}
        assert p.counts == dict(collections.Counter(after.values()))


def test_jobs_disabled_fails_at_once_and_cancelled_targets_are_never_sent() -> None:
    """A host refusing jobs: FAILED with the reason; cancel_requested PENDING: CANCELLED."""
    ts = {
        "a": Target("a", T.PENDING),
        "b": Target("b", T.PENDING, cancel_requested=True),
    }
    facts = {**online("a", jobs_disabled=True), **online("b")}
    p = plan(ts, facts, LIMITS, NOW)
    assert p.changes["a"][0] is T.FAILED
    assert "enabled = false" in p.changes["a"][1]
    assert p.changes["b"][0] is T.CANCELLED
    assert p.dispatch == []


def test_a_cancelled_job_sends_nothing_more() -> None:
    """cancelled=True: no dispatch even with room."""
    ts = targets(("a", T.PENDING))
    assert plan(ts, online("a"), LIMITS, NOW, cancelled=True).dispatch == []


def test_lost_nodes_end_running_targets() -> None:
    """Offline past the delivery timeout, or RUNNING and silent past timeout + grace: FAILED."""
    limits = JobLimits(created=NOW, concurrency=1, timeout=60)
    ts = {"a": Target("a", T.RUNNING, updated=NOW)}
    gone = {"a": NodeFacts(online=False, last_seen=NOW)}
    assert plan(ts, gone, limits, NOW + 10).changes == {}
    state, reason = plan(ts, gone, limits, NOW + limits.delivery_timeout).changes["a"]
    assert state is T.FAILED
    assert reason.startswith("node lost")
    assert plan(ts, online("a"), limits, NOW + 60 + LOST_GRACE - 1).changes == {}
    state, reason = plan(ts, online("a"), limits, NOW + 60 + LOST_GRACE).changes["a"]
    assert state is T.FAILED
    assert reason.startswith("no result")
    queued = {"a": Target("a", T.QUEUED, updated=NOW)}
    assert plan(queued, online("a"), limits, NOW + 10**6).changes == {}
    asked = {"a": Target("a", T.RUNNING, updated=NOW, cancel_requested=True)}
    assert plan(asked, gone, limits, NOW + 10**6).changes["a"][0] is T.CANCELLED


def test_an_unregistered_node_is_undeliverable() -> None:
    """A node missing from the registry can never get its target."""
    p = plan(targets(("x", T.PENDING)), {}, LIMITS, NOW)
    assert p.changes["x"][0] is T.UNDELIVERABLE


@pytest.mark.parametrize(
    ("counts", "cancelled", "expected"),
    [
        ({T.PENDING: 3}, False, JobState.PENDING),
        ({T.PENDING: 2, T.QUEUED: 1}, False, JobState.RUNNING),
        ({T.SUCCESS: 2, T.RUNNING: 1}, False, JobState.RUNNING),
        ({T.SUCCESS: 3}, False, JobState.SUCCESS),
        ({T.SUCCESS: 2, T.FAILED: 1}, False, JobState.PARTIAL),
        ({T.SUCCESS: 1, T.UNDELIVERABLE: 1}, False, JobState.PARTIAL),
        ({T.FAILED: 1, T.SKIPPED: 2}, False, JobState.FAILED),
        ({T.UNDELIVERABLE: 2}, False, JobState.FAILED),
        ({T.SUCCESS: 1, T.CANCELLED: 2}, True, JobState.CANCELLED),
        ({T.RUNNING: 1, T.CANCELLED: 2}, True, JobState.RUNNING),
    ],
)
def test_job_state_is_derived_from_the_targets(
    counts: dict[TargetState, int], cancelled: bool, expected: JobState
) -> None:
    """PENDING, RUNNING, SUCCESS, PARTIAL, FAILED, CANCELLED."""
    assert job_state(counts, cancelled=cancelled) is expected


def test_output_is_stored_once_a_gap_is_refused_and_the_bound_cuts() -> None:
    """Bytes before the stored end are skipped; a gap raises; beyond the bound: truncated."""
    got = accept_output(stored=0, truncated=False, offset=0, size=10, bound=100)
    assert (got.skip, got.keep, got.stored, got.acked, got.truncated) == (0, 10, 10, 10, False)
    got = accept_output(stored=10, truncated=False, offset=5, size=10, bound=100)
    assert (got.skip, got.keep, got.stored, got.acked) == (5, 5, 15, 15)
    got = accept_output(stored=10, truncated=False, offset=0, size=4, bound=100)
    assert (got.keep, got.stored, got.acked) == (0, 10, 10)
    with pytest.raises(ValueError, match="gap"):
        accept_output(stored=10, truncated=False, offset=11, size=1, bound=100)
    got = accept_output(stored=90, truncated=False, offset=90, size=20, bound=100)
    assert (got.keep, got.stored, got.acked, got.truncated) == (10, 100, 110, True)
    got = accept_output(stored=100, truncated=True, offset=110, size=5, bound=100)
    assert (got.keep, got.stored, got.truncated) == (0, 100, True)


def record(state: str, **fields: object) -> JobTargetRecord:
    return JobTargetRecord("j", "n", state=state, **fields)  # type: ignore[arg-type]


def test_terminal_targets_are_final_and_duplicates_change_nothing() -> None:
    """A late report after SUCCESS is stale; a repeated report is not written again."""
    done = record("SUCCESS")
    assert merge(done, Change("j", "n", "report", state=T.FAILED), 5) is None
    running = record("RUNNING", updated_ms=1, dispatched_ms=1)
    assert merge(running, Change("j", "n", "report", state=T.RUNNING), 1) is None
    after = merge(running, Change("j", "n", "report", state=T.SUCCESS, exit_code=0), 9)
    assert after is not None
    assert after.state == "SUCCESS"
    assert after.ended_ms == 9


def test_start_job_answers_do_not_undo_reports_and_wait_for_details() -> None:
    """QUEUED after RUNNING is stale; a terminal answer other than FAILED waits as RUNNING."""
    assert merge(record("RUNNING"), Change("j", "n", "accepted", state=T.QUEUED), 1) is None
    after = merge(record("PENDING"), Change("j", "n", "accepted", state=T.SUCCESS), 1)
    assert after is not None
    assert after.state == "RUNNING"
    refused = merge(
        record("PENDING"), Change("j", "n", "accepted", state=T.FAILED, reason="no user"), 1
    )
    assert refused is not None
    assert (refused.state, refused.reason) == ("FAILED", "no user")
    miss = merge(record("PENDING"), Change("j", "n", "unreachable", reason="down"), 1)
    assert miss is not None
    assert (miss.state, miss.attempts, miss.last_error) == ("PENDING", 1, "down")


def test_an_end_on_the_answer_is_stored_as_a_report_once() -> None:
    """StartJob answered with the end: PENDING (or RUNNING) goes straight to the end with
    its details, the delivery counters reset; the same end answered again is stale."""
    pending = record("PENDING", attempts=2, last_error="down", updated_ms=1)
    end = Change(
        "j", "n", "ended", state=T.SUCCESS, exit_code=0, started_ms=5, ended_ms=7, output=b"hi\n"
    )
    after = merge(pending, end, 9)
    assert after is not None
    assert (after.state, after.started_ms, after.ended_ms, after.dispatched_ms) == (
        "SUCCESS",
        5,
        7,
        9,
    )
    assert (after.attempts, after.last_error) == (0, "")
    assert merge(after, end, 10) is None
    # A report of the same end that raced ahead of the answer leaves nothing to do.
    reported = merge(record("RUNNING"), dataclasses.replace(end, kind="report", output=None), 3)
    assert reported is not None
    assert merge(reported, end, 4) is None


def test_report_change_checks_an_answered_end() -> None:
    """An end must be final and its output at most a chunk; checked values are kept."""
    change = report_change("n", "20261206-053000-000-a1b2c3", state="SUCCESS", output=b"x")
    assert (change.kind, change.state, change.output) == ("ended", T.SUCCESS, b"x")
    assert report_change("n", "20261206-053000-000-a1b2c3", state="RUNNING").kind == "report"
    with pytest.raises(InvalidArgument, match="final state"):
        report_change("n", "20261206-053000-000-a1b2c3", state="RUNNING", output=b"")
    with pytest.raises(InvalidArgument, match="bytes"):
        report_change(
            "n", "20261206-053000-000-a1b2c3", state="FAILED", output=b"x" * (MAX_OUTPUT_CHUNK + 1)
        )


def test_a_final_target_replaced_in_the_same_state_plans_the_same() -> None:
    """`replans` is false only where `plan` decides the same: a final target whose stored
    row comes back in the same state with other fields changed (random jobs: canary,
    max_errors, offline nodes, in-flight targets, retries)."""
    rng = random.Random(14)
    states = list(TargetState)
    skipped = 0
    for _ in range(3000):
        ts, facts, limits, in_flight = random_job(rng)
        node = rng.choice(list(ts))
        was = ts[node]
        now = dataclasses.replace(
            was,
            state=rng.choice((was.state, rng.choice(states))),
            attempts=0,
            next_attempt=NOW + 50,
            updated=NOW + 1,
        )
        if replans(was, now):
            assert now.state is not was.state or now.state not in TERMINAL
            continue
        skipped += 1
        before = plan(ts, facts, limits, NOW, in_flight=in_flight)
        after = plan({**ts, node: now}, facts, limits, NOW, in_flight=in_flight)
        assert after == before
    assert skipped > 300
    assert replans(Target("a", T.PENDING), Target("a", T.SUCCESS))
    assert replans(Target("a", T.RUNNING), Target("a", T.RUNNING, updated=NOW))
    assert not replans(Target("a", T.SUCCESS), Target("a", T.SUCCESS, updated=NOW))


def _same_plan(
    book: JobTargets, facts: dict[str, NodeFacts], now: float, **kw: object
) -> list[str]:
    """`book.plan` against `plan` over all its targets: the same decisions, a wake no
    later; what it dispatches."""
    walked = plan(dict(book.targets), facts, book.limits, now, **kw)  # type: ignore[arg-type]
    got = book.plan(facts, now, **kw)  # type: ignore[arg-type]
    assert (got.changes, got.dispatch, got.reason, got.counts) == (
        walked.changes,
        walked.dispatch,
        walked.reason,
        walked.counts,
    )
    if walked.wake_at is not None and walked.wake_at != float("inf"):  # inf: never
        assert got.wake_at is not None
        assert got.wake_at <= walked.wake_at
    for node_id, (state, _) in got.changes.items():  # stored, then heard back
        book.put(dataclasses.replace(book.targets[node_id], state=state, updated=now))
    return got.dispatch


def test_job_targets_plan_as_a_walk_of_every_target_would() -> None:
    """`JobTargets.plan` decides what `plan` over every target decides, through a
    driver's life of random jobs (canary stages, max_errors, backoff): passes that send
    what they dispatch; StartJob answers (queued, running, ended, refused, unreachable,
    nothing stored); reports; cancels; nodes going, coming and refusing jobs; time
    passing; a job re-read."""
    rng = random.Random(14)
    states = list(TargetState)
    walks = passes = 0
    for _ in range(300):
        n = rng.randint(1, 30)
        canary = rng.choice((0, 0, 1, 3))
        book = JobTargets(
            {
                f"n{i}": Target(
                    f"n{i}",
                    T.PENDING if rng.random() < 0.9 else rng.choice(states),
                    stage=0 if i < canary else 1,
                    updated=NOW,
                )
                for i in range(n)
            },
            JobLimits(
                created=NOW,
                concurrency=rng.randint(1, 6),
                max_errors=rng.choice((0, 0, 1, 3)),
                delivery_timeout=rng.choice((30.0, 300.0)),
                timeout=rng.choice((5.0, 3600.0)),
            ),
        )
        facts = {f"n{i}": NodeFacts(online=rng.random() < 0.9, last_seen=NOW) for i in range(n)}
        now, cancelled, in_flight = NOW, False, set[str]()
        for _ in range(80):
            now += rng.choice((0.0, 0.0, 0.0, 0.5, 3.0, 20.0, 200.0))
            event = rng.random()
            busy = [t for t in book.targets.values() if t.state in (T.QUEUED, T.RUNNING)]
            if event < 0.4:
                passes += 1
                in_flight.update(
                    _same_plan(book, facts, now, in_flight=set(in_flight), cancelled=cancelled)
                )
            elif event < 0.7 and in_flight:
                node_id = rng.choice(sorted(in_flight))
                t = book.targets[node_id]
                answer = rng.choice(
                    ("queued", "running", "ended", "refused", "unreachable", "lost")
                )
                if t.state is T.PENDING and answer == "unreachable":
                    book.put(
                        dataclasses.replace(
                            t,
                            attempts=t.attempts + 1,
                            next_attempt=now + retry_delay(t.attempts + 1),
                            last_error="down",
                        )
                    )
                elif t.state is T.PENDING and answer != "lost":
                    state = {"queued": T.QUEUED, "running": T.RUNNING, "refused": T.FAILED}.get(
                        answer, rng.choice((T.SUCCESS, T.FAILED, T.TIMEOUT))
                    )
                    book.put(dataclasses.replace(t, state=state, attempts=0, updated=now))
                in_flight.discard(node_id)
                if book.targets[node_id].state is T.PENDING:
                    book.replan()  # as the driver does: sendable again
            elif event < 0.85 and busy:
                t = rng.choice(busy)
                state = rng.choice((T.RUNNING, T.SUCCESS, T.FAILED, T.TIMEOUT, T.CANCELLED))
                book.put(dataclasses.replace(t, state=state, updated=now))
            elif event < 0.88:
                cancelled = True
                for t in book.targets.values():
                    if t.state not in TERMINAL and rng.random() < 0.5:
                        book.put(dataclasses.replace(t, cancel_requested=True))
            elif event < 0.97:
                node_id = rng.choice(sorted(facts))
                facts = {
                    **facts,
                    node_id: NodeFacts(
                        online=not facts[node_id].online,
                        last_seen=now,
                        jobs_disabled=rng.random() < 0.1,
                    ),
                }
            else:
                book = JobTargets(book.targets, book.limits)
        walks += book.walks
    assert walks < passes  # and some passes walked nothing


def test_a_retry_beyond_the_window_is_sent_when_its_backoff_ends() -> None:
    """A target backing off behind a full window: the pass after its backoff walks the
    targets and sends it (the window refilled from the last walk alone would not)."""
    book = JobTargets(
        {
            "a": Target("a"),
            "b": Target("b", attempts=1, next_attempt=NOW + 5),
            "c": Target("c"),
        },
        JobLimits(created=NOW, concurrency=1),
    )
    facts = online("a", "b", "c")
    assert _same_plan(book, facts, NOW) == ["a"]
    book.put(Target("a", T.SUCCESS))
    assert _same_plan(book, facts, NOW + 1, in_flight=set()) == ["c"]
    assert book.walks == 1
    book.put(Target("c", T.SUCCESS))
    assert book.plan(facts, NOW + 2).wake_at == NOW + 5
    assert _same_plan(book, facts, NOW + 6) == ["b"]
    assert book.walks == 2


def test_a_quiet_job_is_planned_without_walking_its_targets() -> None:
    """500 targets on online nodes, a window of 100, each target ending on its answer
    and a pass after every 10 answers: two walks (the first pass; the node facts read
    again once), not one a pass."""
    book = JobTargets(
        {f"n{i}": Target(f"n{i}") for i in range(500)}, JobLimits(created=NOW, concurrency=100)
    )
    facts = online(*book.targets)
    in_flight: set[str] = set()
    sent: list[str] = []
    now = NOW
    while book.counts[T.SUCCESS] < 500:
        if book.counts[T.SUCCESS] == 250:
            facts = dict(facts)  # read again
        dispatch = _same_plan(book, facts, now, in_flight=set(in_flight))
        sent += dispatch
        in_flight.update(dispatch)
        for node_id in sorted(in_flight, key=sent.index)[:10]:
            book.put(Target(node_id, T.SUCCESS, updated=now))
            in_flight.discard(node_id)
        now += 0.01
    assert sent == list(book.targets)  # each once, in order
    assert book.walks == 2


def test_a_plan_foresees_jobs_off_and_offline_nodes_and_nothing_else() -> None:
    """An online node: no note; a node with jobs off: it will fail (before its being
    offline: the daemon would refuse it when it returns); an offline one waits."""
    seen = NOW - 60
    assert foreseen("a", NodeFacts(online=True, last_seen=seen), 300.0) == ""
    assert foreseen("b", NodeFacts(online=False, last_seen=seen, jobs_disabled=True), 300.0) == (
        "will fail: b refuses remote jobs (its daemon has [jobs] enabled = false)"
    )
    assert foreseen("c", NodeFacts(online=False, last_seen=seen), 300.0) == (
        f"offline since {format_time(NOW - 60)}: runs if it returns within the delivery"
        " timeout of 300s, else UNDELIVERABLE"
    )
