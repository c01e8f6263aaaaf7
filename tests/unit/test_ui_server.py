"""fleetctl ui's pure parts: the one-time secret and the Host names it answers to."""

from __future__ import annotations

import socket

import pytest

from fleetctl.ui.app import Sessions
from fleetctl.ui.command import allowed_hosts, is_loopback


def test_the_secret_opens_one_session_only() -> None:
    sessions = Sessions()
    assert sessions.login("wrong") is None
    token = sessions.login(sessions.secret)
    assert token is not None
    assert sessions.valid(token)
    assert sessions.login(sessions.secret) is None, "a used secret must not open a second session"
    assert not sessions.valid("forged")
    assert not sessions.valid(None)


def test_a_wrong_guess_does_not_use_up_the_secret() -> None:
    sessions = Sessions()
    assert sessions.login(sessions.secret[:-1]) is None
    assert sessions.login(sessions.secret) is not None


@pytest.mark.parametrize(
    ("host", "expected"),
    [("127.0.0.1", True), ("::1", True), ("localhost", True), ("127.9.9.9", True),
     ("0.0.0.0", False), ("10.0.0.5", False), ("example.com", False)],
)  # fmt: skip
def test_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_loopback_listen_answers_to_loopback_names_only() -> None:
    hosts = allowed_hosts("127.0.0.1", 8080)
    assert hosts == {"127.0.0.1:8080", "localhost:8080", "[::1]:8080"}


def test_a_specific_address_is_added_and_ipv6_is_bracketed() -> None:
    assert "10.0.0.5:8080" in allowed_hosts("10.0.0.5", 8080)
    assert "[fd00::5]:8080" in allowed_hosts("fd00::5", 8080)


def test_a_wildcard_listen_answers_to_this_machines_names() -> None:
    hosts = allowed_hosts("0.0.0.0", 8080)
    assert f"{socket.gethostname().lower()}:8080" in hosts
    assert "evil.example:8080" not in hosts
