"""An agent's configuration at one version, the checksum check, and the tracker.

The daemon sends the payload with its version and the lowercase hex SHA-256
of the payload; `verify` refuses a payload that does not hash to it, so a
corrupted config is never applied.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fleet.errors import FleetError
from fleet.v1 import agent_pb2

__all__ = ["EMPTY", "AgentConfig", "ConfigChecksumError", "ConfigTracker", "verify"]

log = logging.getLogger("agent_runtime")


class ConfigChecksumError(FleetError):
    """A config from the daemon does not match its SHA-256; it was not applied.

    The agent keeps running with its previous config. A repeat means the
    daemon's copy is corrupt: push the config again.
    """


@dataclass(frozen=True)
class AgentConfig:
    """A verified configuration as the daemon delivered it."""

    payload: bytes
    """The opaque bytes of the agent's spec config (JSON by convention)."""
    version: int
    """The daemon's version of this config; 0 before any config arrived."""
    sha256: str
    """Lowercase hex SHA-256 of `payload` (verified)."""

    @classmethod
    def of(cls, payload: bytes, version: int) -> AgentConfig:
        """A config with its checksum computed (for tests and defaults)."""
        return cls(payload=payload, version=version, sha256=hashlib.sha256(payload).hexdigest())

    @property
    def empty(self) -> bool:
        """True when the daemon has no config for this agent (empty payload)."""
        return not self.payload

    def text(self) -> str:
        """The payload decoded as UTF-8."""
        return self.payload.decode("utf-8")

    def json(self) -> Any:
        """The payload parsed as JSON; an empty payload is ``{}``.

        Raises ValueError (json.JSONDecodeError or UnicodeDecodeError) when
        the payload is not JSON; the agent decides what to do with that.
        """
        if not self.payload.strip():
            return {}
        return json.loads(self.payload)


EMPTY = AgentConfig.of(b"", 0)
"""The config an agent has before the daemon sent one."""


def verify(message: agent_pb2.AgentConfig) -> AgentConfig:
    """The verified `AgentConfig` of a wire message; ConfigChecksumError if corrupt."""
    actual = hashlib.sha256(message.payload).hexdigest()
    if actual != message.sha256.lower():
        raise ConfigChecksumError(
            f"config version {message.version} rejected: its payload ({len(message.payload)} "
            f"bytes) hashes to sha256 {actual[:12]}..., the daemon sent "
            f"{message.sha256[:12] or '(none)'}...; keeping the previous config"
        )
    return AgentConfig(payload=bytes(message.payload), version=message.version, sha256=actual)


class ConfigTracker:
    """The config an agent runs with, and who is waiting for the next one.

    Configs are states, not events: a waiter that falls behind gets the
    newest. Versions only move forward, except that Register's answer is
    taken as is (a restarted daemon may count versions from 1 again).
    """

    def __init__(self) -> None:
        self.current = EMPTY
        """The newest verified config."""
        self.rejected_version: int | None = None
        """The last version refused for a checksum mismatch (not fetched again)."""
        self._changed = asyncio.Event()
        self._closed = False

    def offer(self, config: AgentConfig, *, authoritative: bool) -> bool:
        """Adopt `config` if it is news; True if it was adopted."""
        current = self.current
        if (config.version, config.sha256) == (current.version, current.sha256):
            return False
        if not authoritative and config.version <= current.version:
            return False
        self.current = config
        log.info("config version %d applied (%d bytes)", config.version, len(config.payload))
        self._wake()
        return True

    def receive(self, message: agent_pb2.AgentConfig, *, authoritative: bool) -> None:
        """Verify and offer a config from the wire; a corrupt one is logged and dropped."""
        try:
            config = verify(message)
        except ConfigChecksumError as exc:
            self.rejected_version = message.version
            log.error("%s", exc)  # noqa: TRY400 -- the message says it all; no traceback
            return
        self.offer(config, authoritative=authoritative)

    def wants(self, version: int) -> bool:
        """Whether a daemon announcing `version` has something worth fetching."""
        return version > self.current.version and version != self.rejected_version

    def watch_from(self) -> int:
        """The after_version for a new WatchConfig (skips a version already refused)."""
        return max(self.current.version, self.rejected_version or 0)

    def close(self) -> None:
        """End every `iterate`."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def iterate(self, *, current: bool = True) -> AsyncIterator[AgentConfig]:
        """The current config (unless `current=False`), then each newer one, until closed."""
        seen: AgentConfig | None = None if current else self.current
        while not self._closed:
            if self.current is not seen:
                seen = self.current
                yield seen
                continue
            await self._changed.wait()
