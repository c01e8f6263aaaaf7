"""Rollout decisions (`manager.service.rollout`), on plain values and a manual clock.

`SimFleet` plays the nodes: a node moved to a revision runs it after a
start-up delay and is then healthy (or not, or reports an error), as the
test scripts it. Each test drives `step` the way the driver does (apply the
step, advance the clock to `wake_at` or a little, step again) and checks what
an operator would see: batches, states, reasons.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field

import pytest

from manager.service.desired import push_backoff, push_retry_at, undelivered
from manager.service.rollout import (
    Amount,
    NodePhase,
    NodeProgress,
    Observation,
    Rollout,
    RolloutState,
    Step,
    UpdatePolicy,
    abort,
    from_dict,
    pause,
    plan_batches,
    promote,
    rebase,
    resume,
    start,
    step,
    supersede,
    to_dict,
)
from manager.service.rollout import _judge as _judge  # the per-node judgement alone
from manager.storage.records import NodeDesiredRecord

S = RolloutState
T0 = 1_000_000.0


@dataclass
class SimNode:
    """One simulated node's agent."""

    online: bool = True
    assigned: int = 1
    running: int = 1
    healthy_since: float | None = T0 - 3600
    error: str = ""
    undelivered: str = ""
    """The error of the push that did not reach it ("" once delivered)."""


@dataclass
class SimFleet:
    """Nodes that run what they are assigned, after `startup` seconds, as scripted."""

    nodes: dict[str, SimNode]
    startup: float = 2.0
    bad: set[int] = field(default_factory=set)
    """Revisions that start but never become healthy."""
    broken: dict[int, str] = field(default_factory=dict)
    """Revisions the daemon cannot run, with the error it reports."""
    unreachable: dict[str, str] = field(default_factory=dict)
    """Nodes (online) whose pushes fail, with the push error, until `deliver`."""
    moves: list[tuple[float, str, int]] = field(default_factory=list)
    """Every (time, node, revision) assignment, to check nothing moves twice."""

    @classmethod
    def of(cls, count: int, revision: int = 1, **kw: object) -> SimFleet:
        nodes = {f"n{i:02d}": SimNode(assigned=revision, running=revision) for i in range(count)}
        return cls(nodes, **kw)  # type: ignore[arg-type]

    def observe(self, now: float) -> dict[str, Observation]:
        out = {}
        for name, node in self.nodes.items():
            healthy = node.healthy_since if node.healthy_since is not None else None
            if healthy is not None and healthy > now:
                healthy = None  # still starting
            out[name] = Observation(
                online=node.online,
                assigned=node.assigned,
                running=node.running,
                healthy_since=healthy,
                error=node.error,
                detail="BACKOFF: exited with code 1" if node.assigned in self.bad else "",
                undelivered=node.undelivered,
            )
        return out

    def move(self, names: tuple[str, ...], revision: int, now: float) -> None:
        for name in names:
            self.moves.append((now, name, revision))
            node = self.nodes[name]
            node.assigned = revision
            if not node.online:
                continue
            if name in self.unreachable:
                node.undelivered = self.unreachable[name]  # still runs what it ran
                continue
            self.run(name, now)

    def deliver(self, name: str, now: float) -> None:
        """The push gets through at last: the node runs what it is assigned."""
        self.unreachable.pop(name, None)
        self.nodes[name].undelivered = ""
        self.run(name, now)

    def run(self, name: str, now: float) -> None:
        node = self.nodes[name]
        node.running = node.assigned
        node.error = self.broken.get(node.assigned, "")
        node.healthy_since = None if node.assigned in self.bad else now + self.startup


@dataclass
class Driver:
    """What rollout_driver does, minus the database: keep the records, apply each step."""

    fleet: SimFleet
    rollout: Rollout
    progress: dict[str, NodeProgress] = field(default_factory=dict)
    now: float = T0
    notes: list[str] = field(default_factory=list)

    def tick(self) -> Step:
        result = step(self.rollout, self.progress, self.fleet.observe(self.now), self.now)
        self.apply(result)
        return result

    def apply(self, result: Step) -> None:
        self.rollout = result.rollout
        self.progress.update(result.nodes)
        self.fleet.move(result.assign, result.rollout.target, self.now)
        self.notes.extend(f"{n.kind}: {n.message}" for n in result.notes)

    def run(self, *, until: float = T0 + 7200, stop: set[RolloutState] | None = None) -> None:
        """Step, sleeping to each wake-up (at least 1 s apart), until terminal or `stop`."""
        stop = stop or set()
        while self.rollout.state not in {*stop, S.SUCCESSFUL, S.FAILED, S.REVERTED, S.CANCELLED}:
            result = self.tick()
            if self.rollout.state in stop:
                return
            wake = result.wake_at if result.wake_at is not None else self.now + 1.0
            self.now = max(self.now + 0.5, min(wake, self.now + 5.0))
            assert self.now < until, f"rollout did not end: {self.rollout}"

    def batches(self) -> list[list[str]]:
        """Node names per batch number, in batch order."""
        by_batch: dict[int, list[str]] = {}
        for name, rec in sorted(self.progress.items()):
            if rec.batch >= 0:
                by_batch.setdefault(rec.batch, []).append(name)
        return [by_batch[b] for b in sorted(by_batch)]


