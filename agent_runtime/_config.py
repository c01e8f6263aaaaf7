"""An agent's configuration at one version, and the checksum check.

The daemon sends the payload with its version and the lowercase hex SHA-256
of the payload; `verify` refuses a payload that does not hash to it, so a
corrupted config is never applied.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from fleet.errors import FleetError
from fleet.v1 import agent_pb2

__all__ = ["EMPTY", "AgentConfig", "ConfigChecksumError", "verify"]


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
