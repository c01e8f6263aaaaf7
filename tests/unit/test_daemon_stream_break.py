"""How the daemon's log words a live control stream's end: a pure function of gRPC's text."""

from __future__ import annotations

import pytest

from daemon.manager_link import stream_break

UNREACHABLE = (
    "unreachable, its keepalive ping unanswered for 5 s (network cut, or the manager host down)"
)


@pytest.mark.parametrize(
    ("error", "said"),
    [
        # What gRPC said, in a netns cable cut (grpcio 1.7x/1.8x), and its other wordings.
        ("UNAVAILABLE: Stream removed (recvmsg:Connection timed out (110))", UNREACHABLE),
        ("keepalive watchdog timeout", UNREACHABLE),
        ("UNAVAILABLE: ping timeout", UNREACHABLE),
        (
            "INTERNAL: Internal error from Core",
            "the control stream ended while the daemon was sending: the manager closed it or"
            " became unreachable (gRPC does not say which)",
        ),
        # Anything else the manager said stands, after our words.
        (
            "UNAVAILABLE: the manager is stopping",
            "the control stream ended: UNAVAILABLE: the manager is stopping",
        ),
    ],
)
def test_stream_break(error: str, said: str) -> None:
    assert stream_break(error, 5.0) == said
    assert "from Core" not in stream_break(error, 5.0)
