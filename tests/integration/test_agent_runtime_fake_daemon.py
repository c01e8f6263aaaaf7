"""FakeDaemon as an agent author uses it: drive a small agent and check what it did."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest

from agent_runtime import Agent, AgentOptions
from agent_runtime.testing import FakeDaemon
from fleet.errors import PermissionDenied

FAST = AgentOptions(metrics_flush_interval=0.1)


async def jobs_agent(agent: Agent) -> None:
    """The agent under test: reports its queue depth, honouring a "scale" setting."""
    while await agent.sleep(0.05):
        scale = agent.config.json().get("scale", 1)
        agent.metric("depth", 3 * scale, type="jobs")


async def test_author_checks_metrics_and_live_config() -> None:
    """An author runs their agent against the fake, changes config, and sees the effect."""
    async with FakeDaemon(config={"scale": 1}) as daemon:
        async with Agent("jobs", "2.0", environ=daemon.env, options=FAST) as agent:
            task = asyncio.create_task(jobs_agent(agent))
            await daemon.wait_for(lambda d: any(m.values["depth"] == 3 for m in d.metrics))
            daemon.set_config({"scale": 10})
            await daemon.wait_for(lambda d: any(m.values["depth"] == 30 for m in d.metrics))
            agent.request_stop()
            await task
        assert daemon.registrations[0].version == "2.0"


async def test_env_points_at_a_private_socket_that_is_cleaned_up() -> None:
    """env names the agent id and a real socket; leaving the context removes it."""
    daemon = FakeDaemon(agent_id="w-3")
    async with daemon:
        env = daemon.env
        assert env["FLEET_AGENT_ID"] == "w-3"
        assert stat.S_ISSOCK(os.stat(env["FLEET_DAEMON_SOCKET"]).st_mode)
        assert "FLEET_AGENT_TOKEN" not in env
    assert not daemon.socket_path.exists()
    assert not daemon.socket_path.parent.exists()


async def test_set_config_bumps_the_version_each_time() -> None:
    """set_config returns increasing versions; a mapping is served as JSON."""
    async with FakeDaemon() as daemon:
        assert daemon.config_version == 0
        assert daemon.set_config({"a": 1}) == 1
        assert daemon.set_config("raw text") == 2
        async with Agent("t", environ=daemon.env, options=FAST) as agent:
            assert (agent.config.version, agent.config.text()) == (2, "raw text")


async def test_wait_helpers_time_out_with_what_was_received() -> None:
    """A wait that is not met says how much of each arrived, instead of hanging."""
    async with FakeDaemon() as daemon:
        with pytest.raises(TimeoutError, match="0 registrations, 0 heartbeats"):
            await daemon.wait_heartbeats(1, timeout=0.2)


async def test_fail_register_then_recover() -> None:
    """fail_register refuses the agent until cleared; the next agent gets in."""
    async with FakeDaemon() as daemon:
        daemon.fail_register(PermissionDenied("not supervised"))
        refused = Agent("t", environ=daemon.env, options=FAST)
        with pytest.raises(PermissionDenied):
            await refused.start()
        await refused.stop()
        daemon.fail_register(None)
        async with Agent("t", environ=daemon.env, options=FAST):
            await daemon.wait_registered()
        assert daemon.refused_registrations == 1


async def test_restart_keeps_the_socket_path_and_drops_watchers() -> None:
    """restart() serves again on the same path; open config watches were broken."""
    async with FakeDaemon(heartbeat_interval=0.1) as daemon:
        path = daemon.socket_path
        async with Agent("t", environ=daemon.env, options=FAST):
            await daemon.wait_for(lambda d: d.watchers == 1)
            await daemon.restart(downtime=0.2)
            assert daemon.socket_path == path
            assert daemon.running
            await daemon.wait_registered(2)
            await daemon.wait_for(lambda d: d.watchers == 1)
