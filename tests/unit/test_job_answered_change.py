"""The end a StartJob answer carried as a change (`job_reports.answered_change`): the
same `Change` the report's full check makes (`reported_change`), or the same refusal,
for any answer, valid or not."""

from __future__ import annotations

import random

import pytest

from fleet.errors import InvalidArgument
from fleet.v1 import daemon_pb2, jobs_pb2
from manager.service.job_reports import MAX_OUTPUT_CHUNK, answered_change, reported_change

JOB = "20261207-130000-000-a1b2c3"
_TEXT = 'ab Z_-/"\\\t\n\x01\u00e9\u2028\u4e2d\U0001f600'
_NUMBERS = [*jobs_pb2.JobTargetState.values(), 99]
_ENDS = [jobs_pb2.JOB_TARGET_STATE_SUCCESS, jobs_pb2.JOB_TARGET_STATE_FAILED]


def _text(rng: random.Random, longest: int) -> str:
    if rng.random() < 0.03:
        return "r" * rng.choice([63, 64, 4095, 4096, 4097, 5000])
    text = "".join(rng.choice(_TEXT) for _ in range(rng.randint(0, longest)))
    return text + "\x00" if rng.random() < 0.02 else text


def _state(rng: random.Random) -> int:
    return rng.choice(_NUMBERS) if rng.random() < 0.1 else rng.choice(_ENDS)


def _time(rng: random.Random) -> int:
    if rng.random() < 0.05:
        return rng.choice([0, 1, 1_765_000_000_000, 2**62, -1])
    return rng.randint(0, 2**45)


def _end(rng: random.Random) -> daemon_pb2.JobEnd:
    count = rng.choice([0, 1, 1, 1, 2, 3]) if rng.random() < 0.97 else rng.choice([100, 101])
    steps = [
        jobs_pb2.JobStepResult(
            index=rng.choice([i, rng.randint(-3, 200)]),
            name=_text(rng, 80),
            state=_state(rng),
            exit_code=rng.choice([0, 1, -9, 255, 2**31 - 1]),
            started_at=_time(rng),
            ended_at=_time(rng),
            reason=_text(rng, 20),
        )
        for i in range(count)
    ]
    size = (
        rng.choice([0, 3])
        if rng.random() < 0.99
        else rng.choice([MAX_OUTPUT_CHUNK, MAX_OUTPUT_CHUNK + 1])
    )
    return daemon_pb2.JobEnd(
        state=_state(rng),
        exit_code=rng.choice([0, 1, -15]),
        started_at=_time(rng),
        ended_at=_time(rng),
        reason=_text(rng, 30),
        steps=steps,
        output=b"x" * size,
    )


def _full(end: daemon_pb2.JobEnd) -> object:
    try:
        return reported_change(
            "n1", JOB, end, output_bytes=len(end.output), output=end.output, bound=4096
        )
    except InvalidArgument as exc:
        return ("refused", exc.message, exc.field)


def _fast(end: daemon_pb2.JobEnd) -> object:
    try:
        return answered_change("n1", JOB, end, bound=4096)
    except InvalidArgument as exc:
        return ("refused", exc.message, exc.field)


def test_an_answered_end_is_the_reports_change_or_refusal() -> None:
    rng = random.Random(1407)
    made = refused = 0
    for _ in range(4000):
        end = _end(rng)
        want = _full(end)
        assert _fast(end) == want, end
        if isinstance(want, tuple):
            refused += 1
        else:
            made += 1
    # Both ways were exercised.
    assert made > 1000
    assert refused > 500


def test_a_plain_answer() -> None:
    """`true`'s end as a daemon answers it: one step, SUCCESS, no output."""
    end = daemon_pb2.JobEnd(
        state=jobs_pb2.JOB_TARGET_STATE_SUCCESS,
        started_at=1_765_000_000_000,
        ended_at=1_765_000_000_004,
        steps=[
            jobs_pb2.JobStepResult(
                index=0,
                name="true",
                state=jobs_pb2.JOB_TARGET_STATE_SUCCESS,
                started_at=1_765_000_000_000,
                ended_at=1_765_000_000_004,
            )
        ],
    )
    change = answered_change("n1", JOB, end, bound=4096)
    assert change == _full(end)
    assert change.kind == "ended"
    assert change.output == b""
    assert change.output_bytes == 0
    assert change.steps == (
        '[{"index":0,"name":"true","state":"SUCCESS","exit_code":0,'
        '"started_ms":1765000000000,"ended_ms":1765000000004,"reason":""}]'
    )


def test_a_running_end_is_refused() -> None:
    end = daemon_pb2.JobEnd(state=jobs_pb2.JOB_TARGET_STATE_RUNNING)
    with pytest.raises(InvalidArgument, match="an end must be a final state"):
        answered_change("n1", JOB, end, bound=64)
