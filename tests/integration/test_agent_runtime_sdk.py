"""The SDK against a FakeDaemon over a real Unix socket: what an agent author relies on."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import tempfile
import time

import pytest
from grpc import aio

from agent_runtime import Agent, AgentConfig, AgentOptions, DaemonEndpoint
from agent_runtime._client import AgentClient
from agent_runtime.testing import FakeDaemon
from fleet.errors import ConfigError, PermissionDenied, Unavailable
from fleet.retry import Backoff
from fleet.v1 import agent_pb2, agent_pb2_grpc

FAST = AgentOptions(
    metrics_flush_interval=0.2,
    metrics_batch_size=5,
    reconnect=Backoff(initial=0.05, maximum=0.2),
    rpc_timeout=2.0,
)


async def test_register_sends_identity_and_returns_the_config() -> None:
    """Register carries type, version, pid and labels; the agent gets the daemon's config."""
    async with FakeDaemon(agent_id="probe-1", config={"targets": []}, stop_timeout=7) as daemon:
        agent = Agent("probe", "1.2.3", labels={"team": "a"}, environ=daemon.env, options=FAST)
        async with agent:
            reg = await daemon.wait_registered()
            assert (reg.agent_id, reg.type, reg.version, reg.labels) == (
                "probe-1",
                "probe",
                "1.2.3",
                {"team": "a"},
            )
            assert reg.pid == os.getpid()
            assert agent.config.json() == {"targets": []}
            assert agent.config.version == daemon.config_version == 1
            assert agent.stop_timeout == 7
            assert agent.connected


async def test_heartbeats_arrive_at_the_announced_interval() -> None:
    """Heartbeats come every heartbeat_interval the daemon announced, not faster."""
    async with FakeDaemon(heartbeat_interval=0.1) as daemon:
        async with Agent("t", environ=daemon.env, options=FAST):
            await daemon.wait_heartbeats(6)
        times = [h.received_at for h in daemon.heartbeats[:6]]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) >= 0.08
        assert sum(gaps) / len(gaps) < 0.5
        now_ms = time.time() * 1000
        assert all(now_ms - 10_000 < h.timestamp_ms <= now_ms for h in daemon.heartbeats)


async def test_metrics_are_batched_by_count_and_by_time() -> None:
    """M samples go in one call at once; fewer wait for the flush interval."""
    async with FakeDaemon() as daemon:
        options = AgentOptions(metrics_flush_interval=30.0, metrics_batch_size=5)
        async with Agent("t", environ=daemon.env, options=options) as agent:
            for i in range(5):
                agent.metric("latency_ms", 10.0 + i, type="probe")
            await daemon.wait_metrics(5)
            assert [len(b) for b in daemon.metric_batches] == [5]
            assert daemon.metrics[0].type == "probe"
            assert daemon.metrics[4].values == {"latency_ms": 14.0}
            agent.record("probe.web", {"up": 1, "latency_ms": 3.5})
            await asyncio.sleep(0.3)
            assert len(daemon.metrics) == 5  # below the batch size: waits for the interval
        # stopping flushes what is left
        assert [len(b) for b in daemon.metric_batches] == [5, 1]
        assert daemon.metrics[5].values == {"up": 1.0, "latency_ms": 3.5}


async def test_interval_flush_sends_a_partial_batch() -> None:
    """A single sample is sent once the flush interval passes, without stopping."""
    async with FakeDaemon() as daemon, Agent("t", environ=daemon.env, options=FAST) as agent:
        agent.metric("depth", 3, type="jobs")
        await daemon.wait_metrics(1, timeout=3)
        assert daemon.metrics[0].values == {"depth": 3.0}


async def test_config_push_reaches_callback_and_iterator_verified() -> None:
    """A new config version reaches on_config and configs() with its version and checksum."""
    async with FakeDaemon(config={"n": 1}) as daemon:
        agent = Agent("t", environ=daemon.env, options=FAST)
        seen: list[AgentConfig] = []
        agent.on_config(seen.append)
        async with agent:
            iterated: list[int] = []

            async def consume() -> None:
                async for config in agent.configs():
                    iterated.append(config.json()["n"])
                    if len(iterated) == 3:
                        return

            consumer = asyncio.create_task(consume())
            await daemon.wait_for(lambda d: d.watchers == 1)
            daemon.set_config({"n": 2})
            await daemon.wait_for(lambda d: len(seen) == 2)
            version = daemon.set_config(b'{"n": 3}')
            await asyncio.wait_for(consumer, 2)
        assert iterated == [1, 2, 3]
        assert [c.version for c in seen] == [1, 2, 3] == [1, 2, version]
        assert seen[-1].sha256 == AgentConfig.of(b'{"n": 3}', 3).sha256