def policy(**kw: object) -> UpdatePolicy:
    base = {"max_parallel": Amount(3), "min_healthy_time": 5.0, "healthy_deadline": 60.0}
    base.update(kw)
    return UpdatePolicy(**base)  # type: ignore[arg-type]


def rollout_of(fleet: SimFleet, target: int = 2, previous: int = 1, **kw: object) -> Driver:
    r, _ = start("web", target, previous, policy(**kw), T0)
    return Driver(fleet, r)


# --- amounts and policies ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "total", "expected"),
    [("3", 10, 3), (3, 10, 3), ("25%", 10, 3), ("10%", 5, 1), ("0%", 5, 0), ("100%", 7, 7)],
)
def test_amount_counts_nodes(text: str | int, total: int, expected: int) -> None:
    """A percentage rounds up (at least one node unless 0%); a number is taken as is."""
    assert Amount.parse(text, what="max_parallel").of(total) == expected


@pytest.mark.parametrize("text", ["101%", "-1", "abc", "2.5", "%", ""])
def test_amount_refuses_bad_values_naming_the_field(text: str) -> None:
    """Over 100%, negative or non-numeric amounts are refused with the field's name."""
    with pytest.raises(ValueError, match=r"^canary: "):
        Amount.parse(text, what="canary")


def test_policy_problems_name_the_field() -> None:
    """Deadlines that cannot work are reported per field; a sane policy has none."""
    assert policy().problems() == []
    assert [f for f, _ in policy(max_parallel=Amount(0)).problems()] == ["max_parallel"]
    assert [f for f, _ in policy(healthy_deadline=-1.0).problems()] == ["healthy_deadline"]
    short = policy(min_healthy_time=30.0, healthy_deadline=20.0).problems()
    assert short == [("healthy_deadline", "must be longer than min_healthy_time (30s), got 20s")]
    assert [f for f, _ in policy(progress_deadline=10.0).problems()] == ["progress_deadline"]


# --- batches and health gates ----------------------------------------------------------------


def test_batches_of_max_parallel_each_gated_on_min_healthy_time() -> None:
    """10 nodes, 3 at a time: 4 batches, the next only after the last stayed healthy 5 s."""
    fleet = SimFleet.of(10)
    d = rollout_of(fleet)
    d.run()
    assert d.rollout.state is S.SUCCESSFUL
    assert [len(b) for b in d.batches()] == [3, 3, 3, 1]
    starts = sorted({t for t, _, _ in fleet.moves})
    # Each batch waited for start-up (2 s) + min_healthy_time (5 s) of the one before.
    assert all(b - a >= 7.0 for a, b in itertools.pairwise(starts))
    assert all(n.running == 2 for n in fleet.nodes.values())
    assert sorted(name for _, name, _ in fleet.moves) == sorted(fleet.nodes)  # once each


def test_percentage_batches_and_the_success_event() -> None:
    """max_parallel 50% of 4 nodes is 2 per batch; success says how many nodes run it."""
    d = rollout_of(SimFleet.of(4), max_parallel=Amount(50, percent=True))
    d.run()
    assert [len(b) for b in d.batches()] == [2, 2]
    assert d.notes[-1] == "rollout-succeeded: web: revision 2 rolled out to 4 node(s)"


def test_wake_at_is_the_next_time_based_decision() -> None:
    """After a batch starts, the driver is told to look again when it could be done."""
    fleet = SimFleet.of(2)
    d = rollout_of(fleet, max_parallel=Amount(1))
    first = d.tick()
    assert first.assign == ("n00",)
    # Not healthy yet: nothing can change before its healthy deadline.
    assert first.wake_at == T0 + 60.0
    d.now = T0 + 3.0  # healthy since T0 + 2
    assert d.tick().wake_at == T0 + 2.0 + 5.0
    d.now = T0 + 7.0
    nxt = d.tick()
    assert nxt.assign == ("n01",)
    assert d.progress["n00"].phase is NodePhase.DONE


def test_step_is_idempotent_for_the_same_inputs() -> None:
    """Re-evaluating after a crash with the stored records moves no node a second time."""
    fleet = SimFleet.of(6)
    d = rollout_of(fleet)
    d.tick()
    again = step(d.rollout, d.progress, fleet.observe(d.now), d.now)
    assert again.assign == ()
    assert again.nodes == {}
    assert again.rollout == d.rollout


