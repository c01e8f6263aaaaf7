"""Pure pieces of the daemon's control channel: credit, deadlines, the manager's identity,
the command context, and the listen/control_stream config rule."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest

from daemon.commands import CommandContext, Credit, _Abort, command_deadline
from daemon.config import DaemonConfig, ManagerLinkConfig
from daemon.control import manager_auth
from daemon.tlsfiles import DaemonTLSConfig
from fleet.tls import identity_from_auth_context


def test_credit_starts_at_one_at_least_and_grows_with_grants() -> None:
    """0 on the first piece means 1; each take uses one; a grant adds; none left is False."""
    credit = Credit.first(0)
    assert credit.take()
    assert not credit.take()
    credit.grant(2)
    assert credit.take()
    assert credit.take()
    assert not credit.take()
    assert Credit.first(5).available == 5


def test_credit_is_capped_and_ignores_negative_grants() -> None:
    """A manager granting without end cannot grow it past 2**32."""
    credit = Credit.first(1)
    for _ in range(3):
        credit.grant(2**32 - 1)
    assert credit.available == 2**32
    credit.grant(-5)
    assert credit.available == 2**32


def test_deadline_from_the_first_piece() -> None:
    """timeout 0 is no deadline; otherwise received + timeout; nonsense is ValueError."""
    assert command_deadline(100.0, 0.0) is None
    assert command_deadline(100.0, 2.5) == 102.5
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="timeout_seconds"):
            command_deadline(100.0, bad)


def test_the_manager_identity_is_what_the_dialled_name_proves() -> None:
    """manager.<td> is a manager; <name>.<role>.<td> that identity; anything else none."""
    td = "fleet.local"
    assert identity_from_auth_context(manager_auth(f"manager.{td}", td)).role == "manager"
    named = identity_from_auth_context(manager_auth(f"m1.manager.{td}", td))
    assert (named.role, named.name) == ("manager", "m1")
    node = identity_from_auth_context(manager_auth(f"n2.node.{td}", td))
    assert node.role == "node"  # the handlers' manager check refuses it
    assert manager_auth("example.com", td) == {}
    assert manager_auth("m1.manager.other.domain", td) == {}


async def test_context_abort_and_time_remaining() -> None:
    """abort raises with the code; time_remaining counts down to 0, None without a deadline."""
    ctx = CommandContext({}, None, "127.0.0.1:1")
    assert ctx.time_remaining() is None
    with pytest.raises(_Abort) as info:
        await ctx.abort(grpc.StatusCode.NOT_FOUND, "no such agent")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert CommandContext({}, 0.0, "").time_remaining() == 0.0


def test_no_listen_needs_the_control_stream(tmp_path: Path) -> None:
    """listen = "" with control_stream = false would leave the node unreachable: refused."""
    tls = DaemonTLSConfig(tmp_path / "ca", tmp_path / "c", tmp_path / "k")
    cfg = DaemonConfig(tls=tls, listen="", manager=ManagerLinkConfig(control_stream=False))
    with pytest.raises(ValueError, match="control_stream"):
        cfg.validate()
    DaemonConfig(tls=tls, listen="").validate()
    with pytest.raises(ValueError, match="advertise"):
        DaemonConfig(tls=tls, listen="", advertise="h:1").validate()
