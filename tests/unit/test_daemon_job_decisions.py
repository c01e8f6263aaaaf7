"""Pure job decisions on the node: which step runs, a target's result, admission, upload."""

from __future__ import annotations

import pytest

from daemon.jobs.decide import (
    Queued,
    StepOutcome,
    TargetResult,
    admit,
    next_upload,
    step_runs,
    target_result,
)


@pytest.mark.parametrize(
    ("when", "failed_before", "runs"),
    [
        ("on_success", False, True),
        ("on_success", True, False),
        ("on_failure", False, False),
        ("on_failure", True, True),
        ("always", False, True),
        ("always", True, True),
    ],
)
def test_step_when(when: str, failed_before: bool, runs: bool) -> None:
    """A step runs by its `when` and whether an earlier step failed."""
    assert step_runs(when, failed_before) is runs  # type: ignore[arg-type]


def test_all_steps_succeeding_is_success_with_the_last_exit_code() -> None:
    """Every step that ran succeeded: SUCCESS (skipped on_failure steps do not count)."""
    steps = [StepOutcome("SUCCESS"), StepOutcome("SKIPPED", 0, "skipped")]
    assert target_result(steps, "") == TargetResult("SUCCESS", 0, "")


def test_the_first_failed_step_decides_even_if_later_steps_succeed() -> None:
    """A rollback step that succeeds after a failure leaves the target FAILED with the
    failing step's code and reason."""
    steps = [
        StepOutcome("SUCCESS"),
        StepOutcome("FAILED", 3, "exit code 3"),
        StepOutcome("SKIPPED", 0, "skipped"),
        StepOutcome("SUCCESS"),
    ]
    assert target_result(steps, "") == TargetResult("FAILED", 3, "exit code 3")


def test_a_step_timeout_makes_the_target_timeout() -> None:
    """A step stopped at its own timeout makes the target TIMEOUT with its signal."""
    steps = [StepOutcome("TIMEOUT", -15, "step timeout (5s) passed"), StepOutcome("SUCCESS")]
    assert target_result(steps, "") == TargetResult("TIMEOUT", -15, "step timeout (5s) passed")


def test_cancel_and_job_timeout_win_over_the_steps() -> None:
    """A stopped job is CANCELLED or TIMEOUT whatever its steps did before."""
    steps = [StepOutcome("FAILED", 1, "exit code 1"), StepOutcome("CANCELLED", -15, "cancelled")]
    assert target_result(steps, "cancel") == TargetResult("CANCELLED", -15, "cancelled")
    queued = [StepOutcome("SKIPPED", 0, "cancelled before it started")]
    assert target_result(queued, "cancel").state == "CANCELLED"
    assert target_result([StepOutcome("TIMEOUT", -9, "x")], "timeout").state == "TIMEOUT"


def test_admission_respects_max_concurrent_in_queue_order() -> None:
    """With one slot free the oldest queued job starts; none start when the node is full."""
    queued = [Queued("a", ""), Queued("b", ""), Queued("c", "")]
    assert admit(queued, [Queued("x", "")], 2) == ["a"]
    assert admit(queued, [Queued("x", ""), Queued("y", "")], 2) == []
    assert admit(queued, [], 5) == ["a", "b", "c"]


def test_a_held_lock_does_not_block_jobs_behind_it() -> None:
    """A job whose lock is held waits; jobs behind it with another or no lock go first."""
    queued = [Queued("apt-2", "apt"), Queued("free", ""), Queued("db", "db")]
    assert admit(queued, [Queued("apt-1", "apt")], 10) == ["free", "db"]


def test_two_queued_jobs_with_one_lock_never_start_together() -> None:
    """Of two queued jobs sharing a lock only the first is admitted in one round."""
    queued = [Queued("a1", "apt"), Queued("a2", "apt"), Queued("b", "")]
    assert admit(queued, [], 10) == ["a1", "b"]


def test_upload_asks_first_then_sends_from_the_acked_offset() -> None:
    """Unknown offset: ask; then chunks from the manager's offset, at most `chunk` bytes."""
    assert next_upload(None, 10, finished=False, truncated=False, chunk=4).action == "ask"
    plan = next_upload(4, 10, finished=False, truncated=False, chunk=4)
    assert (plan.action, plan.offset, plan.length) == ("send", 4, 4)
    plan = next_upload(8, 10, finished=True, truncated=False, chunk=4)
    assert (plan.action, plan.offset, plan.length) == ("send", 8, 2)


def test_upload_waits_while_running_and_is_done_when_finished_or_cut() -> None:
    """All acked: wait for more while the job runs, done once it ended or the manager cut it."""
    assert next_upload(10, 10, finished=False, truncated=False, chunk=4).action == "wait"
    assert next_upload(10, 10, finished=True, truncated=False, chunk=4).action == "done"
    assert next_upload(None, 99, finished=False, truncated=True, chunk=4).action == "done"
