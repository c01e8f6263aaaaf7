"""Several gRPC servers on server.listen (`[server] accept_loops`), real mTLS and SQLite.

grpc.aio takes one new call at a time per server, so the manager can start
several on the one port (SO_REUSEPORT): new connections are spread over
them by the kernel, and each takes calls on its own. These tests check that
streams land on more than one of them and are all served as by one, and
that a second manager on the same port still fails with one clear line
(manager/port_claim.py).
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from control_end import ControlEnd, open_stream
from manager_harness import FakeClock, manager_config, running_manager
from sqlalchemy import text

from fleet.errors import ConfigError
from manager.port_claim import claim_port
from manager.server import ManagerServer

NODES = 24
"""Connections opened: the chance that all land on one of two servers is 2^-23."""


def taken(server: ManagerServer, loop: int) -> float:
    value = server.metrics.registry.get_sample_value(
        "fleet_manager_calls_accepted_total", {"loop": str(loop)}
    )
    return value or 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.parametrize("loops", [1, 2, 4])
async def test_streams_spread_over_the_accept_loops_and_are_all_served(
    pki: Any, database_url: str, tmp_path: Path, loops: int
) -> None:
    """Every node's stream is welcomed and registered; with K > 1 loops, more than one took."""
    config = manager_config(pki, database_url, tmp_path / "state", server={"accept_loops": loops})
    ends: list[ControlEnd] = []
    async with running_manager(config, FakeClock()) as manager:
        try:
            opened = await asyncio.gather(
                *(open_stream(pki, manager.port, f"node-{i}") for i in range(NODES))
            )
            ends.extend(end for end, _ in opened)
            assert all(first is not None and first.welcome.success for _, first in opened), [
                end.details for end, first in opened if first is None
            ]
            async with manager.db.engine.connect() as conn:
                online = (
                    await conn.execute(text("SELECT count(*) FROM nodes WHERE status='online'"))
                ).scalar_one()
            assert online == NODES
            assert all(manager.control_streams.get(f"node-{i}") for i in range(NODES))
            per_loop = [taken(manager, loop) for loop in range(loops)]
            assert sum(per_loop) >= NODES
            assert taken(manager, loops) == 0  # no more servers than configured
            if loops > 1:
                assert sum(1 for n in per_loop if n > 0) > 1, per_loop
        finally:
            for end in ends:
                await end.close()


@pytest.mark.parametrize("second_loops", [1, 2])
async def test_a_second_manager_on_the_same_port_fails_with_one_line(
    pki: Any, database_url: str, tmp_path: Path, second_loops: int
) -> None:
    """SO_REUSEPORT on the first manager's servers does not let a second one share its port."""
    first = manager_config(pki, database_url, tmp_path / "a", server={"accept_loops": 2})
    async with running_manager(first, FakeClock()) as manager:
        listen = f"127.0.0.1:{manager.port}"
        second = manager_config(
            pki,
            f"sqlite+aiosqlite:///{tmp_path / 'b.db'}",
            tmp_path / "b",
            server={"accept_loops": second_loops, "listen": listen},
        )
        with pytest.raises(ConfigError) as caught:
            await ManagerServer(second, clock=FakeClock()).start()
        assert str(caught.value) == (
            f"server.listen {listen}: cannot listen: address already in use"
            " (another process listens there)"
        )
        # The first one still serves every node that connects.
        end, hello = await open_stream(pki, manager.port, "node-1")
        try:
            assert hello is not None
            assert hello.welcome.success
        finally:
            await end.close()


async def test_the_port_claim_refuses_a_manager_that_starts_at_the_same_instant(
    pki: Any, database_url: str, tmp_path: Path
) -> None:
    """Two managers both past the listen check: the one without the claim fails, binds nothing.

    The claim is what a manager starting at the same instant as this one holds
    (both checks passed, neither has bound yet); it is released with the manager.
    """
    port = free_port()
    listen = f"127.0.0.1:{port}"
    config = manager_config(
        pki, database_url, tmp_path / "state", server={"accept_loops": 2, "listen": listen}
    )
    claim = claim_port(port, what="server.listen", address=listen)
    try:
        with pytest.raises(ConfigError) as caught:
            await ManagerServer(config, clock=FakeClock()).start()
        assert str(caught.value) == (
            f"server.listen {listen}: cannot listen: another manager on this host serves"
            f" port {port}"
        )
        with socket.create_server(("127.0.0.1", port)):
            pass  # nothing was left listening on the port
    finally:
        claim.close()
    # Stopped managers release the claim: the same port serves again, twice in a row.
    for _ in range(2):
        async with running_manager(config, FakeClock()) as manager:
            assert manager.port == port
            end, hello = await open_stream(pki, port, "node-1")
            try:
                assert hello is not None
                assert hello.welcome.success
            finally:
                await end.close()
