"""How an agent finds and identifies itself to its daemon: the one place.

The daemon starts every agent with ``FLEET_AGENT_ID`` (the agent's id in the
daemon's spec) and ``FLEET_DAEMON_SOCKET`` (the path of the agent socket) and
may add ``FLEET_AGENT_TOKEN``. The daemon identifies the caller by its peer
pid (SO_PEERCRED); the token, when present, is sent as gRPC metadata
``x-fleet-agent-token`` on every call.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from fleet.errors import ConfigError

__all__ = ["ENV_AGENT_ID", "ENV_SOCKET", "ENV_TOKEN", "TOKEN_METADATA_KEY", "DaemonEndpoint"]

ENV_AGENT_ID = "FLEET_AGENT_ID"
ENV_SOCKET = "FLEET_DAEMON_SOCKET"
ENV_TOKEN = "FLEET_AGENT_TOKEN"  # noqa: S105 -- the variable's name, not a secret
TOKEN_METADATA_KEY = "x-fleet-agent-token"  # noqa: S105 -- a metadata key, not a secret


@dataclass(frozen=True)
class DaemonEndpoint:
    """Where the daemon's AgentService is and who this agent is to it."""

    agent_id: str
    """This agent's id as the daemon's spec names it (FLEET_AGENT_ID)."""
    socket_path: str
    """Path of the daemon's agent socket (FLEET_DAEMON_SOCKET)."""
    token: str = ""
    """Optional per-agent token (FLEET_AGENT_TOKEN); "" when the daemon sets none."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DaemonEndpoint:
        """Read the endpoint from `environ` (default os.environ).

        Raises ConfigError naming the missing variable: a program that was
        not started by fleet-daemon (or a FakeDaemon) has nothing to talk to.
        """
        env = os.environ if environ is None else environ
        for name in (ENV_AGENT_ID, ENV_SOCKET):
            if not env.get(name, ""):
                raise ConfigError(
                    f"{name} is not set: agents are started by fleet-daemon, which sets it "
                    "(in tests, use agent_runtime.testing.FakeDaemon and its .env)"
                )
        return cls(
            agent_id=env[ENV_AGENT_ID], socket_path=env[ENV_SOCKET], token=env.get(ENV_TOKEN, "")
        )

    @property
    def target(self) -> str:
        """The gRPC target to dial ("unix:<path>", insecure: the socket is local only)."""
        return f"unix:{self.socket_path}"

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC metadata for every call (the token, when there is one)."""
        return ((TOKEN_METADATA_KEY, self.token),) if self.token else ()

    def as_env(self) -> dict[str, str]:
        """The environment variables that describe this endpoint (for a child process)."""
        env = {ENV_AGENT_ID: self.agent_id, ENV_SOCKET: self.socket_path}
        if self.token:
            env[ENV_TOKEN] = self.token
        return env