def test_a_node_that_already_runs_the_target_is_not_moved() -> None:
    """Nodes assigned the target before the rollout (none moved) count as done."""
    fleet = SimFleet.of(3)
    fleet.nodes["n01"] = SimNode(assigned=2, running=2)
    d = rollout_of(fleet)
    d.run()
    assert d.rollout.state is S.SUCCESSFUL
    assert sorted(name for _, name, _ in fleet.moves) == ["n00", "n02"]


# --- canaries -------------------------------------------------------------------------------


def test_canary_batch_waits_for_promotion() -> None:
    """One canary goes first; the rollout waits for `promote`, then does the rest."""
    fleet = SimFleet.of(5)
    d = rollout_of(fleet, canary=Amount(1))
    d.run(stop={S.AWAITING_PROMOTION})
    assert d.rollout.state is S.AWAITING_PROMOTION
    assert [name for _, name, _ in fleet.moves] == ["n00"]
    assert d.notes[-1] == (
        "rollout-awaiting-promotion: web: canaries of revision 2 are healthy; the rest waits"
        " for a promotion"
    )
    d.now += 3600  # waiting for an operator never fails the rollout
    assert d.tick().assign == ()
    assert d.rollout.state is S.AWAITING_PROMOTION
    d.rollout, note = promote(d.rollout, d.now, "operator/alice")
    assert note.message == "web: canaries of revision 2 promoted by operator/alice"
    d.run()
    assert d.rollout.state is S.SUCCESSFUL
    assert [len(b) for b in d.batches()] == [1, 3, 1]


def test_auto_promote_continues_after_healthy_canaries() -> None:
    """With auto_promote the canary batch gates the rest without an operator."""
    d = rollout_of(SimFleet.of(4), canary=Amount(25, percent=True), auto_promote=True)
    d.run()
    assert d.rollout.state is S.SUCCESSFUL
    assert any(
        n.startswith("rollout-promoted: web: canaries of revision 2 promoted auto") for n in d.notes
    )


def test_unhealthy_canary_fails_and_auto_revert_restores_the_last_good_revision() -> None:
    """A canary never healthy: FAILED reason, then REVERTING to 1 and REVERTED."""
    fleet = SimFleet.of(4, bad={2})
    d = rollout_of(fleet, canary=Amount(1), auto_revert=True)
    d.run()
    assert d.rollout.state is S.REVERTED
    assert d.rollout.target == 1
    assert d.rollout.reverted_from == 2
    assert all(n.assigned == 1 and n.running == 1 for n in fleet.nodes.values())
    failed = next(n for n in d.notes if n.startswith("rollout-failed"))
    assert failed == (
        "rollout-failed: web: revision 2 failed on n00: not healthy within 60s:"
        " BACKOFF: exited with code 1"
    )
    # Only the canary ever got revision 2; the others never moved.
    assert [(name, rev) for _, name, rev in fleet.moves] == [("n00", 2), ("n00", 1)]


# --- failures and reverts ---------------------------------------------------------------------


def test_failure_without_auto_revert_stops_where_it_is() -> None:
    """A failed batch ends the rollout FAILED; nodes keep what they were given."""
    fleet = SimFleet.of(6, broken={2: "artifact web-2.tar.gz: digest mismatch"})
    d = rollout_of(fleet)
    d.run()
    assert d.rollout.state is S.FAILED
    assert d.rollout.reason == (
        "revision 2 failed on n00 (and 2 more): artifact web-2.tar.gz: digest mismatch"
    )
    assert sum(n.assigned == 2 for n in fleet.nodes.values()) == 3


def test_revert_moves_failed_nodes_first_and_in_batches() -> None:
    """A failure in batch 2 reverts the failed nodes first, then the healthy ones, gated."""
    fleet = SimFleet.of(6)
    d = rollout_of(fleet, auto_revert=True)
    d.tick()  # batch 1: n00-n02
    d.now += 8
    d.tick()  # batch 1 done -> batch 2: n03-n05
    fleet.nodes["n04"].healthy_since = None
    fleet.nodes["n04"].error = "spawn failed: no such user 'web'"
    d.now += 1
    d.tick()
    assert d.rollout.state is S.REVERTING
    reverted_first = [name for t, name, rev in fleet.moves if rev == 1]
    assert reverted_first[0] == "n04"  # the worst off first
    assert len(reverted_first) == 3
    d.run()
    assert d.rollout.state is S.REVERTED
    assert all(n.assigned == 1 for n in fleet.nodes.values())
    assert d.notes[-1].startswith("rollout-reverted: web: back on revision 1 after revision 2")


