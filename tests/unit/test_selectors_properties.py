"""Property tests: random valid selectors round-trip and match like Kubernetes says."""

from __future__ import annotations

import re
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from fleet.selectors import Operator, from_proto, parse, to_proto
from fleet.v1 import common_pb2 as pb

_NAME = st.from_regex(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,6}[A-Za-z0-9])?", fullmatch=True)
_PREFIX = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,3}[a-z0-9])?(\.[a-z0-9]{1,3}){0,2}", fullmatch=True)
_KEY = st.one_of(
    st.sampled_from(["in", "notin", "env"]),
    _NAME,
    st.builds(lambda p, n: f"{p}/{n}", _PREFIX, _NAME),
)
_INT = st.one_of(st.integers(0, 20), st.integers(0, 2**63 - 1)).map(str)
_VALUE = st.one_of(st.just(""), st.sampled_from(["in", "notin"]), _NAME, _INT)
_OPS = ["=", "==", "!=", "in", "notin", "exists", "!", ">", "<"]
_PB_OP = {
    "=": pb.SELECTOR_OPERATOR_EQUALS,
    "==": pb.SELECTOR_OPERATOR_DOUBLE_EQUALS,
    "in": pb.SELECTOR_OPERATOR_IN,
    "!=": pb.SELECTOR_OPERATOR_NOT_EQUALS,
    "notin": pb.SELECTOR_OPERATOR_NOT_IN,
    "exists": pb.SELECTOR_OPERATOR_EXISTS,
    "!": pb.SELECTOR_OPERATOR_NOT_EXISTS,
    ">": pb.SELECTOR_OPERATOR_GT,
    "<": pb.SELECTOR_OPERATOR_LT,
}


@dataclass(frozen=True)
class Spec:
    """One generated requirement, as the user meant it."""

    key: str
    """Label key."""
    op: str
    """Operator as written in the string syntax ('exists' for a bare key)."""
    values: tuple[str, ...]
    """Values in the order and with the duplicates the user wrote."""


@st.composite
def specs(draw: st.DrawFn) -> list[Spec]:
    keys = draw(st.lists(_KEY, min_size=1, max_size=4, unique=True))
    result = []
    for _ in range(draw(st.integers(0, 6))):
        key, op = draw(st.sampled_from(keys)), draw(st.sampled_from(_OPS))
        if op in ("in", "notin"):
            values = tuple(draw(st.lists(_VALUE, min_size=1, max_size=4)))
        elif op in (">", "<"):
            values = (draw(_INT),)
        elif op in ("exists", "!"):
            values = ()
        else:
            values = (draw(_VALUE),)
        result.append(Spec(key, op, values))
    return result


def _spell(spec: Spec, space: str) -> str:
    """Write a requirement the way a person might, with the given spacing."""
    if spec.op == "exists":
        return spec.key
    if spec.op == "!":
        return f"!{space}{spec.key}"
    if spec.op in ("in", "notin"):
        return f"{spec.key} {spec.op}{space}({space}{f'{space},{space}'.join(spec.values)}{space})"
    return f"{spec.key}{space}{spec.op}{space}{spec.values[0]}"


def _text(items: list[Spec], space: str) -> str:
    return f"{space},{space}".join(_spell(s, space) for s in items)


def _proto(items: list[Spec]) -> pb.LabelSelector:
    return pb.LabelSelector(
        match_expressions=[
            pb.LabelSelectorRequirement(key=s.key, operator=_PB_OP[s.op], values=s.values)
            for s in items
        ]
    )


def _go_int(text: str) -> int | None:
    if not re.fullmatch(r"[+-]?[0-9]+", text) or not -(2**63) <= int(text) < 2**63:
        return None
    return int(text)


def _oracle(items: list[Spec], labels: dict[str, str]) -> bool:
    """selector.go's Requirement.Matches, written from its doc comment."""
    for s in items:
        present, value = s.key in labels, labels.get(s.key, "")
        if s.op in ("=", "==", "in"):
            ok = present and value in s.values
        elif s.op in ("!=", "notin"):
            ok = not present or value not in s.values
        elif s.op == "exists":
            ok = present
        elif s.op == "!":
            ok = not present
        else:
            have, want = _go_int(value), int(s.values[0])
            ok = present and have is not None and (have > want if s.op == ">" else have < want)
        if not ok:
            return False
    return True


@st.composite
def label_sets(draw: st.DrawFn, items: list[Spec]) -> dict[str, str]:
    keys = sorted({s.key for s in items} | {"other"})
    values = st.one_of(
        _VALUE,
        st.sampled_from([v for s in items for v in s.values] or [""]),
        st.sampled_from(["-5", "+5", "007", "1_0", " 3", "x"]),
    )
    return draw(st.dictionaries(st.sampled_from(keys), values, max_size=len(keys)))


_SPACE = st.sampled_from(["", " ", "  ", "\t", " \n "])


@given(specs(), _SPACE)
def test_canonical_string_round_trips(items: list[Spec], space: str) -> None:
    """parse(str(s)) == s and str is a fixed point, however the input was spaced."""
    selector = parse(_text(items, space))
    assert parse(str(selector)) == selector
    assert str(parse(str(selector))) == str(selector)
    assert parse(_text(items, "")) == selector


@given(specs(), _SPACE)
def test_each_operator_prints_as_written(items: list[Spec], space: str) -> None:
    """The canonical string keeps every requirement's operator, so re-parsing means the same."""
    written = {(s.key, Operator(s.op)) for s in items}
    printed = parse(str(parse(_text(items, space)))).requirements
    assert {(r.key, r.operator) for r in printed} == written


@given(specs())
def test_proto_round_trips(items: list[Spec]) -> None:
    """selector -> proto -> selector and back are identities, also through the wire."""
    selector = parse(_text(items, " "))
    msg = to_proto(selector)
    assert from_proto(pb.LabelSelector.FromString(msg.SerializeToString())) == selector
    assert to_proto(from_proto(msg)) == msg


@given(st.data(), specs())
def test_all_forms_match_like_kubernetes(data: st.DataObject, items: list[Spec]) -> None:
    """The parsed, re-parsed and proto forms all match exactly what selector.go would."""
    labels = data.draw(label_sets(items))
    expected = _oracle(items, labels)
    selector = parse(_text(items, " "))
    assert selector.matches(labels) is expected
    assert parse(str(selector)).matches(labels) is expected
    assert from_proto(to_proto(selector)).matches(labels) is expected
    assert from_proto(_proto(items)).matches(labels) is expected