async def test_corrupt_config_is_rejected_and_the_agent_keeps_running(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A checksum mismatch is logged clearly, not applied; heartbeats and later configs go on."""
    caplog.set_level(logging.INFO, logger="agent_runtime")
    async with (
        FakeDaemon(config={"n": 1}, heartbeat_interval=0.1) as daemon,
        Agent("t", environ=daemon.env, options=FAST) as agent,
    ):
        await daemon.wait_for(lambda d: d.watchers == 1)
        bad = daemon.set_corrupt_config({"n": 666})
        beats = len(daemon.heartbeats)
        await daemon.wait_heartbeats(beats + 3)
        assert agent.config.json() == {"n": 1}
        assert agent.connected
        daemon.set_config({"n": 2})
        await daemon.wait_for(lambda d: agent.config.version == bad + 1)
        assert agent.config.json() == {"n": 2}
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(f"config version {bad} rejected" in m and "sha256" in m for m in errors)
    # the heartbeat noticing the newer (corrupt) version does not refetch it in a loop
    assert daemon.get_config_calls <= 1


async def test_daemon_restart_reconnects_and_registers_again_while_work_continues(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When the daemon goes away and comes back the agent registers again; its work never stops."""
    caplog.set_level(logging.INFO, logger="agent_runtime")
    async with FakeDaemon(config={"n": 1}, heartbeat_interval=0.1) as daemon:
        async with Agent("t", environ=daemon.env, options=FAST) as agent:
            ticks = 0

            async def work() -> None:
                nonlocal ticks
                while await agent.sleep(0.02):
                    ticks += 1
                    agent.metric("ticks", ticks, type="work")

            worker = asyncio.create_task(work())
            await daemon.wait_heartbeats(2)
            await daemon.stop()
            before = ticks
            await asyncio.sleep(0.5)
            assert ticks > before + 5  # the agent's work went on during the outage
            assert not agent.connected
            await daemon.start()
            await daemon.wait_registered(2, timeout=5)
            await daemon.wait_for(lambda d: d.watchers == 1)
            daemon.set_config({"n": 2})  # the new session's watch delivers changes
            await daemon.wait_for(lambda d: agent.config.version == 2)
            beats = len(daemon.heartbeats)
            await daemon.wait_heartbeats(beats + 2)
            assert agent.registrations == 2
            worker.cancel()
        # samples recorded during the outage were kept and delivered afterwards
        values = [m.values["ticks"] for m in daemon.metrics]
        assert any(before < v <= before + 5 for v in values), (before, sorted(values))
    messages = [r.getMessage() for r in caplog.records]
    assert any("lost the daemon" in m and "reconnects" in m for m in messages)
    assert any("registered again as agent test-agent" in m for m in messages)


async def test_restart_with_a_reset_config_version_is_taken_from_register() -> None:
    """After a restart Register's config wins even if the new daemon's versions start lower."""
    async with (
        FakeDaemon(config={"n": 1}, heartbeat_interval=0.1) as daemon,
        Agent("t", environ=daemon.env, options=FAST) as agent,
    ):
        daemon.set_config({"n": 2})
        daemon.set_config({"n": 3})
        await daemon.wait_for(lambda d: agent.config.version == 3)
        await daemon.stop()
        daemon._version = 0  # a daemon that lost its counter
        daemon.set_config({"n": 9})
        await daemon.start()
        await daemon.wait_registered(2)
        await daemon.wait_for(lambda d: agent.config.json() == {"n": 9})
        assert agent.config.version == 1


async def test_permission_denied_on_register_is_raised_not_retried() -> None:
    """A refused registration (not a supervised process) is a clear error, tried once."""
    async with FakeDaemon() as daemon:
        daemon.fail_register(PermissionDenied("process 4242 is not an agent supervised here"))
        agent = Agent("t", environ=daemon.env, options=FAST)
        with pytest.raises(PermissionDenied, match="4242 is not an agent supervised"):
            await agent.start()
        await agent.stop()
        assert daemon.refused_registrations == 1


async def test_agent_id_mismatch_is_refused() -> None:
    """An agent claiming another agent's id is refused with both ids in the message."""
    async with FakeDaemon(agent_id="web-1") as daemon:
        env = {**daemon.env, "FLEET_AGENT_ID": "web-2"}
        agent = Agent("t", environ=env, options=FAST)
        with pytest.raises(PermissionDenied, match="web-1 and may not speak for agent web-2"):
            await agent.start()
        await agent.stop()


async def test_unavailable_daemon_at_start_is_waited_for() -> None:
    """Register is retried with backoff while the daemon is not up yet."""
    async with FakeDaemon() as daemon:
        daemon.fail_register(Unavailable("daemon starting"), times=3)
        async with Agent("t", environ=daemon.env, options=FAST) as agent:
            assert agent.connected
        assert (daemon.refused_registrations, len(daemon.registrations)) == (3, 1)


async def test_no_daemon_environment_is_a_config_error() -> None:
    """Started outside a daemon, start() says which variable is missing."""
    agent = Agent("t", environ={}, options=FAST)
    with pytest.raises(ConfigError, match="FLEET_AGENT_ID is not set"):
        await agent.start()


async def test_token_is_sent_when_the_daemon_set_one() -> None:
    """FLEET_AGENT_TOKEN goes out as x-fleet-agent-token; a wrong one is refused."""
    async with FakeDaemon(token="s3cret") as daemon:
        async with Agent("t", environ=daemon.env, options=FAST):
            await daemon.wait_registered()
        wrong = {**daemon.env, "FLEET_AGENT_TOKEN": "guess"}
        agent = Agent("t", environ=wrong, options=FAST)
        with pytest.raises(PermissionDenied, match="token"):
            await agent.start()
        await agent.stop()


async def test_get_config_fetches_and_applies_the_current_config() -> None:
    """get_config() asks the daemon now and returns the verified current config."""
    async with (
        FakeDaemon(config="v1") as daemon,
        Agent("t", environ=daemon.env, options=FAST) as agent,
    ):
        config = await agent.get_config()
        assert (config.text(), config.version) == ("v1", 1)
        assert daemon.get_config_calls == 1


async def test_stop_hooks_run_newest_first_within_the_stop_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Stop hooks run once, newest first; one that overruns the timeout is cancelled and logged."""
    caplog.set_level(logging.INFO, logger="agent_runtime")
    async with FakeDaemon(stop_timeout=0.5) as daemon:
        agent = Agent("t", environ=daemon.env, options=FAST)
        ran: list[str] = []

        @agent.on_stop
        def first() -> None:
            ran.append("first")

        @agent.on_stop
        async def hangs() -> None:
            ran.append("hangs")
            await asyncio.sleep(60)

        await agent.start()
        started = time.monotonic()
        await agent.stop()
        assert time.monotonic() - started < 1.0
        assert ran == ["hangs", "first"]
        assert agent.stopping
    assert any("did not finish within the stop timeout" in r.getMessage() for r in caplog.records)


async def test_metric_buffer_is_bounded_during_an_outage() -> None:
    """While the daemon is down the buffer keeps the newest samples up to its limit."""
    async with FakeDaemon() as daemon:
        options = AgentOptions(
            metrics_flush_interval=0.1,
            metrics_batch_size=10,
            metrics_buffer_limit=20,
            reconnect=Backoff(initial=0.05, maximum=0.1),
        )
        async with Agent("t", environ=daemon.env, options=options) as agent:
            await daemon.stop()
            await daemon.wait_for(lambda d: not agent.connected)
            for i in range(50):
                agent.metric("n", i, type="seq")
            assert agent.metrics_dropped == 30
            await daemon.start()
            await daemon.wait_metrics(20, timeout=5)
        assert sorted(m.values["n"] for m in daemon.metrics) == [float(i) for i in range(30, 50)]


class _SlowHeartbeat(agent_pb2_grpc.AgentServiceServicer):
    async def Heartbeat(
        self, request: agent_pb2.AgentServiceHeartbeatRequest, context: object
    ) -> agent_pb2.AgentServiceHeartbeatResponse:
        await asyncio.sleep(30)
        return agent_pb2.AgentServiceHeartbeatResponse()


async def test_a_call_cut_by_closing_the_channel_is_unavailable_not_a_cancellation() -> None:
    """grpc.aio cancels in-flight calls on close; the SDK reports that as Unavailable.

    Otherwise the metrics task, whose flush was in flight when a session
    ended, would end as if it had been cancelled and never report again.
    """
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        path = f"{tmp}/slow.sock"
        server = aio.server()
        agent_pb2_grpc.add_AgentServiceServicer_to_server(_SlowHeartbeat(), server)
        server.add_insecure_port(f"unix:{path}")
        await server.start()
        client = AgentClient(DaemonEndpoint("a", path), timeout=10)
        try:
            call = asyncio.create_task(client.heartbeat())
            await asyncio.sleep(0.3)
            await client.close()
            with pytest.raises(Unavailable, match="connection closed"):
                await call
        finally:
            await client.close()
            await server.stop(None)