def test_a_failing_revert_stops_without_a_second_revert() -> None:
    """If the old revision is unhealthy too, the rollout fails and says it stopped."""
    fleet = SimFleet.of(3, bad={1, 2})  # the nodes run 1 fine until it is started again
    d = rollout_of(fleet, auto_revert=True, max_parallel=Amount(1))
    d.run()
    assert d.rollout.state is S.FAILED
    assert d.rollout.reason.startswith("reverting to revision 1 failed: revision 1 failed on n00")
    assert d.rollout.reason.endswith("stopped, no further revert")
    assert sum(1 for _, _, rev in fleet.moves if rev == 2) == 1


def test_auto_revert_with_no_earlier_good_revision_says_so() -> None:
    """The first revision of a definition has nothing to revert to: FAILED, with the reason."""
    fleet = SimFleet.of(2, revision=0, broken={1: "no such file: /opt/web/bin/web"})
    r, _ = start("web", 1, 0, policy(auto_revert=True), T0)
    d = Driver(fleet, r)
    d.run()
    assert d.rollout.state is S.FAILED
    assert d.rollout.reason.endswith(
        "no earlier revision succeeded, so there is nothing to revert to"
    )


def test_healthy_deadline_fails_nodes_that_never_become_healthy() -> None:
    """Started but never healthy: each node fails at its deadline, the reason says why."""
    fleet = SimFleet.of(2, bad={2})
    d = rollout_of(fleet)
    d.tick()
    d.now = T0 + 59.9
    assert d.tick().rollout.state is S.RUNNING
    d.now = T0 + 60.0
    assert d.tick().rollout.state is S.FAILED
    assert d.rollout.reason == (
        "revision 2 failed on n00 (and 1 more): not healthy within 60s: BACKOFF: exited with code 1"
    )


@pytest.mark.parametrize("jump", [3600.0, -600.0])
def test_a_step_of_the_managers_clock_moves_the_deadlines_with_it(jump: float) -> None:
    """A batch in flight when the manager's clock is stepped: a node not healthy yet is
    failed 60 s of time after it was moved, not at once (+1 h), not 10 min late (-10 min).
    Its health times are its daemon's, not stepped."""
    fleet = SimFleet.of(2, bad={2})
    d = rollout_of(fleet)
    d.tick()
    updating = dict(d.progress)
    d.rollout, moved = rebase(d.rollout, d.progress, jump)
    d.progress.update(moved)
    assert d.rollout.progress_at == T0 + jump
    assert {n: p.since for n, p in moved.items()} == dict.fromkeys(updating, T0 + jump)
    d.now = T0 + jump + 59.9
    assert d.tick().rollout.state is S.RUNNING
    d.now = T0 + jump + 60.0
    assert d.tick().rollout.state is S.FAILED
    assert "not healthy within 60s" in d.rollout.reason


def test_rebase_leaves_nodes_that_are_not_updating() -> None:
    """Done and failed nodes' times say when that happened; only deadlines move."""
    r, _ = start("web", 2, 1, policy(), T0)
    nodes = {
        "a": NodeProgress(NodePhase.DONE, batch=0, since=T0 - 5),
        "b": NodeProgress(NodePhase.UPDATING, batch=1, since=T0),
    }
    after, moved = rebase(dataclasses.replace(r, batch_done_at=T0 - 1), nodes, 30.0)
    assert (after.progress_at, after.batch_done_at) == (T0 + 30, T0 + 29)
    assert moved == {"b": NodeProgress(NodePhase.UPDATING, batch=1, since=T0 + 30)}


def test_progress_deadline_bounds_nodes_that_keep_coming_back() -> None:
    """Nodes whose own deadlines restart each time they return cannot stall the rollout."""
    fleet = SimFleet.of(2, bad={2})
    d = rollout_of(fleet, healthy_deadline=100.0, progress_deadline=100.0)
    d.tick()  # n00 and n01 at T0
    for name, away, back in (("n00", 50, 60), ("n01", 70, 80)):
        fleet.nodes[name].online = False
        d.now = T0 + away
        d.tick()
        fleet.nodes[name].online = True
        d.now = T0 + back
        d.tick()  # back: its own deadline is now 100 s from here
    d.now = T0 + 100
    result = d.tick()
    assert result.rollout.state is S.FAILED
    assert result.rollout.reason == (
        "no progress for 100s (progress_deadline); still waiting on n00, n01"
    )


# --- nodes the push has not reached -------------------------------------------------------------


