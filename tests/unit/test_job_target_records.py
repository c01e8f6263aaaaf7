"""The fast ways to make a target record (`target_record`, `new_target`, `target_with`)
give exactly what the frozen dataclass's own `__init__` and `dataclasses.replace` give."""

from __future__ import annotations

import dataclasses
import random
import string
from typing import Any

import pytest

from manager.storage.jobs import JobTargetRecord, new_target, target_record, target_with

FIELDS = dataclasses.fields(JobTargetRecord)


def _value(rng: random.Random, kind: object) -> object:
    if kind in (bool, "bool"):
        return rng.random() < 0.5
    if kind in (int, "int"):
        return rng.choice([0, 1, -9, rng.randrange(-(2**62), 2**62)])
    return "".join(rng.choices(string.printable + "é\u2028", k=rng.randrange(0, 12)))


def _values(rng: random.Random) -> list[object]:
    return [_value(rng, f.type) for f in FIELDS]


def test_target_record_equals_the_dataclass_made_the_usual_way() -> None:
    rng = random.Random(14)
    for _ in range(3000):
        values = _values(rng)
        fast, usual = target_record(values), JobTargetRecord(*values)  # type: ignore[arg-type]
        assert type(fast) is JobTargetRecord
        assert fast == usual
        assert hash(fast) == hash(usual)
        assert dataclasses.astuple(fast) == tuple(values)
        with pytest.raises(dataclasses.FrozenInstanceError):
            fast.state = "SUCCESS"  # type: ignore[misc]


def test_target_with_equals_dataclasses_replace() -> None:
    rng = random.Random(15)
    for _ in range(3000):
        values = _values(rng)
        record = target_record(values)
        names = rng.sample([f.name for f in FIELDS], rng.randrange(0, 6))
        changes: dict[str, Any] = {
            n: _value(rng, next(f.type for f in FIELDS if f.name == n)) for n in names
        }
        got = target_with(record, **changes)
        assert got == dataclasses.replace(record, **changes)
        assert got is not record
        assert dataclasses.astuple(record) == tuple(values)  # the original is unchanged


def test_new_target_is_a_pending_target_with_the_defaults() -> None:
    assert new_target("j", "n1", 7, 0, 1234) == JobTargetRecord(
        "j", "n1", idx=7, stage=0, updated_ms=1234
    )


def test_a_wrong_field_or_count_is_refused_by_name() -> None:
    record = new_target("j", "n1", 0, 1, 1)
    with pytest.raises(TypeError, match="no field \\['stat'\\]"):
        target_with(record, stat="SUCCESS")
    with pytest.raises(TypeError, match="19 fields, got 3"):
        target_record(["j", "n1", 0])
