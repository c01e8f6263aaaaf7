"""The daemon pool's channels: lazy, one connection each, identity checked, moves, cert reload."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from test_pool_support import (
    MakePool,
    S,
    StartDaemon,
)

from fleet import errors
from fleet.pki import CertificateAuthority
from fleet.tls import TLSConfig
from manager.pool import WrongDaemonIdentity


async def test_channel_is_opened_on_first_call(
    start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """No channel exists until a daemon is first called; then it is READY."""
    daemon = await start_daemon("node-1")
    pool = make_pool()
    assert pool.open_channels == 0
    assert pool.state("node-1") is S.IDLE
    assert pool.stats() == {}

    reply = await pool.list_agents("node-1", daemon.address)

    assert [a.id for a in reply.agents] == ["node-1-web"]
    assert pool.open_channels == 1
    async with asyncio.timeout(5):
        await pool.wait_for_state("node-1", S.READY)
    stats = pool.stats()["node-1"]
    assert (stats.calls, stats.failures, stats.connections) == (1, 0, 1)
    assert stats.history[:3] == (S.IDLE, S.CONNECTING, S.READY)


async def test_every_daemon_gets_its_own_connection(
    start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """Many calls to three daemons use exactly one connection (client port) per daemon."""
    daemons = [await start_daemon(f"node-{i}") for i in range(3)]
    pool = make_pool()

    await asyncio.gather(
        *(pool.list_agents(d.node_id, d.address) for d in daemons for _ in range(5))
    )
    await asyncio.gather(*(pool.list_agents(d.node_id, d.address) for d in daemons))

    ports = [d.client_ports for d in daemons]
    assert all(len(p) == 1 for p in ports), ports
    assert len(set.union(*ports)) == 3
    assert pool.connections_opened == 3
    args = {dict(s.channel_args)["fleet.node_id"] for s in pool.stats().values()}
    assert args == {"node-0", "node-1", "node-2"}


async def test_two_nodes_at_one_address_do_not_share_a_connection(
    pki: Any, start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """Two node ids served at the same address still get two separate connections."""
    both = pki.issue("node", "node-a", hostnames=["node-b.node.fleet.local"])
    daemon = await start_daemon("node-a", tls=both)
    pool = make_pool()

    await pool.list_agents("node-a", daemon.address)
    await pool.list_agents("node-b", daemon.address)
    await pool.list_agents("node-a", daemon.address)

    assert len(daemon.client_ports) == 2
    assert pool.connections_opened == 2


async def test_daemon_with_another_nodes_certificate_is_refused(
    pki: Any, start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """A daemon presenting node-3's certificate where node-7 was meant fails clearly, untried."""
    impostor = await start_daemon("node-3")
    pool = make_pool()

    with pytest.raises(WrongDaemonIdentity) as info:
        await pool.list_agents("node-7", impostor.address)

    assert str(info.value) == (
        f"node-7 at {impostor.address} presented a certificate that is not node/node-7"
    )
    assert isinstance(info.value, errors.Unavailable)
    assert impostor.servicer.calls == []
    assert pool.stats()["node-7"].retries == 0
    assert pool.state("node-7") is S.IDLE  # no handshakes with the impostor in the background
    assert pool.open_channels == 0


async def test_daemon_certificate_from_another_ca_is_refused(
    tmp_path: Any, start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """A daemon whose certificate another CA signed is refused, naming the fleet CA."""
    foreign = CertificateAuthority.create().issue("node", "node-7").write(tmp_path / "foreign")
    daemon = await start_daemon("node-7", tls=foreign)
    pool = make_pool()

    with pytest.raises(WrongDaemonIdentity, match="not signed by the fleet CA"):
        await pool.list_agents("node-7", daemon.address)
    assert daemon.servicer.calls == []


async def test_new_address_replaces_the_channel(
    pki: Any, start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """A node re-registered at a new address is called there; the old channel is closed."""
    old = await start_daemon("node-1")
    new = await start_daemon("node-1", tls=pki.issue("node", "node-1"))
    pool = make_pool()
    await pool.list_agents("node-1", old.address)

    await pool.list_agents("node-1", new.address)

    assert (len(old.servicer.calls), len(new.servicer.calls)) == (1, 1)
    assert pool.open_channels == 1
    assert pool.stats()["node-1"].address == new.address
    assert pool.channels_opened == 2


async def test_call_in_flight_on_a_replaced_channel_completes(
    pki: Any, start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """A call already running when the node moves still gets its answer from the old address."""
    old = await start_daemon("node-1", stall=0.5)
    new = await start_daemon("node-1", tls=pki.issue("node", "node-1"))
    pool = make_pool()
    running = asyncio.create_task(pool.list_agents("node-1", old.address))
    async with asyncio.timeout(5):
        await old.servicer.entered.wait()  # the slow call has reached the old daemon

    await pool.list_agents("node-1", new.address)

    assert len((await running).agents) == 1
    assert pool.stats()["node-1"].address == new.address


async def test_forget_closes_the_channel_and_drops_the_counters(
    start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """A forgotten node has no channel and no stats; calling it again starts afresh."""
    daemon = await start_daemon("node-1")
    pool = make_pool()
    await pool.list_agents("node-1", daemon.address)

    await pool.forget("node-1")

    assert pool.open_channels == 0
    assert pool.stats() == {}
    assert pool.state("node-1") is S.IDLE
    await pool.list_agents("node-1", daemon.address)
    assert pool.stats()["node-1"].calls == 1


async def test_renewed_manager_certificate_is_used_by_new_connections(
    pki: Any, manager_tls: TLSConfig, start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """Certificate files replaced on disk are presented from the next channel on, no restart."""
    daemon = await start_daemon("node-1")
    pool = make_pool()
    await pool.list_agents("node-1", daemon.address)

    stem = manager_tls.cert_file.stem
    pki.ca.issue("manager", "m2").write(manager_tls.cert_file.parent, stem=stem)
    await pool.list_agents("node-1", daemon.address)  # the open connection is kept
    await pool.forget("node-1")
    await pool.list_agents("node-1", daemon.address)

    assert daemon.servicer.callers == ["manager/m1", "manager/m1", "manager/m2"]


async def test_unusable_renewed_files_keep_the_old_certificate(
    manager_tls: TLSConfig, start_daemon: StartDaemon, make_pool: MakePool
) -> None:
    """A half-written certificate update is ignored; new connections keep the last good one."""
    daemon = await start_daemon("node-1")
    pool = make_pool()
    manager_tls.cert_file.write_bytes(b"-----BEGIN CERTIFICATE-----\ntruncated")

    await pool.list_agents("node-1", daemon.address)

    assert daemon.servicer.callers == ["manager/m1"]
