"""fleet.listen: a listen address is checked before anything else, each refusal one line."""

from __future__ import annotations

import pytest

from fleet.errors import ConfigError
from fleet.listen import listen_sockets


def test_a_port_above_65535_is_refused_not_wrapped() -> None:
    """`fleetctl ui --listen 127.0.0.1:99999` is refused; getaddrinfo alone listened on 34463."""
    with pytest.raises(ConfigError) as info:
        listen_sockets("--listen", "127.0.0.1:99999")
    assert info.value.message == (
        "--listen '127.0.0.1:99999': port 99999 is out of range (0-65535)"
    )


def test_an_address_without_a_port_is_refused() -> None:
    """A missing port says what was expected."""
    with pytest.raises(ConfigError) as info:
        listen_sockets("--listen", "localhost")
    assert info.value.message == "--listen 'localhost': expected host:port"