def test_a_node_the_push_cannot_reach_waits_and_its_deadline_counts_from_delivery() -> None:
    """Online but unreachable (a cut stream not yet noticed): not failed at healthy_deadline
    though it still runs the old revision; the reason names it; delivered, it is judged
    from then on, and the rollout succeeds without a revert."""
    refused = "n00: daemon at 10.0.0.7:7443 refused the connection"  # as the pool says it
    fleet = SimFleet.of(2, unreachable={"n00": refused})
    d = rollout_of(
        fleet, max_parallel=Amount(1), min_healthy_time=1.0, healthy_deadline=3.0,
        progress_deadline=60.0, auto_revert=True,
    )  # fmt: skip
    assert d.tick().assign == ("n00",)
    d.now = T0 + 10  # long past its healthy deadline
    waiting = d.tick()
    assert d.rollout.state is S.RUNNING
    assert d.progress["n00"].phase is NodePhase.UPDATING
    assert d.rollout.reason == (
        "n00: not delivered yet: daemon at 10.0.0.7:7443 refused the connection"
    )
    # Nothing to time but the progress deadline (a push retry's pass judges it again).
    assert waiting.wake_at == T0 + 60
    fleet.deliver("n00", d.now)  # the pass that judged it retried the push: it got through
    d.now += 0.1
    d.tick()
    assert d.rollout.reason == ""
    assert d.progress["n00"].phase is NodePhase.UPDATING
    d.run()
    assert d.rollout.state is S.SUCCESSFUL, d.rollout.reason
    assert not [n for n in d.notes if n.startswith("rollout-node-failed")]
    assert d.batches() == [["n00"], ["n01"]]


def test_a_node_never_delivered_fails_the_rollout_at_its_progress_deadline() -> None:
    """The push never gets through: the rollout fails at progress_deadline (not at the
    node's healthy deadline), naming the push error; the node itself is not failed."""
    fleet = SimFleet.of(1, unreachable={"n00": "UNAVAILABLE: connection refused"})
    d = rollout_of(fleet, min_healthy_time=1.0, healthy_deadline=3.0, progress_deadline=20.0)
    d.run(stop={S.FAILED})
    assert d.now == T0 + 20
    assert d.rollout.state is S.FAILED
    assert d.rollout.reason == (
        "no progress for 20s (progress_deadline); still waiting on n00;"
        " n00: not delivered yet: UNAVAILABLE: connection refused"
    )
    assert d.progress["n00"].phase is NodePhase.UPDATING
    assert not [n for n in d.notes if n.startswith("rollout-node-failed")]


def test_many_undelivered_nodes_are_named_a_few_at_a_time() -> None:
    """A batch of five unreachable nodes: the reason names three and counts the rest."""
    fleet = SimFleet.of(5, unreachable={f"n{i:02d}": "cut" for i in range(5)})
    d = rollout_of(fleet, max_parallel=Amount(5))
    d.tick()
    d.now += 1
    d.tick()
    assert d.rollout.reason == (
        "n00: not delivered yet: cut; n01: not delivered yet: cut; n02: not delivered yet: cut"
        " (and 2 more not delivered)"
    )


def test_an_undelivered_node_that_goes_offline_is_on_hold_as_any_offline_node() -> None:
    """Offline, an undelivered node neither blocks nor fails: the batch goes on without
    it and the rollout ends naming it as offline, not as undelivered."""
    fleet = SimFleet.of(3, unreachable={"n00": "cut"})
    d = rollout_of(fleet, max_parallel=Amount(1), healthy_deadline=30.0, progress_deadline=60.0)
    assert d.tick().assign == ("n00",)
    fleet.nodes["n00"].online = False
    d.now += 1
    assert d.tick().assign == ("n01",)
    assert d.progress["n00"].offline
    d.run()
    assert d.rollout.state is S.SUCCESSFUL
    assert d.rollout.reason == "1 offline node(s) will converge when they return: n00"


def test_a_node_that_runs_the_target_is_judged_though_a_later_set_is_undelivered() -> None:
    """Running the target means the revision reached it: a push error about a later set
    does not hold its health deadline."""
    r, _ = start("web", 2, 1, policy(min_healthy_time=10.0), T0)
    moved = NodeProgress(phase=NodePhase.UPDATING, batch=1, since=T0)
    seen = Observation(
        online=True, assigned=2, running=2, detail="BACKOFF: exited with code 3", undelivered="cut"
    )
    assert _judge(r, moved, seen, T0 + 60).phase is NodePhase.FAILED
    behind = dataclasses.replace(seen, running=1)
    assert _judge(r, moved, behind, T0 + 60) == dataclasses.replace(moved, since=T0 + 60)


@pytest.mark.parametrize(
    ("version", "delivered", "reported", "push_error", "expected"),
    [
        (3, 2, 2, "UNAVAILABLE: cut", "UNAVAILABLE: cut"),  # the last push failed
        (3, 2, 2, "", ""),  # its first push is in flight
        (3, 3, 3, "UNAVAILABLE: cut", ""),  # delivered (an old error not yet cleared)
        (3, 2, 3, "DEADLINE_EXCEEDED", ""),  # the answer was lost; the daemon reports it
    ],
)
def test_a_node_rows_undelivered_is_its_push_error_while_the_set_has_not_reached_it(
    version: int, delivered: int, reported: int, push_error: str, expected: str
) -> None:
    row = NodeDesiredRecord(
        "n1", version, delivered_version=delivered, reported_version=reported,
        push_error=push_error,
    )  # fmt: skip
    assert undelivered(row) == expected


