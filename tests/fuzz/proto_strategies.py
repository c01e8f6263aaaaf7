"""Hypothesis strategies for any protobuf message, derived from its descriptor.

Every field gets hostile and plausible values: strings that are empty, any
unicode, identifier-like (so validation gets past the first field), or
oversized; integers at their type's boundaries and epoch milliseconds near
now; floats including NaN and infinities; enums with known and unknown
numbers; nested messages (bounded depth), repeated fields and maps.
`overrides` steers single fields (by full name, e.g.
"fleet.v1.HeartbeatRequest.node_id") so most requests speak for the caller.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

__all__ = ["NOW_MS", "message", "mostly", "near", "plausible_text", "requests", "text"]

NOW_MS = int(time.time() * 1000)
"""Epoch milliseconds when the strategies were built (timestamps cluster around it)."""

_T = FieldDescriptor
_INT_RANGES = {
    _T.TYPE_INT32: (-(2**31), 2**31 - 1),
    _T.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _T.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    _T.TYPE_INT64: (-(2**63), 2**63 - 1),
    _T.TYPE_SINT64: (-(2**63), 2**63 - 1),
    _T.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    _T.TYPE_UINT32: (0, 2**32 - 1),
    _T.TYPE_FIXED32: (0, 2**32 - 1),
    _T.TYPE_UINT64: (0, 2**64 - 1),
    _T.TYPE_FIXED64: (0, 2**64 - 1),
}

plausible_text = st.builds(
    str.__add__,
    st.sampled_from("abcdefghijklmnopqrstuvwxyz"),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789._-", max_size=20),
)
"""Identifier-like: passes most name checks, so validation goes deeper."""

text: st.SearchStrategy[str] = st.one_of(
    st.just(""),
    plausible_text,
    st.text(st.characters(codec="utf-8"), max_size=40),  # any unicode a client can encode
    st.sampled_from(
        [
            "a" * 63,
            "a" * 64,
            "a" * 253,
            "a" * 254,
            " ",
            "..",
            "a/b",
            "-a",
            "\x00",
            "é",
            "\U0001f600",
        ]
    ),
    st.integers(65, 5000).map(lambda n: "x" * n),  # past every field's length limit
)
"""Any string a client could send."""


def mostly(value: Any, other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`value` about three times in four, else something from `other`."""
    return st.one_of(st.just(value), st.just(value), st.just(value), other)


def _integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = sorted(
        {v for v in (lo, lo + 1, -1, 0, 1, 2**31 - 1, 2**31, hi - 1, hi) if lo <= v <= hi}
    )
    parts = [
        st.sampled_from(edges),
        st.integers(lo, hi),
        st.integers(max(lo, -1000), min(hi, 1000)),
    ]
    if lo <= NOW_MS <= hi:
        parts.append(st.integers(NOW_MS - 3_600_000, NOW_MS + 600_000))
    return st.one_of(parts)


_floats = st.one_of(
    st.floats(),  # includes NaN, +-inf, subnormals
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1e308, -1e308, 5e-324]),
    st.floats(0, 100),
)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t in _INT_RANGES:
        return _integers(*_INT_RANGES[t])
    if t == _T.TYPE_STRING:
        return text
    if t == _T.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.binary(max_size=64).map(lambda b: b * 100))
    if t == _T.TYPE_BOOL:
        return st.booleans()
    if t in (_T.TYPE_DOUBLE, _T.TYPE_FLOAT):
        return _floats if t == _T.TYPE_DOUBLE else st.floats(width=32)
    if t == _T.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    raise TypeError(f"no strategy for field {field.full_name} (type {t})")


def _value(
    field: FieldDescriptor, overrides: Mapping[str, st.SearchStrategy[Any]], depth: int
) -> st.SearchStrategy[Any]:
    """One element of `field` (ignoring repetition)."""
    if field.type == _T.TYPE_MESSAGE:
        return message(field.message_type, overrides, depth=depth + 1)
    return _scalar(field)


def _field(
    field: FieldDescriptor, overrides: Mapping[str, st.SearchStrategy[Any]], depth: int
) -> st.SearchStrategy[Any]:
    if field.full_name in overrides:
        return overrides[field.full_name]
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        entry = field.message_type.fields_by_name
        return st.dictionaries(
            _value(entry["key"], overrides, depth),
            _value(entry["value"], overrides, depth),
            max_size=5,
        )
    if field.is_repeated:
        return st.lists(_value(field, overrides, depth), max_size=4)
    if field.type == _T.TYPE_MESSAGE:
        return st.none() | _value(field, overrides, depth)
    return _value(field, overrides, depth)


def message(
    descriptor: Descriptor,
    overrides: Mapping[str, st.SearchStrategy[Any]] | None = None,
    *,
    depth: int = 0,
) -> st.SearchStrategy[Message]:
    """Messages of type `descriptor`; nested messages stop at depth 3 (left unset)."""
    overrides = overrides or {}
    cls = GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())
    fields = {f.name: _field(f, overrides, depth) for f in descriptor.fields}

    def build(values: dict[str, Any]) -> Message:
        return cls(**{k: v for k, v in values.items() if v is not None})

    return st.fixed_dictionaries(fields).map(build)


def near(
    base: Message,
    overrides: Mapping[str, st.SearchStrategy[Any]] | None = None,
    *,
    max_changes: int = 2,
) -> st.SearchStrategy[Message]:
    """`base` (a valid request) with up to `max_changes` fields replaced by fuzzed values.

    Mostly-valid requests get past the first check, so the deeper checks and
    the accepted paths (which write) are exercised too.
    """
    overrides = overrides or {}
    desc = base.DESCRIPTOR
    if not desc.fields:
        return st.just(base)
    cls = type(base)

    def changed(values: dict[str, Any]) -> Message:
        out = cls()
        out.CopyFrom(base)
        for name, value in values.items():
            out.ClearField(name)
            if value is not None:
                out.MergeFrom(cls(**{name: value}))
        return out

    def fuzzed(name: str) -> st.SearchStrategy[Any]:
        field = desc.fields_by_name[name]
        anything = _field(field, overrides, 0)
        if field.full_name in overrides or field.message_type is None:
            return anything
        if field.message_type.GetOptions().map_entry:
            return anything
        value = getattr(base, name)
        if field.is_repeated and len(value):  # the first element, nearly valid
            rest = list(value)[1:]
            return st.one_of(anything, near(value[0], overrides).map(lambda m: [m, *rest]))
        if not field.is_repeated and base.HasField(name):
            return st.one_of(anything, near(value, overrides))
        return anything

    def fields(names: frozenset[str]) -> st.SearchStrategy[dict[str, Any]]:
        return st.fixed_dictionaries({n: fuzzed(n) for n in sorted(names)})

    names = [f.name for f in desc.fields]
    # One field most of the time: a request with one bad field tests that field's check.
    one = st.sampled_from(names).map(lambda n: frozenset([n]))
    some = st.frozensets(st.sampled_from(names), min_size=1, max_size=max_changes)
    return st.one_of(one, one, some).flatmap(fields).map(changed)


def requests(
    base: Message, overrides: Mapping[str, st.SearchStrategy[Any]] | None = None
) -> st.SearchStrategy[Message]:
    """Half anything of `base`'s type, half `base` with a few fields fuzzed."""
    return st.one_of(message(base.DESCRIPTOR, overrides), near(base, overrides))
