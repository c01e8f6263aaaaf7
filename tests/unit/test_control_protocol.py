"""The control channel's shared pieces: the method table and message pieces."""

from __future__ import annotations

import pytest

from fleet.control import (
    METHODS,
    RETRY_AFTER,
    RETRY_AFTER_MAX,
    Reassembler,
    pieces,
    retry_after,
    retry_after_metadata,
)
from fleet.v1 import daemon_pb2


def test_every_daemon_service_method_is_carried_with_its_types() -> None:
    """The table is the DaemonService of the descriptors, streaming flags included."""
    service = daemon_pb2.DESCRIPTOR.services_by_name["DaemonService"]
    assert set(METHODS) == {m.name for m in service.methods}
    assert METHODS["ListAgents"].request is daemon_pb2.ListAgentsRequest
    assert METHODS["ListAgents"].response is daemon_pb2.ListAgentsResponse
    assert not METHODS["ListAgents"].server_streaming
    assert METHODS["ReadAgentLog"].server_streaming
    assert METHODS["ReadJobOutput"].server_streaming


@pytest.mark.parametrize("size", [0, 1, 5, 6, 7, 100])
def test_pieces_join_back_to_the_message(size: int) -> None:
    """Pieces of at most `size` bytes, `more` on all but the last, join to the original."""
    data = bytes(range(256))[:size]
    parts = list(pieces(data, 3))
    assert all(len(p) <= 3 for p, _ in parts)
    assert [more for _, more in parts] == [True] * (len(parts) - 1) + [False]
    joiner = Reassembler(limit=1000)
    results = [joiner.add(p, more) for p, more in parts]
    assert results[:-1] == [None] * (len(parts) - 1)
    assert results[-1] == data


def test_a_message_over_the_limit_is_refused_and_forgotten() -> None:
    """Past the limit: ValueError, and the next message starts clean."""
    joiner = Reassembler(limit=4)
    assert joiner.add(b"abc", True) is None
    with pytest.raises(ValueError, match="larger than 4 bytes"):
        joiner.add(b"de", True)
    assert joiner.add(b"xy", False) == b"xy"


def test_pieces_refuse_a_zero_size() -> None:
    """A piece size below 1 is a programming error."""
    with pytest.raises(ValueError, match="size"):
        list(pieces(b"x", 0))


def test_retry_after_reads_the_refusals_hint_and_ignores_what_is_not_one() -> None:
    about = retry_after_metadata(2.3456)
    assert about == {RETRY_AFTER: "2346"}
    assert retry_after(about) == pytest.approx(2.346)
    assert retry_after(tuple(about.items())) == pytest.approx(2.346)  # a call's trailers
    assert retry_after(retry_after_metadata(-1.0)) == 0.0
    assert retry_after(retry_after_metadata(3600.0)) == RETRY_AFTER_MAX  # followed up to a cap
    assert retry_after({RETRY_AFTER: "soon"}) is None
    assert retry_after({RETRY_AFTER: "-5"}) is None
    assert retry_after({"fleet-resource-kind": "node"}) is None
    assert retry_after(None) is None