# --- offline nodes ------------------------------------------------------------------------------


def test_offline_nodes_do_not_block_and_are_listed() -> None:
    """Two offline nodes are skipped; the rollout succeeds and names them as pending."""
    fleet = SimFleet.of(5)
    fleet.nodes["n01"].online = False
    fleet.nodes["n03"].online = False
    d = rollout_of(fleet)
    d.run()
    assert d.rollout.state is S.SUCCESSFUL
    assert d.rollout.reason == "2 offline node(s) will converge when they return: n01, n03"
    # They are assigned revision 2 as the rollout ends, and run it once they are back.
    assert (fleet.nodes["n01"].assigned, fleet.nodes["n01"].running) == (2, 1)
    assert [(n, rev) for _, n, rev in fleet.moves[-2:]] == [("n01", 2), ("n03", 2)]
    assert d.tick().assign == ()  # ended: nothing moves again


def test_offline_nodes_converge_to_the_revision_a_revert_ended_on() -> None:
    """A node offline during a revert, left on the failed revision, is assigned the good one."""
    fleet = SimFleet.of(3, bad={2})
    d = rollout_of(
        fleet, max_parallel=Amount(1), auto_revert=True, healthy_deadline=30.0,
        progress_deadline=60.0,
    )  # fmt: skip
    assert d.tick().assign == ("n00",)  # moved to the bad revision 2, then gone
    fleet.nodes["n00"].online = False
    d.run()
    assert d.rollout.state is S.REVERTED
    assert "1 offline node(s) will converge when they return: n00" in d.rollout.reason
    assert fleet.nodes["n00"].assigned == 1
    assert fleet.nodes["n00"].running == 2  # it gets revision 1 when it is back


def test_a_node_going_offline_mid_batch_is_on_hold_not_failed() -> None:
    """Offline while updating: its batch completes without it; back, its deadline restarts."""
    fleet = SimFleet.of(4)
    d = rollout_of(fleet, max_parallel=Amount(2), healthy_deadline=30.0, progress_deadline=30.0)
    d.tick()  # n00, n01
    fleet.nodes["n01"].online = False
    fleet.nodes["n01"].healthy_since = None
    d.now += 8
    nxt = d.tick()
    assert nxt.assign == ("n02", "n03")
    assert d.progress["n01"].offline
    d.now += 100  # long past the deadline, but it was offline
    fleet.nodes["n01"].online = True
    d.tick()
    assert d.progress["n01"].phase is NodePhase.UPDATING
    assert d.progress["n01"].since == d.now
    fleet.run("n01", d.now)
    d.run()
    assert d.rollout.state is S.SUCCESSFUL


def test_a_rollout_no_node_proved_waits_then_fails_at_its_progress_deadline() -> None:
    """The only node moved to a never-healthy revision goes offline: the rollout waits
    for it (never SUCCESSFUL: the revision would become the stable one untested), and
    fails at its progress deadline; when the node returns in time, it is judged."""
    fleet = SimFleet.of(1, bad={2})
    d = rollout_of(fleet, max_parallel=Amount(1))
    assert d.tick().assign == ("n00",)
    fleet.nodes["n00"].online = False
    d.now += 5
    waiting = d.tick()
    assert d.rollout.state is S.RUNNING
    assert d.rollout.reason == "waiting for a node to prove revision 2; offline: n00"
    assert waiting.wake_at == d.rollout.progress_at + d.rollout.policy.progress_deadline
    d.now = d.rollout.progress_at + d.rollout.policy.progress_deadline
    d.tick()
    assert d.rollout.state is S.FAILED
    assert d.rollout.reason.startswith("no node proved revision 2 healthy within")


def test_an_offline_node_that_returns_proves_the_revision() -> None:
    """The moved node comes back healthy before the deadline: SUCCESSFUL."""
    fleet = SimFleet.of(1)
    d = rollout_of(fleet, max_parallel=Amount(1))
    assert d.tick().assign == ("n00",)
    fleet.nodes["n00"].online = False
    d.now += 5
    d.tick()
    assert d.rollout.state is S.RUNNING
    fleet.nodes["n00"].online = True
    for _ in range(5):
        d.now += 20
        d.tick()
    assert d.rollout.state is S.SUCCESSFUL, d.rollout.reason


