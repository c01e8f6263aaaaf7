"""fleetctl's configuration: ~/.config/fleet/fleetctl.toml, FLEET_* env, flags.

Precedence, highest first: command-line flags, ``FLEET_*`` environment
variables, the config file, the defaults below. The file is found at
``--config``, else ``$FLEETCTL_CONFIG``, else
``$XDG_CONFIG_HOME/fleet/fleetctl.toml`` (``~/.config/...``); only an
explicitly named file must exist.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from fleet.config import load_config
from fleet.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "FleetctlConfig",
    "default_config_path",
    "load_settings",
    "tls_sources",
]

ENV_PREFIX = "FLEET_"
"""Env overrides: FLEET_MANAGER, FLEET_CA, FLEET_CERT, FLEET_KEY, FLEET_TIMEOUT, ..."""


@dataclass(frozen=True)
class FleetctlConfig:
    """Where the manager is and which operator certificate to show it."""

    manager: str = "127.0.0.1:7443"
    """host:port of the manager's gRPC listener (FLEET_MANAGER, --manager)."""
    ca: Path | None = None
    """The fleet CA certificate (FLEET_CA, --ca)."""
    cert: Path | None = None
    """This operator's certificate, role operator (FLEET_CERT, --cert)."""
    key: Path | None = None
    """The certificate's private key (FLEET_KEY, --key)."""
    trust_domain: str = ""
    """Expect the manager named manager.<trust_domain>; empty: the one in --cert."""
    timeout: float = 30.0
    """Seconds per call before giving up (FLEET_TIMEOUT, --timeout); streams are exempt."""
    output: Literal["table", "wide", "json", "yaml"] = "table"
    """Default -o format (FLEET_OUTPUT)."""

    def validate(self) -> None:
        """Cross-field checks, run by load_config."""
        if self.timeout <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")
        host, sep, port = self.manager.rpartition(":")
        if not sep or not host or not port.isdigit():
            # `-m` is --manager: `apply -m "why"` (git's habit) lands here.
            hint = " (-m is --manager; a change cause is --message)" if " " in self.manager else ""
            raise ValueError(f"manager must be host:port, got {self.manager!r}{hint}")


def default_config_path(environ: Mapping[str, str]) -> Path:
    """$XDG_CONFIG_HOME/fleet/fleetctl.toml, falling back to ~/.config."""
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fleet" / "fleetctl.toml"


def load_settings(
    config_path: Path | None,
    overrides: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
) -> FleetctlConfig:
    """File + env via fleet.config, then the flags in `overrides` (None = not given).

    ConfigError (one line) for a missing explicit file or any bad value.
    """
    env = os.environ if environ is None else environ
    path = _config_file(config_path, env)
    config = load_config(FleetctlConfig, path, env_prefix=ENV_PREFIX, environ=env)
    given = {k: v for k, v in overrides.items() if v is not None}
    if given:
        config = replace(config, **given)
        try:
            config.validate()
        except ValueError as exc:
            raise ConfigError(f"command line: {exc}") from None
    return replace(
        config,
        ca=_expand(config.ca),
        cert=_expand(config.cert),
        key=_expand(config.key),
    )


def _config_file(config_path: Path | None, env: Mapping[str, str]) -> Path | None:
    explicit = config_path or (Path(env["FLEETCTL_CONFIG"]) if env.get("FLEETCTL_CONFIG") else None)
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"{explicit}: no such config file (from --config or FLEETCTL_CONFIG)")
        return explicit
    found = default_config_path(env)
    return found if found.is_file() else None


def tls_sources(
    config_path: Path | None,
    overrides: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Where `load_settings` took each TLS file from, by `TLSConfig` field, for messages:
    "--cert", "FLEET_CERT" or "<config file>: cert" (the precedence of `load_settings`)."""
    env = os.environ if environ is None else environ
    path = _config_file(config_path, env)
    sources = {}
    for field, name in (("ca_file", "ca"), ("cert_file", "cert"), ("key_file", "key")):
        if overrides.get(name) is not None:
            sources[field] = f"--{name}"
        elif env.get(f"{ENV_PREFIX}{name.upper()}"):
            sources[field] = f"{ENV_PREFIX}{name.upper()}"
        else:
            sources[field] = f"{path}: {name}" if path else name
    return sources


def _expand(path: Path | None) -> Path | None:
    return None if path is None else path.expanduser()
