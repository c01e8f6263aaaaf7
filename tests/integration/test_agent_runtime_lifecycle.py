"""Agent.run: how the agent's work, stop hooks and exit codes fit together (in-process)."""

from __future__ import annotations

import asyncio
import logging
import signal

import pytest

from agent_runtime import EXIT_CRASHED, EXIT_OK, EXIT_REFUSED, Agent, AgentOptions
from agent_runtime.testing import FakeDaemon
from fleet.errors import PermissionDenied
from fleet.retry import Backoff

FAST = AgentOptions(
    metrics_flush_interval=30.0,
    reconnect=Backoff(initial=0.05, maximum=0.1),
    refused_grace=0.3,
)


async def test_main_returning_stops_the_agent_cleanly() -> None:
    """When main returns: hooks run, metrics are flushed, exit code 0."""
    async with FakeDaemon() as daemon:
        agent = Agent("t", environ=daemon.env, options=FAST)
        ran: list[str] = []
        agent.on_stop(lambda: ran.append("hook"))

        async def main(a: Agent) -> None:
            a.metric("done", 1, type="job")

        assert await agent.run(main) == EXIT_OK
        assert ran == ["hook"]
        assert daemon.metrics[0].values == {"done": 1.0}  # sent despite a 30 s interval
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


async def test_main_raising_is_exit_1_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A crash in main is logged with its traceback and gives exit code 1."""
    async with FakeDaemon() as daemon:
        agent = Agent("t", environ=daemon.env, options=FAST)

        async def main(_a: Agent) -> None:
            raise RuntimeError("disk on fire")

        assert await agent.run(main) == EXIT_CRASHED
    failed = [r for r in caplog.records if r.getMessage() == "agent work failed"]
    assert failed
    assert failed[0].exc_info is not None
    assert "disk on fire" in str(failed[0].exc_info[1])


async def test_work_ignoring_the_stop_is_cancelled_at_the_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Work that does not check `stopping` is cancelled when the stop timeout runs out; exit 0."""
    async with FakeDaemon(stop_timeout=0.5) as daemon:
        agent = Agent("t", environ=daemon.env, options=FAST)
        cancelled = asyncio.Event()

        async def main(a: Agent) -> None:
            a.request_stop()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        code = await asyncio.wait_for(agent.run(main), 5)
        assert code == EXIT_OK
        assert cancelled.is_set()
    assert any("still running at the stop deadline" in r.getMessage() for r in caplog.records)


async def test_refused_at_start_is_exit_2_without_running_main() -> None:
    """A daemon refusal at registration returns 2 and main never starts."""
    async with FakeDaemon() as daemon:
        daemon.fail_register(PermissionDenied("process 7 is not an agent supervised here"))
        started = False

        async def main(_a: Agent) -> None:
            nonlocal started
            started = True

        assert await Agent("t", environ=daemon.env, options=FAST).run(main) == EXIT_REFUSED
        assert not started


async def test_refused_after_a_daemon_restart_stops_the_agent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A new daemon that keeps refusing the agent past refused_grace stops it with exit 2."""
    caplog.set_level(logging.INFO, logger="agent_runtime")
    async with FakeDaemon(heartbeat_interval=0.1) as daemon:
        agent = Agent("t", environ=daemon.env, options=FAST)

        async def main(a: Agent) -> None:
            # A daemon that dies before the agent's config watch is open breaks
            # no call: the channel reconnects to the new daemon and heartbeats
            # go on, with nothing to make the agent register again (3 in 25
            # runs timed out that way).
            await daemon.wait_for(lambda d: d.watchers == 1)
            await daemon.stop()
            daemon.fail_register(PermissionDenied("process 7 is not an agent supervised here"))
            await daemon.start()
            await a.wait_stopping()

        code = await asyncio.wait_for(agent.run(main), 10)
        assert code == EXIT_REFUSED
        assert isinstance(agent.failure, PermissionDenied)
        assert daemon.refused_registrations >= 2  # retried within the grace, then gave up
    assert any("refuses this process as agent test-agent" in r.getMessage() for r in caplog.records)


async def test_configs_iterator_ends_when_the_agent_stops() -> None:
    """`async for config in agent.configs()` finishes once a stop is requested."""
    async with FakeDaemon(config={"n": 1}) as daemon:
        agent = Agent("t", environ=daemon.env, options=FAST)
        seen: list[int] = []

        async def main(a: Agent) -> None:
            async for config in a.configs():
                seen.append(config.version)
                a.request_stop()

        assert await asyncio.wait_for(agent.run(main), 5) == EXIT_OK
        assert seen == [1]
