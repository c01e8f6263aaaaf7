"""When the job updates' committer commits (`group_commit.commit_delay`), on a manual
clock: a batch gathers for a bounded time, a full batch or an urgent item goes at once."""

from __future__ import annotations

from manager.service.group_commit import GroupCommitPolicy, commit_delay

POLICY = GroupCommitPolicy(batch=4, wait=0.5)  # binary fractions: exact sums


def test_an_empty_queue_waits_for_an_item() -> None:
    """Nothing queued: nothing to commit, whatever the time."""
    assert commit_delay(0, False, 0.0, 100.0, POLICY) is None
    assert commit_delay(0, True, 0.0, 100.0, POLICY) is None


def test_a_few_answers_wait_from_the_first_one_queued() -> None:
    """The wait runs from the first item queued, not the last: once it is over, the
    batch is committed however many joined since."""
    assert commit_delay(1, False, 10.0, 10.0, POLICY) == 0.5
    assert commit_delay(3, False, 10.0, 10.375, POLICY) == 0.125
    assert commit_delay(3, False, 10.0, 10.5, POLICY) == 0.0
    assert commit_delay(2, False, 10.0, 11.0, POLICY) == 0.0


def test_a_full_batch_goes_at_once() -> None:
    """The batch's size reached: committed now, the wait not over."""
    assert commit_delay(4, False, 10.0, 10.0, POLICY) == 0.0
    assert commit_delay(9, False, 10.0, 10.0, POLICY) == 0.0


def test_an_urgent_item_goes_at_once() -> None:
    """A report, upload, decision or job's end queued: nobody waits the gathering time."""
    assert commit_delay(1, True, 10.0, 10.0, POLICY) == 0.0


def test_an_item_that_holds_a_slot_waits_the_shorter_bound() -> None:
    """Ended answers wait `wait`; once an item whose caller holds something until its
    commit (an answer without the end keeps its window slot) is queued, the batch goes
    when that one waited `holding_wait`, whichever comes first."""
    policy = GroupCommitPolicy(batch=64, wait=0.5, holding_wait=0.125)
    assert commit_delay(3, False, 10.0, 10.0, policy) == 0.5
    assert commit_delay(3, False, 10.0, 10.0, policy, first_holding=10.0) == 0.125
    # Came after the ended answers: its own bound, unless theirs ends first.
    assert commit_delay(3, False, 10.0, 10.25, policy, first_holding=10.25) == 0.125
    assert commit_delay(3, False, 10.0, 10.375, policy, first_holding=10.375) == 0.125
    assert commit_delay(3, False, 10.0, 10.4375, policy, first_holding=10.4375) == 0.0625
    assert commit_delay(3, False, 10.0, 10.5, policy, first_holding=10.5) == 0.0
    assert commit_delay(3, False, 10.0, 10.25, policy, first_holding=10.0) == 0.0
    assert commit_delay(3, True, 10.0, 10.0, policy, first_holding=10.0) == 0.0


def test_the_default_bounds() -> None:
    """Ended answers gather for longer than those that hold their window slot."""
    policy = GroupCommitPolicy()
    assert policy.holding_wait == 0.002
    assert policy.wait == 0.010
    assert commit_delay(1, False, 0.0, 0.0, policy, first_holding=0.0) == policy.holding_wait
