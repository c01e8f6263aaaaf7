"""What an agent is: its spec, shared by the daemon, the manager and fleetctl.

`AgentSpec` is a frozen dataclass of the types `fleet.config.load_config`
understands, so ``[[agents]]`` tables in a daemon's TOML (and the agent part
of a definition file) load straight into it, and `spec_from_proto` /
`spec_to_proto` convert it to and from the `AgentSpec` message a manager
pushes. `AgentSpec.validate` checks everything that does not depend on the
host (the manager refuses a bad definition with it); the daemon adds the
checks only a host can make (the program, the user, the directory exist:
`daemon.supervisor.spec.check_on_host`).

`process_hash` covers exactly what the running process was started with:
argv, env, cwd, user, type and version (a version bump is a deploy). Anything
else (restart policy, backoff, timeouts, log limits, health, labels, config)
is supervisor policy or data and is applied to a running agent in place.

Pushed specs follow proto3 rules: an unset scalar is its zero value. Where
zero is not a usable setting (stop signal, stop timeout, log size, backoff
parameters, health timeout, restart policy, expected exit codes) the zero
means "the default of the TOML spec", so a manager can send only what it
cares about. `autostart`, `start_secs`, `max_retries` and `log_backups` are
taken literally (0 / false are valid).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args
from urllib.parse import urlsplit

from fleet.artifacts import ArtifactRef, validate_digest, validate_name, validate_version
from fleet.errors import InvalidArgument
from fleet.labels import LabelError, is_valid_label_value, validate_labels
from fleet.v1 import common_pb2

__all__ = [
    "DEFAULT_LOG_MAX_BYTES",
    "MAX_SECONDS",
    "PROBE_KINDS",
    "AgentSpec",
    "BackoffSpec",
    "HealthSpec",
    "RestartPolicy",
    "SpecError",
    "signal_number",
    "spec_from_dict",
    "spec_from_proto",
    "spec_to_dict",
    "spec_to_proto",
    "specs_from_proto",
    "split_host_port",
]

RestartPolicy = Literal["always", "on-failure", "never"]
HealthKind = Literal["none", "heartbeat", "http", "tcp", "command"]
PROBE_KINDS = frozenset({"http", "tcp", "command"})
"""Health kinds the daemon runs itself, every `interval` seconds."""
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
    """"none": a live process is healthy; "heartbeat": it must heartbeat via the SDK;
    "http", "tcp", "command": the daemon probes it every `interval` seconds."""
    timeout: float = 30.0
    """"heartbeat": unhealthy after this many seconds without one; probes: how long one may take."""
    interval: float = 10.0
    """Probes: seconds from the end of one probe to the start of the next."""
    failure_threshold: int = 1
    """Probes: failures in a row before the agent is unhealthy."""
    initial_delay: float = 0.0
    """Probes: seconds after the agent is RUNNING before the first probe."""
    restart_when_unhealthy: bool = False
    """Probes: restart the agent when it turns unhealthy (unless its restart policy is "never")."""
    url: str = ""
    """"http": the URL to GET, http://host:port/path or https://... (verified)."""
    expected_status_min: int = 200
    """"http": lowest status that passes."""
    expected_status_max: int = 399
    """"http": highest status that passes."""
    address: str = ""
    """"tcp": host:port ([v6]:port) that must accept a connection."""
    command: tuple[str, ...] = ()
    """"command": program and arguments (no shell), run like the agent; must exit 0."""


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
    revision: int = 0
    """Definition revision of a pushed spec (set by the manager; 0 for the host's own)."""
    artifact: ArtifactRef | None = None
    """A pushed spec's artifact (filled in by the manager); ``{artifact}`` is its path on the
    node. A host's own agent cannot name one."""

    config_refused_keys: ClassVar[Mapping[str, str]] = {
        "artifact": "only an agent a manager pushes can use an artifact (push it with fleetctl"
        " artifacts push and name it in a definition: docs/artifacts.md)",
    }
    """Keys of a host's ``[[agents]]`` table refused with why, before their value is read."""

    def validate(self) -> None:
        """Raise `SpecError` with a one-line message naming the first bad field."""
        _validate(self)

    def process_hash(self) -> str:
        """sha256 of what the process was started with; a change needs a restart."""
        started_with: dict[str, Any] = {
            "argv": list(self.argv),
            "env": dict(sorted(self.env.items())),
            "cwd": self.cwd,
            "user": self.user,
            "type": self.type,
            "version": self.version,
        }
        if self.artifact is not None:  # only then: older hashes stay valid (re-adoption)
            started_with["artifact"] = self.artifact.digest
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


