"""Following an agent's config: parse each version, keep the last good one.

Both examples get their settings as JSON from the daemon. A version that
does not parse is logged and ignored (the agent keeps its previous
settings), exactly like a corrupt payload is by the SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from agent_runtime import Agent, AgentConfig

__all__ = ["BadSettings", "Follower", "load_json_arg"]

T = TypeVar("T")
log = logging.getLogger("agent_runtime.examples")


class BadSettings(ValueError):
    """A config that does not describe valid settings; the message names the key."""


def load_json_arg(value: str) -> Any:
    """`--config` as inline JSON (starting with '{') or the path of a JSON file.

    ValueError with a one-line reason when it is neither.
    """
    text = value
    if not value.lstrip().startswith("{"):
        try:
            text = Path(value).read_text()
        except OSError as exc:
            raise ValueError(f"--config {value}: cannot read: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config {value}: not JSON: {exc}") from None


class Follower(Generic[T]):
    """The current parsed settings of an agent, updated from its configs.

    `parse` turns JSON data into settings (ValueError for bad data);
    `default` is used until the daemon sends a non-empty config.
    """

    def __init__(self, agent: Agent, parse: Callable[[Any], T], default: T) -> None:
        self.current = default
        """The settings in force."""
        self.version = 0
        """Config version they came from (0 = the default)."""
        self._parse = parse
        self._changed = asyncio.Event()
        self._agent = agent
        self._take(agent.config)  # in force at once, not only when the callback runs
        agent.on_config(self._apply)

    def _take(self, config: AgentConfig) -> bool:
        """Parse and adopt `config`; False if it is not news or does not parse."""
        if config.empty or config.version == self.version:
            return False
        try:
            settings = self._parse(config.json())
        except ValueError as exc:
            log.error("config version %d ignored: %s", config.version, exc)  # noqa: TRY400
            return False
        self.current = settings
        self.version = config.version
        return True

    def _apply(self, config: AgentConfig) -> None:
        if self._take(config):
            self._changed.set()

    async def wait(self, seconds: float) -> bool:
        """Sleep `seconds`, waking early for a new config; False once the agent stops."""
        if not self._changed.is_set():
            stop = asyncio.ensure_future(self._agent.wait_stopping())
            change = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({stop, change}, timeout=seconds, return_when="FIRST_COMPLETED")
            finally:
                for task in (stop, change):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        self._changed.clear()
        return not self._agent.stopping
