"""A stored target as its message (`fleet_jobs.target_message`): every field the
record has, whether the target is fresh (the short way) or has a history."""

from __future__ import annotations

import json
import random
from typing import TypeVar

from fleet.v1 import jobs_pb2
from manager.servicers.fleet_jobs import pending_reason, target_message
from manager.storage.jobs import JobTargetRecord

V = TypeVar("V")
STATES = ["PENDING", "QUEUED", "RUNNING", "SUCCESS", "FAILED", "TIMEOUT", "CANCELLED"]


def _expected(t: JobTargetRecord) -> jobs_pb2.JobTarget:
    """Field by field, as the API documents the target."""
    steps = json.loads(t.steps) if t.steps else []
    return jobs_pb2.JobTarget(
        node_id=t.node_id,
        state=jobs_pb2.JobTargetState.Value(f"JOB_TARGET_STATE_{t.state}"),
        exit_code=t.exit_code,
        started_at=t.started_ms,
        ended_at=t.ended_ms,
        reason=t.reason or pending_reason(t),
        steps=[
            jobs_pb2.JobStepResult(
                index=s["index"],
                name=s["name"],
                state=jobs_pb2.JobTargetState.Value(f"JOB_TARGET_STATE_{s['state']}"),
                exit_code=s["exit_code"],
                started_at=s["started_ms"],
                ended_at=s["ended_ms"],
                reason=s["reason"],
            )
            for s in steps
        ],
        output_bytes=t.output_bytes,
        output_stored_bytes=t.output_stored_bytes,
        output_truncated=t.truncated,
        stage=t.stage,
    )


def _record(rng: random.Random) -> JobTargetRecord:
    """A target with each field set one time in five, else at its default."""

    def maybe(value: V, default: V) -> V:
        return value if rng.random() < 0.2 else default

    state = rng.choice(STATES)
    step = {
        "index": 0,
        "name": "s",
        "state": state,
        "exit_code": 1,
        "started_ms": 5,
        "ended_ms": 6,
        "reason": "r",
    }
    return JobTargetRecord(
        "job",
        f"n{rng.randrange(1000)}",
        idx=rng.randrange(10),
        stage=rng.choice([0, 1]),
        state=state,
        exit_code=maybe(rng.choice([-9, 1, 2]), 0),
        started_ms=maybe(1000, 0),
        ended_ms=maybe(2000, 0),
        reason=maybe("exit status 1", ""),
        steps=maybe(json.dumps([step]), rng.choice(["[]", ""])),
        output_bytes=maybe(10, 0),
        output_stored_bytes=maybe(8, 0),
        truncated=maybe(True, False),
        attempts=maybe(2, 0),
        last_error=maybe("refused", ""),
    )


def test_every_target_says_what_its_record_says() -> None:
    """On 5,000 random records, fresh ones (nothing but their node, state and stage)
    among them, the message equals the one built field by field, a PENDING target's
    delivery attempts included."""
    rng = random.Random(14)
    fresh = 0
    for _ in range(5000):
        t = _record(rng)
        message = target_message(t)
        assert message == _expected(t), t
        fresh += message == jobs_pb2.JobTarget(
            node_id=t.node_id, state=message.state, stage=t.stage
        )
    assert fresh > 100
