"""`SyncAgent`: the SDK for plain scripts without asyncio (a thin facade).

The async `Agent` runs on an event loop in a background thread; this class
forwards to it. SIGTERM/SIGINT (when entered from the main thread) only set
`stopping`, so the script's loop ends at its next `sleep`::

    from agent_runtime.sync import SyncAgent

    with SyncAgent("backup", "1.0") as agent:
        while agent.sleep(60):
            count = run_backup(agent.config.json())
            agent.metric("files", count, type="backup")
    # leaving the block ran the stop hooks, flushed metrics, closed the link
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from types import FrameType
from typing import Any, TypeVar

from agent_runtime._agent import Agent, AgentOptions
from agent_runtime._config import AgentConfig

__all__ = ["SyncAgent"]

_T = TypeVar("_T")
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_Handler = Callable[[int, FrameType | None], Any] | int | None


class SyncAgent:
    """An `Agent` for synchronous code; arguments as for `Agent`."""

    def __init__(
        self,
        type: str,
        version: str = "0",
        *,
        labels: Mapping[str, str] | None = None,
        environ: Mapping[str, str] | None = None,
        options: AgentOptions | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="agent-runtime", daemon=True
        )
        self._stopping = threading.Event()
        self._previous: dict[signal.Signals, _Handler] = {}
        self.agent = Agent(type, version, labels=labels, environ=environ, options=options)
        """The async Agent underneath (use its methods only through this class)."""

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def start(self) -> AgentConfig:
        """Register (waiting while the daemon is unreachable); errors as `Agent.start`."""
        self._thread.start()
        try:
            return self._run(self.agent.start())
        except BaseException:
            self._shutdown_loop()
            raise

    def stop(self) -> None:
        """Run the stop hooks, flush metrics and close; safe to call twice."""
        if self._thread.is_alive():
            try:
                self._run(self.agent.stop())
            finally:
                self._shutdown_loop()
        self._restore_signals()

    def __enter__(self) -> SyncAgent:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        try:
            self.start()
        except BaseException:
            self._restore_signals()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.request_stop()

    def _restore_signals(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _shutdown_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    @property
    def config(self) -> AgentConfig:
        """The newest verified config."""
        return self.agent.config

    @property
    def stopping(self) -> bool:
        """True once a stop was requested (signal, `request_stop`, or refusal)."""
        return self._stopping.is_set() or self.agent.stopping

    def request_stop(self) -> None:
        """Ask the script to stop: `sleep` returns False from now on."""
        self._stopping.set()
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.agent.request_stop)

    def sleep(self, seconds: float) -> bool:
        """Sleep unless a stop comes first; True while the script should go on."""
        end = time.monotonic() + seconds
        while not self.stopping:
            left = end - time.monotonic()
            if left <= 0:
                break
            self._stopping.wait(min(0.1, left))  # 0.1: also notice a stop the agent decided
        return not self.stopping

    def metric(self, name: str, value: float, *, type: str = "custom") -> None:
        """Queue one value (ValueError for a bad name or value); see `Agent.metric`."""
        self.record(type, {name: value})

    def record(self, type: str, values: Mapping[str, float]) -> None:
        """Queue one sample with several values; see `Agent.record`."""

        async def add() -> None:
            self.agent.record(type, values)

        self._run(add())

    def on_stop(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Run `hook()` when stopping, newest first (it runs on the agent's thread)."""
        return self.agent.on_stop(hook)

    def on_config(self, callback: Callable[[AgentConfig], None]) -> Callable[[AgentConfig], None]:
        """Call `callback(config)` with the current config and each newer one (agent's thread)."""

        async def register() -> None:
            self.agent.on_config(callback)

        if self._thread.is_alive():
            self._run(register())
        else:
            self.agent.on_config(callback)
        return callback
