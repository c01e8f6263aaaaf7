"""What an agent is: its spec, validated once, hashed for "needs a restart".

`AgentSpec` is a frozen dataclass of the types `fleet.config.load_config`
understands, so ``[[agents]]`` tables in ``daemon.toml`` load straight into
it; pushed updates (``PushUpdate``) are converted to it by the servicer.

`process_hash` covers exactly what the running process was started with:
argv, env, cwd, user, type and version (a version bump is a deploy). Anything
else (restart policy, backoff, timeouts, log limits, health, labels, config)
is supervisor policy or data and is applied to a running agent in place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pwd
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from fleet.errors import InvalidArgument
from fleet.labels import LabelError, is_valid_label_value, validate_labels

__all__ = [
    "DEFAULT_LOG_MAX_BYTES",
    "AgentSpec",
    "BackoffSpec",
    "HealthSpec",
    "RestartPolicy",
    "SpecError",
    "resolve_executable",
    "signal_number",
    "spec_from_dict",
    "spec_to_dict",
]

RestartPolicy = Literal["always", "on-failure", "never"]
HealthKind = Literal["none", "heartbeat"]
DEFAULT_LOG_MAX_BYTES = 10 * 1024 * 1024
MAX_SECONDS = 7 * 24 * 3600.0
"""Longest duration a spec may set (a week): any longer is a typo, not a plan."""
"""Rotate an agent's log when it grows past this many bytes (10 MiB)."""


class SpecError(InvalidArgument, ValueError):
    """An agent spec is invalid; `field` names it (``agents[<id>].<field>``).

    Both an `InvalidArgument` (a servicer lets it propagate: INVALID_ARGUMENT)
    and a `ValueError` (what `fleet.config` reports as a config error).
    Fix the spec; retrying cannot help.
    """


@dataclass(frozen=True)
class BackoffSpec:
    """Delay between restarts of an agent that exits before `start_secs`."""

    initial: float = 1.0
    """Delay after the first early exit, in seconds."""
    multiplier: float = 2.0
    """Each further early exit multiplies the delay by this (>= 1)."""
    max: float = 60.0
    """The delay never exceeds this many seconds."""
    jitter: float = 0.2
    """Fraction (0..1) of each delay that is randomised (taken off the top)."""


@dataclass(frozen=True)
class HealthSpec:
    """How the daemon decides an agent is healthy beyond "its process exists"."""

    kind: HealthKind = "none"
    """"none": a live process is healthy; "heartbeat": it must heartbeat via the SDK."""
    timeout: float = 30.0
    """For "heartbeat": unhealthy after this many seconds without one."""


