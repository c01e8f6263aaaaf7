"""The HTTP API's JSON writer gives exactly json_format's output, for every FleetService type."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st
from proto_strategies import message

from fleet.protojson import encode, message_to_dict, parse_request
from fleet.v1 import fleet_pb2

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
    """Any message of the type: the fast writer's dict is json_format.MessageToDict's."""
    msg: Message = data.draw(message(descriptor))  # type: ignore[arg-type]
    assert _same_json(message_to_dict(msg), json_format.MessageToDict(msg)), name


@pytest.mark.parametrize(("name", "descriptor"), _TYPES[:8], ids=[n for n, _ in _TYPES[:8]])
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_written_json_parses_back(name: str, descriptor: object, data: st.DataObject) -> None:
    """What the writer produced parses back (as a request body) into the same message."""
    msg: Message = data.draw(message(descriptor))  # type: ignore[arg-type]
    back = parse_request(encode(message_to_dict(msg)), type(msg))
    assert json.loads(encode(message_to_dict(back))) == json.loads(encode(message_to_dict(msg)))