MAX_REVISION = 2**63 - 1
"""Revisions are uint64 on the wire but int64 in SQL."""


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
    for name in ("user", "cwd", "type", "version"):
        if "\0" in getattr(spec, name):
            raise bad(name, "must not contain NUL bytes")
    if not 0 <= spec.revision <= MAX_REVISION:
        raise bad("revision", f"must be 0..{MAX_REVISION}, got {spec.revision}")
    for key, value in spec.env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise bad("env", f"invalid environment variable name or value {key!r}")
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
    _validate_health(spec.health, bad)
    try:
        validate_labels(spec.labels, field=f"agents[{spec.id}].labels")
    except LabelError as exc:
        raise SpecError(exc.message) from None
    if spec.artifact is not None:
        _validate_artifact(spec.artifact, f"agents[{spec.id}].artifact")


def _validate_artifact(ref: ArtifactRef, where: str) -> None:
    """What is set must be well formed; a definition may name it by name and version or by
    digest alone (the manager resolves the rest), so nothing is required here."""
    try:
        if ref.name:
            validate_name(ref.name, field=f"{where}.name")
        if ref.version:
            validate_version(ref.version, field=f"{where}.version")
        if ref.digest:
            validate_digest(ref.digest, field=f"{where}.digest")
    except InvalidArgument as exc:
        raise SpecError(exc.message.removeprefix(f"{exc.field}: "), field=exc.field) from None
    if ref.size_bytes < 0:
        raise SpecError(f"must be >= 0, got {ref.size_bytes}", field=f"{where}.size_bytes")


def _validate_health(h: HealthSpec, bad: Callable[[str, str], SpecError]) -> None:
    kinds = get_args(HealthKind)
    if h.kind not in kinds:
        raise bad("health.kind", f"must be one of {', '.join(kinds)}; got {h.kind!r}")
    if not 0 < h.timeout <= MAX_SECONDS:
        raise bad(
            "health.timeout", f"must be > 0 and <= {MAX_SECONDS:.0f} seconds, got {h.timeout}"
        )
    # What belongs to another kind is a typo or a half-edited check: say so.
    for name, owner in (("url", "http"), ("address", "tcp"), ("command", "command")):
        if getattr(h, name) and h.kind != owner:
            raise bad(f"health.{name}", f'is only for kind = "{owner}" (kind is {h.kind!r})')
    if h.kind not in PROBE_KINDS:
        return
    if not 0 < h.interval <= MAX_SECONDS:
        raise bad(
            "health.interval", f"must be > 0 and <= {MAX_SECONDS:.0f} seconds, got {h.interval}"
        )
    if not 0 <= h.initial_delay <= MAX_SECONDS:
        raise bad(
            "health.initial_delay", f"must be 0..{MAX_SECONDS:.0f} seconds, got {h.initial_delay}"
        )
    if not 1 <= h.failure_threshold <= 1000:
        raise bad("health.failure_threshold", f"must be 1..1000, got {h.failure_threshold}")
    if h.kind == "http":
        _validate_url(h.url, bad)
        low, high = h.expected_status_min, h.expected_status_max
        if not 100 <= low <= high <= 599:
            raise bad(
                "health.expected_status_min",
                f"the expected status range must lie in 100..599 with min <= max, "
                f"got {low}..{high}",
            )
    elif h.kind == "tcp":
        try:
            split_host_port(h.address)
        except ValueError as exc:
            raise bad("health.address", str(exc)) from None
    elif not h.command or not h.command[0]:
        raise bad("health.command", "must not be empty (the program to run and its arguments)")
    elif any(not isinstance(a, str) or "\0" in a for a in h.command):
        raise bad("health.command", "arguments must be strings without NUL bytes")


