"""The host's side of an agent spec: what only this host can check.

The spec itself (`AgentSpec` and its parts, host-independent validation,
the restart hash, the message form) is `fleet.agentspec`, shared with the
manager and fleetctl; it is re-exported here for the supervisor. A spec the
daemon runs must also pass `check_on_host`: its program, user and working
directory exist here.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping

from fleet.agentspec import (
    DEFAULT_LOG_MAX_BYTES,
    AgentSpec,
    BackoffSpec,
    HealthSpec,
    RestartPolicy,
    SpecError,
    signal_number,
    spec_from_dict,
    spec_to_dict,
)

__all__ = [
    "DEFAULT_LOG_MAX_BYTES",
    "AgentSpec",
    "BackoffSpec",
    "HealthSpec",
    "RestartPolicy",
    "SpecError",
    "check_on_host",
    "resolve_executable",
    "signal_number",
    "spec_from_dict",
    "spec_to_dict",
    "validate_here",
]


def validate_here(spec: AgentSpec) -> None:
    """`spec.validate()` and `check_on_host(spec)`: everything, first problem first."""
    spec.validate()
    check_on_host(spec)


def check_on_host(spec: AgentSpec) -> None:
    """Raise `SpecError` naming the field if the program, user or directory is missing here."""

    def bad(name: str, message: str) -> SpecError:
        return SpecError(message, field=f"agents[{spec.id}].{name}")

    if spec.cwd:
        where = spec.cwd if os.path.isabs(spec.cwd) else os.path.join(os.getcwd(), spec.cwd)
        if not os.path.isdir(where):
            raise bad("cwd", f"directory {spec.cwd!r} does not exist ({where})")
    if spec.user:
        try:
            pw = pwd.getpwnam(spec.user)
        except (KeyError, ValueError):  # ValueError: a NUL byte in the name
            raise bad("user", f"unknown user {spec.user!r}") from None
        if os.geteuid() != 0 and pw.pw_uid != os.geteuid():
            raise bad("user", f"cannot run as {spec.user!r}: the daemon is not running as root")
    if resolve_executable(spec.argv[0], env=spec.env, cwd=spec.cwd) is None:
        raise bad("argv", f"program {spec.argv[0]!r} not found or not executable")


def resolve_executable(argv0: str, *, env: Mapping[str, str], cwd: str) -> str | None:
    """The file execvp would run for `argv0`, or None when there is none.

    A name with a "/" is taken as a path (relative to `cwd`, as the child
    sees it after chdir); otherwise PATH (from `env`, else the daemon's) is
    searched.
    """
    if "/" in argv0:
        path = os.path.join(cwd or os.getcwd(), argv0)
        return path if _is_executable(path) else None
    search = env.get("PATH", os.environ.get("PATH", os.defpath))
    for directory in search.split(os.pathsep):
        candidate = os.path.join(directory or ".", argv0)
        if _is_executable(candidate):
            return candidate
    return None


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)
