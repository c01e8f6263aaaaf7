"""Migration 0004 gives agent states stored before 0003 the time their node was last seen.

Runs a real database up to 0003, writes rows as that code did (a node
offline since before the upgrade still has reported_ms 0), then upgrades.
"""

from __future__ import annotations

import json

from alembic import command
from sqlalchemy import column, insert, table

from manager.storage import AgentStateRepository, Database
from manager.storage.db import _alembic_config

# The tables as revision 0003 made them (only what these rows need).
NODES = table(
    "nodes",
    *(
        column(name)
        for name in (
            "node_id", "hostname", "ip", "os", "arch", "labels", "daemon_version",
            "agent_version", "daemon_address", "status", "last_seen_ms", "registered_at_ms",
        )
    ),
)  # fmt: skip
AGENT_STATES = table(
    "agent_states",
    *(
        column(name)
        for name in (
            "node_id", "agent_id", "status", "pid", "last_heartbeat_ms", "type", "version",
            "start_time_ms", "restart_count", "exit_code", "message", "labels", "health",
            "config_version", "reported_ms",
        )
    ),
)  # fmt: skip


def _node(node_id: str, status: str, last_seen_ms: int) -> dict[str, object]:
    return {
        "node_id": node_id, "hostname": node_id, "ip": "10.0.0.1", "os": "linux",
        "arch": "x86_64", "labels": "{}", "daemon_version": "1", "agent_version": "1",
        "daemon_address": "h:1", "status": status, "last_seen_ms": last_seen_ms,
        "registered_at_ms": 1,
    }  # fmt: skip


def _agent(node_id: str, agent_id: str, reported_ms: int) -> dict[str, object]:
    return {
        "node_id": node_id, "agent_id": agent_id, "status": "RUNNING", "pid": 7,
        "last_heartbeat_ms": 0, "type": "web", "version": "1", "start_time_ms": 1,
        "restart_count": 0, "exit_code": 0, "message": "", "labels": json.dumps({}),
        "health": "", "config_version": 1, "reported_ms": reported_ms,
    }  # fmt: skip


async def test_unsynced_rows_take_their_nodes_last_seen_time(database_url: str) -> None:
    """An offline node's agents say when its daemon was last heard; synced rows keep theirs."""
    db = await Database.open(database_url)
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(
                lambda c: command.upgrade(_alembic_config(c), "0003_agent_last_exit")
            )
        async with db.engine.begin() as conn:
            await conn.execute(
                insert(NODES),
                [_node("gone", "offline", 1_700_000_000_000), _node("up", "online", 1_800)],
            )
            await conn.execute(
                insert(AGENT_STATES),
                [
                    _agent("gone", "web", 0),  # stored before 0003, never synced since
                    _agent("gone", "worker", 0),
                    _agent("up", "web", 1_750),  # synced after 0003
                ],
            )
        await db.migrate()
        reported = {
            (s.node_id, s.agent_id): s.reported_ms for s in await AgentStateRepository(db).list()
        }
        assert reported == {
            ("gone", "web"): 1_700_000_000_000,
            ("gone", "worker"): 1_700_000_000_000,
            ("up", "web"): 1_750,
        }
    finally:
        await db.close()