def _validate_url(url: str, bad: Callable[[str, str], SpecError]) -> None:
    if not url:
        raise bad("health.url", 'must be set for kind = "http" (http://host:port/path)')
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise bad("health.url", f"must not contain spaces or control characters: {url!r}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise bad("health.url", f"{url!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise bad("health.url", f"scheme must be http or https, got {url!r}")
    if not parts.hostname:
        raise bad("health.url", f"has no host: {url!r}")
    if port == 0:
        raise bad("health.url", f"port must be 1..65535: {url!r}")
    if parts.username is not None or parts.password is not None:
        raise bad("health.url", "must not carry credentials (user:password@)")


def split_host_port(address: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port); ValueError naming what is wrong."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"must be host:port, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address as [addr]:port, got {address!r}")
    if not host or any(c.isspace() or c in "/[]" for c in host):
        raise ValueError(f"bad host in {address!r}")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 1..65535, got {address!r}")
    return host, int(port_text)


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
        health = dict(values["health"])
        health["command"] = tuple(health.get("command", ()))
        known_health = {f.name for f in dataclasses.fields(HealthSpec)}
        values["health"] = HealthSpec(**{k: v for k, v in health.items() if k in known_health})
    if values.get("artifact") is not None:
        values["artifact"] = ArtifactRef(**values["artifact"])
    return AgentSpec(**values)


_RESTART_FROM_PROTO: dict[int, Literal["always", "on-failure", "never"]] = {
    common_pb2.RESTART_POLICY_UNSPECIFIED: "on-failure",
    common_pb2.RESTART_POLICY_ALWAYS: "always",
    common_pb2.RESTART_POLICY_ON_FAILURE: "on-failure",
    common_pb2.RESTART_POLICY_NEVER: "never",
}
_RESTART_TO_PROTO: dict[str, common_pb2.RestartPolicy.ValueType] = {
    "always": common_pb2.RESTART_POLICY_ALWAYS,
    "on-failure": common_pb2.RESTART_POLICY_ON_FAILURE,
    "never": common_pb2.RESTART_POLICY_NEVER,
}


_HEALTH_TO_PROTO: dict[HealthKind, common_pb2.HealthCheckKind.ValueType] = {
    "none": common_pb2.HEALTH_CHECK_KIND_UNSPECIFIED,
    "heartbeat": common_pb2.HEALTH_CHECK_KIND_HEARTBEAT,
    "http": common_pb2.HEALTH_CHECK_KIND_HTTP,
    "tcp": common_pb2.HEALTH_CHECK_KIND_TCP,
    "command": common_pb2.HEALTH_CHECK_KIND_COMMAND,
}
_HEALTH_FROM_PROTO: dict[int, HealthKind] = {n: kind for kind, n in _HEALTH_TO_PROTO.items()}


def _one_check(msg: common_pb2.AgentSpec, where: str) -> HealthSpec:
    """The agent's one check, from `health` or `checks` (fleetctl puts probes there)."""
    found: list[tuple[str, common_pb2.HealthCheck]] = []
    if msg.health.kind:
        found.append((f"{where}.health", msg.health))
    found += [(f"{where}.checks[{i}]", check) for i, check in enumerate(msg.checks)]
    if len(found) > 1:
        # Named by kind: `health = [a, b]` in a file reaches here as `health` and `checks`.
        kinds = [_HEALTH_FROM_PROTO.get(check.kind, str(check.kind)) for _, check in found]
        raise InvalidArgument(
            f"one health check per agent is supported, got {len(found)}: {', '.join(kinds)}",
            field=f"{where}.checks",
        )
    if not found:
        return _health_from_proto(msg.health, "none")
    field, check = found[0]
    kind = _HEALTH_FROM_PROTO.get(check.kind)
    if kind is None:
        raise InvalidArgument(f"unknown health kind {check.kind}", field=f"{field}.kind")
    return _health_from_proto(check, kind)


def _health_from_proto(msg: common_pb2.HealthCheck, kind: HealthKind) -> HealthSpec:
    d = HealthSpec()
    # 0 and 0 mean the default range; a range with one end set is taken as sent.
    low, high = msg.expected_status_min, msg.expected_status_max
    if not low and not high:
        low, high = d.expected_status_min, d.expected_status_max
    return HealthSpec(
        kind=kind,
        timeout=_or_default(msg.timeout_seconds, d.timeout),
        interval=_or_default(msg.interval_seconds, d.interval),
        failure_threshold=msg.failure_threshold or 1,
        initial_delay=msg.initial_delay_seconds,
        restart_when_unhealthy=msg.restart_when_unhealthy,
        url=msg.url,
        expected_status_min=low,
        expected_status_max=high,
        address=msg.address,
        command=tuple(msg.command),
    )


def _health_to_proto(h: HealthSpec) -> common_pb2.HealthCheck:
    return common_pb2.HealthCheck(
        kind=_HEALTH_TO_PROTO[h.kind],
        timeout_seconds=h.timeout,
        interval_seconds=h.interval,
        failure_threshold=h.failure_threshold,
        initial_delay_seconds=h.initial_delay,
        restart_when_unhealthy=h.restart_when_unhealthy,
        url=h.url,
        expected_status_min=h.expected_status_min,
        expected_status_max=h.expected_status_max,
        address=h.address,
        command=list(h.command),
    )


def _or_default(value: float, default: float) -> float:
    return value if value else default


def _spec_default(name: str) -> Any:
    for f in dataclasses.fields(AgentSpec):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    raise KeyError(name)  # a renamed AgentSpec field: a bug here, caught by the tests


def spec_from_proto(msg: common_pb2.AgentSpec, *, where: str = "agent") -> AgentSpec:
    """Build an `AgentSpec` from its message (not yet validated: `apply` does).

    Raises InvalidArgument naming `where` and the field for values that have
    no dataclass form (an unknown enum value, config that is not UTF-8).
    """
    restart = _RESTART_FROM_PROTO.get(msg.restart)
    if restart is None:
        raise InvalidArgument(f"unknown restart policy {msg.restart}", field=f"{where}.restart")
    health = _one_check(msg, where)
    try:
        config = msg.config.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument("is not UTF-8 text", field=f"{where}.config") from None
    d_backoff = BackoffSpec()
    return AgentSpec(
        id=msg.id,
        argv=tuple(msg.argv),
        type=msg.type or _spec_default("type"),
        version=msg.version,
        env=dict(msg.env),
        cwd=msg.cwd,
        user=msg.user,
        autostart=msg.autostart,
        restart=restart,
        expected_exit_codes=tuple(msg.expected_exit_codes) or _spec_default("expected_exit_codes"),
        start_secs=msg.start_secs,
        backoff=BackoffSpec(
            initial=_or_default(msg.backoff.initial_seconds, d_backoff.initial),
            multiplier=_or_default(msg.backoff.multiplier, d_backoff.multiplier),
            max=_or_default(msg.backoff.max_seconds, d_backoff.max),
            jitter=msg.backoff.jitter,
        ),
        max_retries=msg.max_retries,
        stop_signal=msg.stop_signal or _spec_default("stop_signal"),
        stop_timeout=_or_default(msg.stop_timeout_seconds, _spec_default("stop_timeout")),
        log_max_bytes=msg.log_max_bytes or _spec_default("log_max_bytes"),
        log_backups=msg.log_backups,
        labels=dict(msg.labels),
        health=health,
        config=config,
        revision=msg.revision,
        artifact=ArtifactRef.from_proto(msg.artifact) if msg.HasField("artifact") else None,
    )


def specs_from_proto(msgs: Iterable[common_pb2.AgentSpec]) -> list[AgentSpec]:
    """Every pushed spec, each error naming `agents[i]` (or the agent's id)."""
    out: list[AgentSpec] = []
    for i, msg in enumerate(msgs):
        out.append(spec_from_proto(msg, where=f"agents[{i}]" + (f" ({msg.id})" if msg.id else "")))
    return out


def spec_to_proto(spec: AgentSpec) -> common_pb2.AgentSpec:
    """The message form of a spec (the inverse of `spec_from_proto`)."""
    return common_pb2.AgentSpec(
        id=spec.id,
        type=spec.type,
        version=spec.version,
        argv=list(spec.argv),
        env=dict(spec.env),
        cwd=spec.cwd,
        user=spec.user,
        autostart=spec.autostart,
        restart=_RESTART_TO_PROTO[spec.restart],
        expected_exit_codes=list(spec.expected_exit_codes),
        start_secs=spec.start_secs,
        backoff=common_pb2.Backoff(
            initial_seconds=spec.backoff.initial,
            multiplier=spec.backoff.multiplier,
            max_seconds=spec.backoff.max,
            jitter=spec.backoff.jitter,
        ),
        max_retries=spec.max_retries,
        stop_signal=spec.stop_signal,
        stop_timeout_seconds=spec.stop_timeout,
        log_max_bytes=spec.log_max_bytes,
        log_backups=spec.log_backups,
        labels=dict(spec.labels),
        health=_health_to_proto(spec.health),
        config=spec.config.encode("utf-8"),
        revision=spec.revision,
        artifact=spec.artifact.to_proto() if spec.artifact is not None else None,
    )
