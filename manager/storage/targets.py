"""Operation targets: which nodes run an agent with a given id or type (one query).

A fan-out needs, for every agent with that id (or type), its node's labels
(to match the selector) and daemon address (to call it). Reading all nodes
and then all their agents costs two full reads and a record per row; this
joins the two tables and returns only the rows that can be targets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from manager.storage.db import Database
from manager.storage.events import load_map
from manager.storage.schema import agent_states, nodes

__all__ = ["Candidate", "TargetRepository"]


@dataclass(frozen=True)
class Candidate:
    """An agent that may be operated on, with what selecting and calling it needs."""

    node_id: str
    """The node it runs on."""
    agent_id: str
    """The agent."""
    node_labels: Mapping[str, str]
    """The node's labels (for the selector); shared by nodes with the same labels."""
    daemon_address: str
    """Where the node's daemon listens."""


class TargetRepository:
    """Reads operation candidates."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def candidates(self, *, agent_id: str = "", agent_type: str = "") -> list[Candidate]:
        """Agents with that id (or, if empty, that type) on any node, by node then agent."""
        where = (
            agent_states.c.agent_id == agent_id if agent_id else agent_states.c.type == agent_type
        )
        query = (
            select(nodes.c.node_id, agent_states.c.agent_id, nodes.c.labels, nodes.c.daemon_address)
            .join(nodes, nodes.c.node_id == agent_states.c.node_id)
            .where(where)
            .order_by(nodes.c.node_id, agent_states.c.agent_id)
        )

        async def body(conn: AsyncConnection) -> list[Candidate]:
            # Nodes mostly share a few label sets: decode each distinct one once.
            parsed: dict[str, Mapping[str, str]] = {}
            found = []
            for node_id, agent_id, raw, address in await conn.execute(query):
                labels = parsed.get(raw)
                if labels is None:
                    labels = parsed[raw] = load_map(raw)
                found.append(Candidate(node_id, agent_id, labels, address))
            return found

        return await self._db.run(body, write=False)
