"""Protobuf messages as JSON: the proto3 JSON mapping, fast enough for 20,000 agents.

Requests are parsed with `google.protobuf.json_format` (small, and its
errors name the field). Responses are written by `message_to_dict`, which
gives exactly `json_format.MessageToDict`'s output (lowerCamel names, enum
names, 64-bit integers as strings, bytes as base64, default values left
out, fields in number order), and `encode_message` writes it as JSON
bytes about four times as fast as json_format and orjson (0.10 s against
0.42 s for the 20,000 agents of a ListAgents, which spent more time in
json_format than in the whole gRPC call; bench/http_api.py,
docs/benchmarks.md).

The speed comes from a writer per message type, generated once from its
descriptor as straight-line Python (`_writer`): one attribute read and one
test per field, and direct calls to the writers of nested types, where a
generic walk pays for `ListFields()`, a lookup and an indirect call per set
field. Well-known types (none in fleet.v1 today) are handed to
json_format, which knows their special forms. tests/fuzz/test_http_codec.py
compares the output with json_format on generated messages of every
FleetService type.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import json
import keyword
import math
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.internal import type_checkers
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from fleet.errors import InvalidArgument

__all__ = ["encode", "encode_message", "message_to_dict", "parse_request"]

_F = FieldDescriptor
_INT64 = {_F.CPPTYPE_INT64, _F.CPPTYPE_UINT64}
_FLOATS = {_F.CPPTYPE_DOUBLE, _F.CPPTYPE_FLOAT}
_Convert = Callable[[Any], Any]
_Writer = Callable[[Any], dict[str, Any]]
_writers: dict[type[Message], _Writer] = {}
# One module-level cache: descriptors are immutable and process-wide, so the writers are too.


def _double(value: float) -> Any:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _float(value: float) -> Any:
    special = _double(value)
    return special if isinstance(special, str) else type_checkers.ToShortestFloat(value)


def _bytes(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


class _EnumNames(dict[int, Any]):
    """An enum's number -> name; an unknown number stays a number, as json_format writes it."""

    def __missing__(self, number: int) -> int:
        return number


def _map_key(key: Any) -> str:
    if isinstance(key, bool):
        return "true" if key else "false"
    return str(key)


def _value(field: FieldDescriptor) -> _Convert | None:
    """How one value of `field` becomes JSON; None when it is JSON already."""
    cpp = field.cpp_type
    if cpp == _F.CPPTYPE_MESSAGE:
        assert field.message_type is not None
        return _writer(GetMessageClass(field.message_type))
    if cpp == _F.CPPTYPE_ENUM:
        assert field.enum_type is not None
        return _EnumNames({v.number: v.name for v in field.enum_type.values}).__getitem__
    if cpp in _INT64:
        return str
    if field.type == _F.TYPE_BYTES:
        return _bytes
    if cpp == _F.CPPTYPE_DOUBLE:
        return _double
    if cpp == _F.CPPTYPE_FLOAT:
        return _float
    return None  # string, bool, 32-bit integers


def _map(field: FieldDescriptor) -> _Convert:
    assert field.message_type is not None
    key = field.message_type.fields_by_name["key"]
    convert = _value(field.message_type.fields_by_name["value"])
    # Comprehensions over the keys: dict(m) goes through the Mapping ABC's Python
    # methods, twice as slow on upb's maps.
    if key.cpp_type == _F.CPPTYPE_STRING:  # labels and attributes: the keys are JSON already
        if convert is None:
            return lambda m: {k: m[k] for k in m}
        return lambda m: {k: convert(m[k]) for k in m}
    if convert is None:
        return lambda m: {_map_key(k): m[k] for k in m}
    return lambda m: {_map_key(k): convert(m[k]) for k in m}


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _source(descriptor: Any, namespace: dict[str, Any]) -> str:
    """The writer of `descriptor`'s messages as Python source; fills `namespace` with what
    it calls (``c<number>``: the field's converter).

    For ``AgentInfo`` it reads::

        def write(m):
            out = {}
            v = m.id
            if v:
                out['id'] = v
            v = m.status
            if v:
                out['status'] = c3(v)
            ...
            if m.HasField('last_exit'):
                v = m.last_exit
                out['lastExit'] = c15(v)
            ...
            return out

    A field is written when `ListFields()` would list it, which is what json_format
    writes: with presence (messages, oneof members, `optional`) when set, repeated
    fields and maps when not empty, other scalars when not zero -- and -0.0, whose
    bits are not zero.
    """
    lines = ["def write(m):", "    out = {}"]
    for field in sorted(descriptor.fields, key=lambda f: f.number):
        name, key, c = field.name, repr(field.json_name), f"c{field.number}"
        read = f"getattr(m, {name!r})" if keyword.iskeyword(name) else f"m.{name}"
        convert: _Convert | None
        if _is_map(field):
            convert, value = _map(field), f"{c}(v)"
        else:
            convert = _value(field)
            if field.is_repeated:
                value = "list(v)" if convert is None else f"[{c}(x) for x in v]"
            else:
                value = "v" if convert is None else f"{c}(v)"
        if convert is not None:
            namespace[c] = convert
        if field.has_presence:
            lines += [f"    if m.HasField({name!r}):", f"        v = {read}"]
        else:
            scalar_float = field.cpp_type in _FLOATS and not field.is_repeated
            test = "v or _copysign(1.0, v) < 0" if scalar_float else "v"
            lines += [f"    v = {read}", f"    if {test}:"]
        lines.append(f"        out[{key}] = {value}")
    lines.append("    return out")
    return "\n".join(lines) + "\n"