@dataclass(frozen=True)
class AgentSpec:
    """One supervised agent, as an operator writes it in ``[[agents]]``."""

    id: str
    """Unique per node; a valid label value (also names the log file)."""
    argv: tuple[str, ...]
    """Program and arguments, never run through a shell; argv[0] is looked up in PATH."""
    type: str = "process"
    """Free-form kind of agent, reported to the manager."""
    version: str = ""
    """Version of the agent's software; changing it restarts the agent."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment, on top of the daemon's own."""
    cwd: str = ""
    """Working directory; empty means the daemon's. Must exist."""
    user: str = ""
    """User to run as (needs a root daemon); empty runs as the daemon's user."""
    autostart: bool = True
    """Start when the daemon starts or the agent is added."""
    restart: RestartPolicy = "on-failure"
    """What to do after the agent exits on its own, having run start_secs."""
    expected_exit_codes: tuple[int, ...] = (0,)
    """Exit codes that count as success for restart = "on-failure"."""
    start_secs: float = 1.0
    """The agent is RUNNING once it has stayed up this long; earlier exits back off."""
    backoff: BackoffSpec = field(default_factory=BackoffSpec)
    """Delays between restarts after early exits."""
    max_retries: int = 5
    """Early exits in a row allowed before the agent is FATAL."""
    stop_signal: str = "SIGTERM"
    """Signal sent to the agent's process group to stop it ("SIGTERM" or "TERM")."""
    stop_timeout: float = 10.0
    """Seconds to wait after stop_signal before SIGKILLing the whole group."""
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES
    """Rotate the log past this size; 0 never rotates."""
    log_backups: int = 3
    """Rotated logs kept (<id>.log.1 .. .N)."""
    labels: dict[str, str] = field(default_factory=dict)
    """Labels the manager selects agents by."""
    health: HealthSpec = field(default_factory=HealthSpec)
    """Health check beyond process liveness."""
    config: str = ""
    """Opaque payload for SDK agents (JSON by convention); changes reach them live."""

    def validate(self) -> None:
        """Raise `SpecError` with a one-line message naming the first bad field."""
        _validate(self)

    def process_hash(self) -> str:
        """sha256 of what the process was started with; a change needs a restart."""
        started_with = {
            "argv": list(self.argv),
            "env": dict(sorted(self.env.items())),
            "cwd": self.cwd,
            "user": self.user,
            "type": self.type,
            "version": self.version,
        }
        blob = json.dumps(started_with, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def stop_signum(self) -> signal.Signals:
        """`stop_signal` as a signal number (the spec must be valid)."""
        return signal_number(self.stop_signal)


def signal_number(name: str) -> signal.Signals:
    """ "SIGTERM", "TERM" or "15" -> signal.SIGTERM; ValueError if unknown."""
    text = name.strip().upper()
    if not text.startswith("SIG") and not text.isdigit():
        text = "SIG" + text
    try:
        return signal.Signals(int(text)) if text.isdigit() else signal.Signals[text]
    except (KeyError, ValueError):
        raise ValueError(f"unknown signal {name!r}") from None


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


def _validate(spec: AgentSpec) -> None:
    def bad(name: str, message: str) -> SpecError:
        return SpecError(message, field=f"agents[{spec.id}].{name}")

    if not isinstance(spec.id, str) or not spec.id or not is_valid_label_value(spec.id):
        raise SpecError(
            f"agent id {spec.id!r} must be 1..63 characters of [-_.A-Za-z0-9] that start "
            "and end alphanumeric",
            field="agents[].id",
        )
    if not spec.argv:
        raise bad("argv", "must not be empty (the program to run and its arguments)")
    if any(not isinstance(a, str) or "\0" in a for a in spec.argv):
        raise bad("argv", "arguments must be strings without NUL bytes")
    for key, value in spec.env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise bad("env", f"invalid environment variable name or value {key!r}")
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
    if spec.restart not in get_args(RestartPolicy):
        raise bad("restart", f"must be one of always, on-failure, never; got {spec.restart!r}")
    if any(not 0 <= code <= 255 for code in spec.expected_exit_codes):
        raise bad("expected_exit_codes", "exit codes must be 0..255")
    b = spec.backoff
    durations = {
        "start_secs": spec.start_secs,
        "stop_timeout": spec.stop_timeout,
        "backoff.initial": b.initial,
        "backoff.max": b.max,
    }
    for name, seconds in durations.items():
        # Bounded (not just >= 0): every duration ends up as int64 milliseconds
        # on the wire, and infinity would make the agent unstoppable.
        if not 0 <= seconds <= MAX_SECONDS:
            raise bad(name, f"must be 0..{MAX_SECONDS:.0f} seconds, got {seconds}")
    if not 1 <= b.multiplier <= 100:
        raise bad("backoff.multiplier", f"must be 1..100, got {b.multiplier}")
    if not 0 <= b.jitter <= 1:
        raise bad("backoff.jitter", f"must be a fraction 0..1, got {b.jitter}")
    if spec.max_retries < 0:
        raise bad("max_retries", f"must be >= 0, got {spec.max_retries}")
    try:
        signal_number(spec.stop_signal)
    except ValueError as exc:
        raise bad("stop_signal", str(exc)) from None
    if spec.log_max_bytes < 0 or spec.log_backups < 0:
        raise bad("log_max_bytes", "log_max_bytes and log_backups must be >= 0")
    if spec.health.kind not in get_args(HealthKind):
        raise bad("health.kind", f"must be none or heartbeat, got {spec.health.kind!r}")
    if not 0 < spec.health.timeout <= MAX_SECONDS:
        raise bad(
            "health.timeout",
            f"must be > 0 and <= {MAX_SECONDS:.0f} seconds, got {spec.health.timeout}",
        )
    try:
        validate_labels(spec.labels, field=f"agents[{spec.id}].labels")
    except LabelError as exc:
        raise SpecError(exc.message) from None


def spec_to_dict(spec: AgentSpec) -> dict[str, Any]:
    """A JSON-ready dict of `spec` (for the daemon's state files)."""
    return dataclasses.asdict(spec)


def spec_from_dict(data: Mapping[str, Any]) -> AgentSpec:
    """Inverse of `spec_to_dict`; unknown keys are ignored (older/newer files)."""
    known = {f.name for f in dataclasses.fields(AgentSpec)}
    values = {k: v for k, v in data.items() if k in known}
    values["argv"] = tuple(values.get("argv", ()))
    if "expected_exit_codes" in values:
        values["expected_exit_codes"] = tuple(values["expected_exit_codes"])
    if "backoff" in values:
        values["backoff"] = BackoffSpec(**values["backoff"])
    if "health" in values:
        values["health"] = HealthSpec(**values["health"])
    return AgentSpec(**values)
