"""agent_runtime: the SDK for agents supervised by fleet-daemon.

An agent in a few lines::

    from agent_runtime import Agent, run_agent

    async def main(agent: Agent) -> None:
        while await agent.sleep(5):
            agent.metric("queue_depth", 3, type="jobs")

    raise SystemExit(run_agent(main, type="jobs", version="1.0"))

`Agent` registers with the daemon named by the environment the daemon sets
(FLEET_AGENT_ID, FLEET_DAEMON_SOCKET), heartbeats, batches metrics, follows
config changes (`on_config`, `configs()`), runs stop hooks on SIGTERM, and
reconnects when the daemon restarts. `agent_runtime.sync.SyncAgent` is a
thin facade for scripts without asyncio; `agent_runtime.testing.FakeDaemon`
stands in for the daemon in tests. See docs/agents.md.
"""

from agent_runtime._agent import Agent, AgentOptions, ConfigCallback, StopHook
from agent_runtime._config import AgentConfig, ConfigChecksumError
from agent_runtime._env import DaemonEndpoint
from agent_runtime._lifecycle import EXIT_CRASHED, EXIT_OK, EXIT_REFUSED, Main, run_agent

__all__ = [
    "EXIT_CRASHED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "Agent",
    "AgentConfig",
    "AgentOptions",
    "ConfigCallback",
    "ConfigChecksumError",
    "DaemonEndpoint",
    "Main",
    "StopHook",
    "run_agent",
]