def _writer(cls: type[Message]) -> _Writer:
    """The function writing `cls`'s messages as json_format.MessageToDict does (cached)."""
    writer = _writers.get(cls)
    if writer is not None:
        return writer
    descriptor = cls.DESCRIPTOR
    if descriptor.full_name.startswith("google.protobuf."):
        _writers[cls] = json_format.MessageToDict
        return json_format.MessageToDict
    # A type nested in itself (directly or further down) calls its own writer through
    # this: the real one once it is made (and made again should making it have failed).
    _writers[cls] = lambda m: _writer(cls)(m)
    namespace: dict[str, Any] = {"_copysign": math.copysign}
    try:
        source = _source(descriptor, namespace)
        code = compile(source, f"<fleet.protojson writer of {descriptor.full_name}>", "exec")
        exec(code, namespace)  # noqa: S102 -- source made above from the descriptor only
    except BaseException:
        del _writers[cls]
        raise
    made: _Writer = namespace["write"]
    _writers[cls] = made
    return made


def message_to_dict(message: Message) -> dict[str, Any]:
    """`message` in the proto3 JSON mapping, as `json_format.MessageToDict(message)`."""
    writer = _writers.get(type(message))
    if writer is None:
        writer = _writer(type(message))
    return writer(message)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside (if it was on, it is on again after).

    For building a large answer's dicts and writing them out: the dicts hold no
    cycles and are freed by reference counting at the end. Left on, the collector
    runs every 700 of them, scanning them again each time, and moves those alive into
    older generations, whose growth then triggers full collections of the whole
    process's heap (tens of milliseconds in a manager) for nothing.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def encode(obj: Any) -> bytes:
    """Compact UTF-8 JSON of `obj` (a dict from `message_to_dict` or an error body).

    orjson: several times json.dumps's speed on a large answer. It would write NaN as
    null, but `message_to_dict` has already made non-finite floats strings.
    """
    return orjson.dumps(obj)


def encode_message(message: Message) -> bytes:
    """`encode(message_to_dict(message))`, with garbage collection paused meanwhile."""
    with _gc_paused():
        return orjson.dumps(message_to_dict(message))


def parse_request(body: bytes, message_type: type[Message]) -> Message:
    """The request `body` (proto3 JSON) as a `message_type`; InvalidArgument naming what is wrong.

    An empty body is the empty message, as gRPC's zero-length request.
    Unknown fields are refused (a typo must not pass as a default value).
    """
    message = message_type()
    if not body.strip():
        return message
    try:
        obj = json.loads(body)
    except UnicodeDecodeError:
        raise InvalidArgument("the request body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InvalidArgument(
            f"the request body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(obj, dict):
        raise InvalidArgument(
            f"the request body must be a JSON object (a {message_type.DESCRIPTOR.name}),"
            f" not {type(obj).__name__}"
        )
    try:
        json_format.ParseDict(obj, message)
    except json_format.ParseError as exc:
        raise InvalidArgument(
            f"the request body is not a {message_type.DESCRIPTOR.name}: {exc}"
        ) from None
    return message
