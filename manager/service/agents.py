"""SyncAgentStates: a node's complete agent snapshot replaces the old one."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from manager.service.registry import NodeRegistry
from manager.service.validation import validate_agent_states
from manager.storage import AgentStateRecord
from manager.storage.agents import AgentStateRepository

__all__ = ["AgentStates"]


class AgentStates:
    """Validates snapshots and replaces the stored ones atomically."""

    def __init__(
        self, registry: NodeRegistry, agents: AgentStateRepository, *, clock: Callable[[], float]
    ) -> None:
        self._registry = registry
        self._agents = agents
        self._clock = clock

    async def sync(self, node_id: str, states: Sequence[AgentStateRecord]) -> int:
        """Replace the node's agents with `states`; returns how many changed."""
        validate_agent_states(states)
        await self._registry.require_known(node_id)
        return await self._agents.replace(
            node_id, states, now_ms=int(self._clock() * 1000), actor=f"node/{node_id}"
        )
