"""The HTTP API's JSON writer gives exactly json_format's output, for every FleetService type."""

from __future__ import annotations

import gc
import json
import math

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import given, settings
from hypothesis import strategies as st
from proto_strategies import message

from fleet.protojson import encode, encode_message, message_to_dict, parse_request
from fleet.v1 import common_pb2, desired_pb2, fleet_pb2

_SERVICE = fleet_pb2.DESCRIPTOR.services_by_name["FleetService"]
_TYPES = sorted(
    {m.output_type.full_name: m.output_type for m in _SERVICE.methods}.items()
    | {m.input_type.full_name: m.input_type for m in _SERVICE.methods}.items()
)


def _same_json(a: object, b: object) -> bool:
    # NaN != NaN; json_format writes it as the string "NaN", so compare the text.
    return encode(a) == encode(b)


@pytest.mark.parametrize(("name", "descriptor"), _TYPES, ids=[n for n, _ in _TYPES])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_message_to_dict_matches_json_format(
    name: str, descriptor: object, data: st.DataObject
) -> None:
    """Any message of the type: the fast writer's dict is json_format.MessageToDict's, and
    encode_message's bytes are that dict's JSON (same keys in the same order)."""
    msg: Message = data.draw(message(descriptor))  # type: ignore[arg-type]
    expected = json_format.MessageToDict(msg)
    assert _same_json(message_to_dict(msg), expected), name
    assert encode_message(msg) == encode(expected), name


@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        # Implicit presence: zero is left out, but -0.0 has bits set and is written.
        (common_pb2.Backoff(multiplier=-0.0, jitter=0.0), {"multiplier": -0.0}),
        (common_pb2.Backoff(multiplier=math.nan), {"multiplier": "NaN"}),
        # `optional` and oneof members: written when set, even to zero.
        (desired_pb2.UpdatePolicy(min_healthy_time_seconds=0.0), {"minHealthyTimeSeconds": 0.0}),
        (fleet_pb2.FleetServiceWatchEventsRequest(tail=0), {"tail": 0}),
        # A set but empty message is {}; an unknown enum number stays a number.
        (common_pb2.AgentInfo(last_exit=common_pb2.LastExit()), {"lastExit": {}}),
        (common_pb2.AgentInfo(status=99, config_version=2**64 - 1), None),
        (common_pb2.MetricData(values={"a": math.inf, "b": 0.0}), None),
    ],
    ids=["negative-zero", "nan", "optional-zero", "oneof-zero", "empty-message", "enum", "map"],
)
def test_presence_and_special_values_as_json_format(
    msg: Message, expected: dict[str, object] | None
) -> None:
    """The cases a writer reading fields one by one could get wrong, beside what fuzzing draws."""
    want = json_format.MessageToDict(msg)
    if expected is not None:
        assert encode(want) == encode(expected)  # the case is what it says
    assert encode(message_to_dict(msg)) == encode(want)
    assert encode_message(msg) == encode(want)


def _tree_class() -> type[Message]:
    """``message Tree { string from = 1; repeated Tree children = 2; Tree parent = 3; }``:
    a type nested in itself, with a field named by a Python keyword."""
    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="codec_tree.proto", package="codectest", syntax="proto3"
    )
    tree = proto.message_type.add(name="Tree")
    tree.field.add(name="from", json_name="from", number=1, type=F.TYPE_STRING, label=1)
    for name, number, label in (("children", 2, F.LABEL_REPEATED), ("parent", 3, 1)):
        tree.field.add(
            name=name,
            json_name=name,
            number=number,
            type=F.TYPE_MESSAGE,
            label=label,
            type_name=".codectest.Tree",
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return GetMessageClass(pool.FindMessageTypeByName("codectest.Tree"))


def test_a_type_nested_in_itself_and_keyword_field_names() -> None:
    """A recursive type is written to any depth; a field named `from` is read and written."""
    tree = _tree_class()
    msg = tree(**{"from": "root"})
    msg.children.add(**{"from": "a"}).children.add(**{"from": "b"})
    msg.parent.SetInParent()
    want = json_format.MessageToDict(msg)
    assert want == {
        "from": "root",
        "children": [{"from": "a", "children": [{"from": "b"}]}],
        "parent": {},
    }
    assert message_to_dict(msg) == want


def test_encode_message_leaves_the_collector_as_it_was() -> None:
    """encode_message pauses garbage collection while it writes, then turns it back on, and
    never turns it on when the caller had it off."""
    msg = common_pb2.AgentInfo(id="web")
    assert gc.isenabled()
    assert json.loads(encode_message(msg)) == {"id": "web"}
    assert gc.isenabled()
    gc.disable()
    try:
        encode_message(msg)
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize(("name", "descriptor"), _TYPES[:8], ids=[n for n, _ in _TYPES[:8]])
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_written_json_parses_back(name: str, descriptor: object, data: st.DataObject) -> None:
    """What the writer produced parses back (as a request body) into the same message."""
    msg: Message = data.draw(message(descriptor))  # type: ignore[arg-type]
    back = parse_request(encode_message(msg), type(msg))
    assert json.loads(encode_message(back)) == json.loads(encode_message(msg))
