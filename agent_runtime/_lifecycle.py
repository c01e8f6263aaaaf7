"""Running an agent as a process: signals, the stop budget, the exit code.

`run(agent, main)` is the lifecycle of every SDK agent process::

    install SIGTERM/SIGINT handlers (they only request the stop)
    start() -> Register          (refused: exit 2)
    main(agent) runs             (returns: the agent is done; raises: exit 1)
    on SIGTERM/SIGINT: stop hooks, then main gets what is left of the stop
    timeout the daemon announced (then it is cancelled), metrics are
    flushed, exit 0
    restore the previous signal handlers
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from agent_runtime._agent import Agent, AgentOptions, _Stopped
from fleet.errors import FleetError

__all__ = ["EXIT_CRASHED", "EXIT_OK", "EXIT_REFUSED", "Main", "run", "run_agent"]

log = logging.getLogger("agent_runtime")

Main = Callable[[Agent], Coroutine[Any, Any, None]]
"""The agent's own work: an async function of the Agent."""

EXIT_OK = 0
"""Stopped on request, or `main` returned."""
EXIT_CRASHED = 1
"""`main` raised."""
EXIT_REFUSED = 2
"""The daemon refused the agent, or the daemon's environment is missing."""

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def run(agent: Agent, main: Main) -> int:
    """Run `main(agent)` under the agent lifecycle; returns the process exit code."""
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}

    def on_signal(sig: signal.Signals) -> None:
        if not agent.stopping:
            log.info("%s: stopping within %.1fs", sig.name, agent.stop_timeout)
        agent.request_stop()

    try:
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, on_signal, sig)
        return await _run(agent, main)
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


async def _run(agent: Agent, main: Main) -> int:
    starting = asyncio.create_task(agent.start())
    stop_wait = asyncio.create_task(agent.wait_stopping())
    try:
        await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # stopped while waiting for the daemon
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, _Stopped):
                await starting
            await agent.stop()
            return EXIT_OK
        try:
            starting.result()
        except _Stopped:
            await agent.stop()
            return EXIT_OK
        except FleetError as exc:
            log.error("agent not started: %s", exc)  # noqa: TRY400 -- a one-line reason
            await agent.stop()
            return EXIT_REFUSED

        work = asyncio.create_task(main(agent), name="agent-main")
        await asyncio.wait({work, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        code = EXIT_OK
        if work.done() and not stop_wait.done():
            code = _outcome(work)
            log.info("agent work finished; stopping")
        deadline = agent.stop_deadline()
        agent.request_stop()
        await agent.run_stop_hooks(deadline)
        if not work.done():
            done, _ = await asyncio.wait({work}, timeout=max(deadline - agent.clock(), 0.001))
            if not done:
                log.warning("agent work still running at the stop deadline; cancelling it")
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
            elif not work.cancelled():
                code = max(code, _outcome(work))
        await agent.stop(deadline)
        if agent.failure is not None:
            return EXIT_REFUSED
        return code
    finally:
        stop_wait.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stop_wait


def _outcome(work: asyncio.Task[None]) -> int:
    if work.cancelled():
        return EXIT_OK
    exc = work.exception()
    if exc is None:
        return EXIT_OK
    log.error("agent work failed", exc_info=exc)
    return EXIT_CRASHED


def run_agent(
    main: Main,
    *,
    type: str,
    version: str = "0",
    labels: Mapping[str, str] | None = None,
    options: AgentOptions | None = None,
    environ: Mapping[str, str] | None = None,
    configure_logging: bool = True,
) -> int:
    """The whole process: logging, an event loop, `run`; returns the exit code.

    Typical script end: ``sys.exit(run_agent(main, type="probe", version="1.0"))``.
    """
    if configure_logging:
        logging.basicConfig(
            level=logging.INFO,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )

    async def _go() -> int:
        agent = Agent(type, version, labels=labels, options=options, environ=environ)
        return await run(agent, main)

    return asyncio.run(_go())