def test_a_count_short_of_instances_waits_for_room_then_fails_at_its_progress_deadline() -> None:
    """Every placed node runs the revision but placement could not place them all: not
    SUCCESSFUL (a `count = 3` on two nodes is not what was asked); it waits for room
    within the progress deadline, then fails saying what placement said."""
    fleet = SimFleet.of(2)
    d = rollout_of(fleet)
    why = "1 of 3 instance(s) not placed: only 2 matching node(s) are online"
    d.tick()
    d.now += 10
    waiting = step(d.rollout, d.progress, fleet.observe(d.now), d.now, unplaced=why)
    d.apply(waiting)
    assert d.rollout.state is S.RUNNING
    assert d.rollout.reason == f"waiting for room: {why}"
    assert waiting.wake_at == d.rollout.progress_at + d.rollout.policy.progress_deadline
    d.now = d.rollout.progress_at + d.rollout.policy.progress_deadline
    d.apply(step(d.rollout, d.progress, fleet.observe(d.now), d.now, unplaced=why))
    assert d.rollout.state is S.FAILED
    assert d.rollout.reason == (
        "not every instance of revision 2 was placed within 10m (progress_deadline): " + why
    )
    assert d.notes[-1] == f"rollout-failed: web: {d.rollout.reason}"


def test_a_count_that_finds_room_in_time_moves_the_new_node_and_succeeds() -> None:
    """Room appears (placement puts the third instance on a new node): it joins the scope,
    is moved in a batch of its own, and the rollout succeeds with a clean reason."""
    fleet = SimFleet.of(2)
    d = rollout_of(fleet)
    d.tick()
    d.now += 10
    d.apply(step(d.rollout, d.progress, fleet.observe(d.now), d.now, unplaced="1 of 3 ..."))
    assert d.rollout.reason.startswith("waiting for room")
    fleet.nodes["n02"] = SimNode()
    d.now += 60
    joined = d.tick()
    assert joined.assign == ("n02",)
    assert d.rollout.reason == ""
    d.run()
    assert d.rollout.state is S.SUCCESSFUL
    assert fleet.nodes["n02"].assigned == 2


def test_a_revert_short_of_instances_still_ends() -> None:
    """A revert goes back to where the old revision ran; what could not be placed does not
    hold it (the revert is not a new placement)."""
    fleet = SimFleet.of(2, bad={2})
    d = rollout_of(fleet, max_parallel=Amount(2), auto_revert=True)
    for _ in range(200):
        d.apply(step(d.rollout, d.progress, fleet.observe(d.now), d.now, unplaced="1 of 3 ..."))
        if d.rollout.state in (S.REVERTED, S.FAILED):
            break
        d.now += 5
    assert d.rollout.state is S.REVERTED, d.rollout.reason


# --- operator actions ---------------------------------------------------------------------------


def test_pause_holds_new_batches_and_resume_continues() -> None:
    """Paused: the batch in flight finishes, no new one starts; resume goes on."""
    fleet = SimFleet.of(6)
    d = rollout_of(fleet)
    d.tick()
    d.rollout, note = pause(d.rollout, d.now, "operator/bob")
    assert note.message == "web: revision 2 paused by operator/bob"
    d.now += 3600
    d.tick()
    assert d.rollout.state is S.PAUSED
    assert len(fleet.moves) == 3
    assert all(d.progress[f"n0{i}"].phase is NodePhase.DONE for i in range(3))
    with pytest.raises(ValueError, match="cannot pause a rollout that is PAUSED"):
        pause(d.rollout, d.now, "operator/bob")
    d.rollout, note = resume(d.rollout, d.now, "operator/bob", "maintenance done")
    assert note.message == "web: revision 2 resumed by operator/bob: maintenance done"
    d.run()
    assert d.rollout.state is S.SUCCESSFUL


def test_pause_between_batches() -> None:
    """A 60 s pause separates batches; wake_at tells the driver when."""
    fleet = SimFleet.of(4)
    d = rollout_of(fleet, max_parallel=Amount(2), pause_between_batches=60.0)
    d.tick()
    d.now += 8
    waiting = d.tick()
    assert waiting.assign == ()
    assert waiting.wake_at == d.now + 60.0
    d.now += 60
    assert d.tick().assign == ("n02", "n03")


def test_abort_fails_now_and_reverts_by_policy() -> None:
    """`rollout abort` fails the rollout; with auto_revert the moved nodes go back."""
    fleet = SimFleet.of(4)
    d = rollout_of(fleet, auto_revert=True)
    d.tick()
    result = abort(d.rollout, d.progress, fleet.observe(d.now), d.now, "operator/alice")
    d.apply(result)
    assert d.rollout.state is S.REVERTING
    assert d.rollout.reason == "aborted by operator/alice"
    d.run()
    assert d.rollout.state is S.REVERTED
    assert all(n.assigned == 1 for n in fleet.nodes.values())


