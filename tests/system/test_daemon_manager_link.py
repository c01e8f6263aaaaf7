"""The daemon against a REAL `fleet-manager serve` process: register, heartbeat, metrics, sync,
and an outage: the manager stopped for a while, then restarted on the same database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from daemon_helpers import agent, daemon_config, eventually, short_tmp
from manager_proc import Manager, free_port

from daemon.config import ManagerLinkConfig
from daemon.server import DaemonServer
from fleet.retry import Backoff


@pytest.fixture
async def daemon(pki: Any, manager: Manager) -> AsyncIterator[DaemonServer]:
    """A daemon (node/n1, two agents) whose manager link points at `manager`."""
    with short_tmp() as root:
        link = ManagerLinkConfig(
            addresses=(f"127.0.0.1:{manager.port}",),
            metrics_interval_seconds=0.5,
            sync_interval_seconds=30.0,
            rpc_timeout_seconds=5.0,
            reconnect=Backoff(initial=0.2, maximum=1.0),
        )
        cfg = daemon_config(
            root,
            pki.issue("node", "n1"),
            (agent("web", "sleep", "1000"), agent("worker", "sleep", "1000")),
            manager=link,
            stop_agents_on_exit=True,
        )
        server = DaemonServer(cfg)
        await server.start()
        try:
            yield server
        finally:
            await server.stop(1.0)


async def _rows(manager: Manager, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    return await asyncio.to_thread(manager.query, sql, *args)


async def test_registers_heartbeats_reports_metrics_once_and_syncs_states(
    manager: Manager, daemon: DaemonServer
) -> None:
    """The manager records the node, fresh heartbeats, each batch once, and agent state changes."""
    nodes = await eventually(
        lambda: _rows(manager, "SELECT node_id, daemon_address, status, last_seen_ms FROM nodes"),
        lambda r: len(r) == 1,
        within=30,
    )
    node_id, address, status, first_seen = nodes[0]
    assert node_id == "n1"
    assert address == f"127.0.0.1:{daemon.port}"
    assert status == "online"
    await eventually(
        lambda: _rows(manager, "SELECT last_seen_ms FROM nodes"),
        lambda r: r[0][0] >= first_seen + 1500,  # heartbeats every ~1 s move it on
        within=15,
    )

    batches = await eventually(
        lambda: _rows(manager, "SELECT sequence FROM metric_batches WHERE node_id='n1' ORDER BY 1"),
        lambda r: len(r) >= 3,
        within=30,
    )
    seqs = [s for (s,) in batches]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    # Each host cpu sample is stored once (no batch was stored twice).
    dup = await _rows(
        manager,
        "SELECT ts_ms, name, COUNT(*) FROM metric_samples WHERE node_id='n1' AND agent_id='' "
        "AND type='cpu' GROUP BY ts_ms, name HAVING COUNT(*) > 1",
    )
    assert dup == []
    agent_rows = await _rows(
        manager, "SELECT COUNT(*) FROM metric_samples WHERE node_id='n1' AND agent_id='web'"
    )
    assert agent_rows[0][0] > 0

    states = await eventually(
        lambda: _rows(manager, "SELECT agent_id, status FROM agent_states ORDER BY 1"),
        lambda r: (
            r == [("web", "RUNNING"), ("worker", "RUNNING")]
            or r == [("web", "AGENT_STATUS_RUNNING"), ("worker", "AGENT_STATUS_RUNNING")]
        ),
        within=15,
    )
    running = states[0][1]
    await daemon.supervisor.operate("worker", "stop")
    stopped = running.replace("RUNNING", "STOPPED")
    await eventually(
        lambda: _rows(manager, "SELECT status FROM agent_states WHERE agent_id='worker'"),
        lambda r: r == [(stopped,)],
        within=10,
    )


async def test_outage_buffers_then_reregisters_and_delivers_in_order(
    manager: Manager, daemon: DaemonServer
) -> None:
    """Manager down: batches pile up in the buffer; manager back: re-register, flush in order."""
    await eventually(
        lambda: _rows(manager, "SELECT COUNT(*) FROM metric_batches"),
        lambda r: bool(r) and r[0][0] >= 1,
        within=30,
    )
    await asyncio.to_thread(manager.stop)
    registrations = daemon.link.registrations
    await eventually(lambda: asyncio.sleep(0, len(daemon.link.buffer)), lambda n: n >= 4, within=30)
    assert daemon.link.state != "connected"
    waiting = daemon.link.buffer.sequences()

    manager.start()
    await eventually(
        lambda: asyncio.sleep(0, daemon.link.registrations),
        lambda n: n > registrations,
        within=30,
    )
    stored = await eventually(
        lambda: _rows(
            manager, "SELECT sequence, received_ms FROM metric_batches ORDER BY sequence"
        ),
        lambda r: {s for s, _ in r} >= set(waiting),
        within=30,
    )
    seqs = [s for s, _ in stored]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "no batch lost or duplicated"
    received = [ms for s, ms in stored if s in set(waiting)]
    assert received == sorted(received), "buffered batches arrive in sequence order"
    assert daemon.link.buffer.dropped_batches == 0


async def test_fails_over_to_the_next_manager_address(pki: Any, manager: Manager) -> None:
    """With a dead first address, the daemon moves on and registers with the second one."""
    with short_tmp() as root:
        link = ManagerLinkConfig(
            addresses=(f"127.0.0.1:{free_port()}", f"127.0.0.1:{manager.port}"),
            rpc_timeout_seconds=5.0,
            reconnect=Backoff(initial=0.2, maximum=1.0),
        )
        cfg = daemon_config(root, pki.issue("node", "n2"), (), manager=link)
        server = DaemonServer(cfg)
        await server.start()
        try:
            await eventually(
                lambda: _rows(manager, "SELECT node_id FROM nodes WHERE node_id='n2'"),
                lambda r: r == [("n2",)],
                within=60,
            )

            async def link() -> tuple[str, str]:
                return server.link.address, server.link.state

            # The row is committed a moment before the daemon reads the answer.
            await eventually(
                link, lambda v: v == (f"127.0.0.1:{manager.port}", "connected"), within=15
            )
        finally:
            await server.stop(1.0)