def test_supersede_cancels_and_leaves_nodes_where_they_are() -> None:
    """A newer revision cancels the rollout; a terminal rollout's step changes nothing."""
    fleet = SimFleet.of(4)
    d = rollout_of(fleet)
    d.tick()
    cancelled, note = supersede(d.rollout, 3, d.now)
    assert cancelled.state is S.CANCELLED
    assert note.message == "web: rollout of revision 2 superseded by revision 3"
    after = step(cancelled, d.progress, fleet.observe(d.now), d.now)
    assert after.assign == ()
    assert after.nodes == {}
    assert after.rollout == cancelled


def test_promote_and_resume_refuse_the_wrong_state() -> None:
    """Operator actions in the wrong state are refused with the state named."""
    r, _ = start("web", 2, 1, policy(), T0)
    with pytest.raises(ValueError, match="only a rollout AWAITING_PROMOTION can be promoted"):
        promote(r, T0, "operator/a")
    with pytest.raises(ValueError, match="only a PAUSED rollout can be resumed; it is PENDING"):
        resume(r, T0, "operator/a")
    done = dataclasses.replace(r, state=S.SUCCESSFUL)
    with pytest.raises(ValueError, match="already ended"):
        abort(done, {}, {}, T0, "operator/a")


def test_new_nodes_joining_mid_rollout_are_moved_in_a_later_batch() -> None:
    """A node that starts matching during a rollout gets the target in a batch too."""
    fleet = SimFleet.of(3)
    d = rollout_of(fleet)
    d.tick()
    fleet.nodes["n99"] = SimNode()
    d.run()
    assert d.rollout.state is S.SUCCESSFUL
    assert fleet.nodes["n99"].assigned == 2
    assert d.progress["n99"].batch == 2


def test_plan_batches_matches_what_the_rollout_does() -> None:
    """The plan's batches: a canary batch of 1, then max_parallel (50% of 6 = 3) at a time."""
    nodes = [f"n{i}" for i in range(6)]
    pol = policy(max_parallel=Amount(50, percent=True), canary=Amount(1))
    assert plan_batches(pol, 6, reversed(nodes)) == [["n0"], ["n1", "n2", "n3"], ["n4", "n5"]]
    assert plan_batches(policy(), 0, []) == []
    fleet = SimFleet.of(6)
    d = rollout_of(fleet, max_parallel=pol.max_parallel, canary=pol.canary, auto_promote=True)
    d.run()
    assert d.batches() == plan_batches(pol, 6, fleet.nodes)


def test_a_rollout_record_survives_its_json_form() -> None:
    """to_dict/from_dict keep every field, so a stored rollout resumes as it was."""
    fleet = SimFleet.of(4)
    d = rollout_of(fleet, canary=Amount(25, percent=True), pause_between_batches=30.0)
    d.run(stop={S.AWAITING_PROMOTION})
    assert from_dict(json.loads(json.dumps(to_dict(d.rollout)))) == d.rollout
    paused, _ = pause(dataclasses.replace(d.rollout, state=S.RUNNING), d.now, "operator/a")
    assert from_dict(json.loads(json.dumps(to_dict(paused)))) == paused


@pytest.mark.parametrize(
    ("running", "healthy_since", "detail", "why"),
    [
        (2, None, "BACKOFF: exited with code 3", "BACKOFF: exited with code 3"),
        (2, None, "", "its health checks have not passed"),
        (1, None, "RUNNING", "it still runs revision 1 (RUNNING)"),
        (0, None, "", "it still runs nothing"),
        (2, T0 + 59, "RUNNING", "healthy only since 1s ago (RUNNING)"),
    ],
)
def test_a_node_past_its_healthy_deadline_fails_saying_why(
    running: int, healthy_since: float | None, detail: str, why: str
) -> None:
    """The reason names what the node does instead, once (the daemon's words if it has them)."""
    r, _ = start("web", 2, 1, policy(min_healthy_time=10.0), T0)
    moved = NodeProgress(phase=NodePhase.UPDATING, batch=1, since=T0)
    seen = Observation(
        online=True, assigned=2, running=running, healthy_since=healthy_since, detail=detail
    )
    judged = _judge(r, moved, seen, T0 + 60)
    assert judged.phase is NodePhase.FAILED
    assert judged.reason == f"not healthy within 60s: {why}"


def test_a_push_retry_set_before_the_clock_stepped_back_is_due_now() -> None:
    now = 1_000_000_000
    assert push_retry_at(now + 4_000, now) == now + 4_000  # backed off: wait for it
    assert push_retry_at(now - 1, now) == now - 1  # due
    assert push_retry_at(now + 60_000, now) == now + 60_000  # the longest backoff
    # Set under a clock 10 min ahead of this one: no backoff is that long.
    assert push_retry_at(now + 600_000, now) == now
    assert push_backoff(50) * 1000 <= 60_000
