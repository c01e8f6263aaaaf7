"""Definition files: TOML or YAML in, `desired_pb2.Definition` messages out, and back.

Pure: text in, messages out (reading files and stdin is the command's job).
The keys mirror the `Definition` message, and the agent's keys are spelled
as in a daemon's ``[[agents]]`` table (``stop_timeout``, ``backoff.initial``,
``health.timeout``: seconds without a ``_seconds`` suffix), so an agent
moves from a host's TOML into a definition unchanged. Durations are numbers
of seconds or strings like "30s" / "5m"; ``max_parallel`` and ``canary``
are a number or a percentage ("25%").

Every problem is a `DefinitionFileError` whose message names the file, the
definition (its name, or its position when it has none) and the key:
``web.toml: definition 'web': agent.stop_signal: unknown signal 'SIGFOO'``.

A key left out of the file means the daemon TOML's default, including the
four a pushed spec takes literally (autostart, start_secs, max_retries,
log_backups): the file says the same thing in a definition and in a
daemon.toml.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from fleet import selectors
from fleet.agentspec import AgentSpec, signal_number
from fleet.errors import InvalidArgument
from fleet.v1 import common_pb2, desired_pb2
from fleetctl.timespec import parse_duration

__all__ = [
    "DefinitionFileError",
    "FileFormat",
    "Loaded",
    "definition_from_dict",
    "definition_to_dict",
    "detect_format",
    "load_text",
    "render",
]

FileFormat = Literal["toml", "yaml"]

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class DefinitionFileError(ValueError):
    """A definition file is unusable; the message is one line naming file, definition, key."""


@dataclass(frozen=True)
class Loaded:
    """One definition read from a file."""

    source: str
    """The file it came from ("-" for stdin)."""
    index: int
    """Its position in that file, from 1."""
    definition: desired_pb2.Definition
    """The message to send."""

    @property
    def label(self) -> str:
        """How messages name it: "definition 'web'" or "definition #2"."""
        name = self.definition.name
        return f"definition {name!r}" if name else f"definition #{self.index}"


class _Bad(Exception):
    """A bad value at `key` (a dotted path inside one definition)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


# --- reading the file -----------------------------------------------------------------


def detect_format(path: str, text: str, explicit: FileFormat | None = None) -> FileFormat:
    """TOML or YAML: `explicit`, else by extension, else (stdin) by trying TOML first."""
    if explicit is not None:
        return explicit
    lower = path.lower()
    if lower.endswith(".toml"):
        return "toml"
    if lower.endswith((".yaml", ".yml")):
        return "yaml"
    if path != "-":
        raise DefinitionFileError(
            f"{path}: cannot tell TOML from YAML by the name; name it .toml, .yaml or .yml,"
            " or pass --format"
        )
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return "yaml"
    return "toml"


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML parse error in one line, 1-based line and column first.

    PyYAML's own text spans lines, names the input "<unicode string>" and
    quotes the line with a caret, which reads as noise once joined.
    """
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return " ".join(str(exc).split())
    mark = exc.problem_mark
    out = f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    if exc.context and exc.context_mark is not None:
        at = exc.context_mark
        out += f" ({exc.context} at line {at.line + 1}, column {at.column + 1})"
    elif exc.context:
        out += f" ({exc.context})"
    return out


def _raw_definitions(source: str, text: str, fmt: FileFormat) -> list[Any]:
    """The definition tables of one file, before any check of their keys."""
    if fmt == "toml":
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise DefinitionFileError(f"{source}: not valid TOML: {exc}") from None
        documents = [data]
    else:
        try:
            documents = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as exc:
            raise DefinitionFileError(f"{source}: not valid YAML: {yaml_problem(exc)}") from None
    out: list[Any] = []
    for doc in documents:
        if isinstance(doc, list):
            out.extend(doc)
        elif isinstance(doc, Mapping) and "definitions" in doc:
            extra = sorted(str(k) for k in doc if k != "definitions")
            if extra:
                raise DefinitionFileError(
                    f"{source}: unknown top-level key {extra[0]!r}; the file holds"
                    " `definitions` (a list of definition tables) only"
                )
            items = doc["definitions"]
            if not isinstance(items, list):
                raise DefinitionFileError(
                    f"{source}: definitions: must be a list of tables"
                    + (" ([[definitions]] in TOML)" if fmt == "toml" else "")
                )
            out.extend(items)
        elif isinstance(doc, Mapping) and "name" in doc:
            out.append(doc)  # one definition on its own
        elif isinstance(doc, Mapping):
            keys = sorted(str(k) for k in doc)
            hint = "[[definitions]] tables" if fmt == "toml" else "a `definitions:` list"
            raise DefinitionFileError(
                f"{source}: no definitions found (top-level keys: {', '.join(keys) or 'none'});"
                f" write {hint}, each with a name"
            )
        else:
            raise DefinitionFileError(
                f"{source}: expected definition tables, got {type(doc).__name__}"
            )
    if not out:
        raise DefinitionFileError(f"{source}: the file holds no definitions")
    return out


def load_text(source: str, text: str, fmt: FileFormat | None = None) -> list[Loaded]:
    """Every definition in one file's `text` (`source` names it in errors)."""
    kind = detect_format(source, text, fmt)
    loaded: list[Loaded] = []
    for i, raw in enumerate(_raw_definitions(source, text, kind), start=1):
        name = raw.get("name") if isinstance(raw, Mapping) else None
        label = f"definition {name!r}" if isinstance(name, str) and name else f"definition #{i}"
        try:
            definition = definition_from_dict(raw)
        except _Bad as exc:
            raise DefinitionFileError(f"{source}: {label}: {exc.key}: {exc.problem}") from None
        loaded.append(Loaded(source, i, definition))
    return loaded


def check_unique(loaded: Sequence[Loaded]) -> None:
    """Refuse two definitions of one name (in one file or across files)."""
    seen: dict[str, Loaded] = {}
    for item in loaded:
        name = item.definition.name
        first = seen.get(name)
        if first is not None:
            raise DefinitionFileError(
                f"{item.source}: definition {name!r} is defined twice"
                f" (also {first.source} #{first.index}); each name once per apply"
            )
        seen[name] = item


# --- values ---------------------------------------------------------------------------


def _table(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _Bad(key, f"must be a table of keys, got {_kind(value)}")
    for k in value:
        if not isinstance(k, str):
            raise _Bad(key, f"keys must be strings, got {k!r}")
    return value


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    return type(value).__name__


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        hint = ' (quote it: "1.0")' if isinstance(value, int | float) else ""
        raise _Bad(key, f"must be a string, got {_kind(value)}{hint}")
    if "\0" in value:
        raise _Bad(key, "must not contain NUL bytes")
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _Bad(key, f"must be true or false, got {_kind(value)}")
    return value


def _int(value: Any, key: str, *, minimum: int = 0, maximum: int = 2**31 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(key, f"must be a whole number, got {_kind(value)}")
    if not minimum <= value <= maximum:
        raise _Bad(key, f"must be {minimum}..{maximum}, got {value}")
    return value


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad(key, f"must be a number, got {_kind(value)}")
    if not math.isfinite(value):
        raise _Bad(key, f"must be a finite number, got {value}")
    return float(value)


def _seconds(value: Any, key: str) -> float:
    """A duration: seconds as a number, or "30s" / "5m" / "1h30m"."""
    if isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise _Bad(key, str(exc)) from None
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad(
            key, f"must be seconds (a number, or a string like 30s or 5m), got {_kind(value)}"
        )
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise _Bad(key, f"must be a duration >= 0, got {value}")
    return seconds


def _strings(value: Any, key: str) -> list[str]:
    if not isinstance(value, list):
        raise _Bad(key, f"must be a list of strings, got {_kind(value)}")
    return [_str(v, f"{key}[{i}]") for i, v in enumerate(value)]


def _string_map(value: Any, key: str) -> dict[str, str]:
    table = _table(value, key)
    return {k: _str(v, f"{key}.{k}") for k, v in table.items()}


def _amount(value: Any, key: str) -> str:
    """ "3", 3 or "25%": what UpdatePolicy carries."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _Bad(key, f"must be >= 0, got {value}")
        return str(value)
    if isinstance(value, str):
        raw = value.strip()
        digits = raw[:-1].strip() if raw.endswith("%") else raw
        if digits.isdigit():
            if raw.endswith("%") and int(digits) > 100:
                raise _Bad(key, f"a percentage must be at most 100%, got {raw}")
            return f"{int(digits)}%" if raw.endswith("%") else str(int(digits))
    raise _Bad(key, f"must be a number of nodes or a percentage like 25%, got {_kind(value)}")


def _checked_keys(table: Mapping[str, Any], known: Mapping[str, Any], key: str) -> None:
    for k in table:
        if k not in known:
            where = f"{key}.{k}" if key else k
            raise _Bad(where, f"unknown key; expected one of {', '.join(sorted(known))}")


# --- the definition -------------------------------------------------------------------

_RESTART = {
    "always": common_pb2.RESTART_POLICY_ALWAYS,
    "on-failure": common_pb2.RESTART_POLICY_ON_FAILURE,
    "never": common_pb2.RESTART_POLICY_NEVER,
}
_HEALTH_KIND = {
    "heartbeat": common_pb2.HEALTH_CHECK_KIND_HEARTBEAT,
    "http": common_pb2.HEALTH_CHECK_KIND_HTTP,
    "tcp": common_pb2.HEALTH_CHECK_KIND_TCP,
    "command": common_pb2.HEALTH_CHECK_KIND_COMMAND,
}


def _spec_default(name: str) -> Any:
    for f in dataclasses.fields(AgentSpec):
        if f.name == name:
            return f.default
    raise KeyError(name)


# Taken literally from a pushed spec (proto3 zero is a valid value): a file
# that leaves them out means the daemon TOML's default, so they are sent.
_LITERAL_DEFAULTS: dict[str, Any] = {
    name: _spec_default(name) for name in ("autostart", "start_secs", "max_retries", "log_backups")
}


def _health(value: Any, key: str) -> common_pb2.HealthCheck | None:
    """One health check table; None for kind = "none"."""
    table = _table(value, key)
    _checked_keys(table, _HEALTH_SETTERS, key)
    kind = _str(table.get("kind", ""), f"{key}.kind")
    if kind == "none":
        if len(table) > 1:
            raise _Bad(key, 'kind = "none" takes no other keys')
        return None
    if kind not in _HEALTH_KIND:
        raise _Bad(
            f"{key}.kind",
            f"must be one of heartbeat, http, tcp, command, none; got {kind!r}"
            if kind
            else "is required (heartbeat, http, tcp, command or none)",
        )
    check = common_pb2.HealthCheck(kind=_HEALTH_KIND[kind])
    for k, v in table.items():
        if k != "kind":
            _HEALTH_SETTERS[k](check, v, f"{key}.{k}")
    needs = {"http": "url", "tcp": "address", "command": "command"}.get(kind)
    if needs and needs not in table:
        raise _Bad(f"{key}.{needs}", f"is required for a {kind} check")
    low, high = check.expected_status_min, check.expected_status_max
    if (low or high) and kind != "http":
        raise _Bad(f"{key}.expected_status_min", "applies to http checks only")
    if high and low > high:
        raise _Bad(f"{key}.expected_status_max", f"must be >= expected_status_min ({low})")
    return check


def _set(field: str, convert: Callable[[Any, str], Any]) -> Callable[[Any, Any, str], None]:
    def setter(msg: Any, value: Any, key: str) -> None:
        converted = convert(value, key)
        if isinstance(converted, list):
            getattr(msg, field).extend(converted)
        elif isinstance(converted, dict):
            getattr(msg, field).update(converted)
        else:
            setattr(msg, field, converted)

    return setter


def _status(value: Any, key: str) -> int:
    return _int(value, key, minimum=100, maximum=599)


_HEALTH_SETTERS: dict[str, Callable[[Any, Any, str], None]] = {
    "kind": lambda msg, value, key: None,  # read first, by `_health`
    "timeout": _set("timeout_seconds", _seconds),
    "interval": _set("interval_seconds", _seconds),
    "failure_threshold": _set("failure_threshold", lambda v, k: _int(v, k, minimum=1)),
    "url": _set("url", _str),
    "expected_status_min": _set("expected_status_min", _status),
    "expected_status_max": _set("expected_status_max", _status),
    "address": _set("address", _str),
    "command": _set("command", _strings),
    "initial_delay": _set("initial_delay_seconds", _seconds),
    "restart_when_unhealthy": _set("restart_when_unhealthy", _bool),
}


def _set_health(agent: common_pb2.AgentSpec, value: Any, key: str) -> None:
    """`health`: one table, or a list of them; the heartbeat goes to `health`, probes to
    `checks` (what the daemon runs them as)."""
    tables = value if isinstance(value, list) else [value]
    for i, table in enumerate(tables):
        where = f"{key}[{i}]" if isinstance(value, list) else key
        check = _health(table, where)
        if check is None:
            continue
        if check.kind == common_pb2.HEALTH_CHECK_KIND_HEARTBEAT:
            if agent.HasField("health"):
                raise _Bad(where, "one heartbeat check per agent")
            agent.health.CopyFrom(check)
        else:
            agent.checks.append(check)


def _set_checks(agent: common_pb2.AgentSpec, value: Any, key: str) -> None:
    if not isinstance(value, list):
        raise _Bad(key, f"must be a list of health check tables, got {_kind(value)}")
    _set_health(agent, value, key)


def _set_restart(agent: common_pb2.AgentSpec, value: Any, key: str) -> None:
    text = _str(value, key)
    if text not in _RESTART:
        raise _Bad(key, f"must be one of always, on-failure, never; got {text!r}")
    agent.restart = _RESTART[text]


def _set_signal(agent: common_pb2.AgentSpec, value: Any, key: str) -> None:
    text = _str(value, key)
    try:
        signal_number(text)
    except ValueError as exc:
        raise _Bad(key, str(exc)) from None
    agent.stop_signal = text


def _set_config(agent: common_pb2.AgentSpec, value: Any, key: str) -> None:
    """A string as it is; a table or list as compact JSON (the SDK's convention)."""
    if isinstance(value, str):
        agent.config = value.encode()
    elif isinstance(value, Mapping | list):
        try:
            text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise _Bad(key, f"cannot be written as JSON: {exc}") from None
        agent.config = text.encode()
    else:
        raise _Bad(key, f"must be a string, or a table written as JSON; got {_kind(value)}")


def _set_backoff(agent: common_pb2.AgentSpec, value: Any, key: str) -> None:
    table = _table(value, key)
    setters = {
        "initial": _set("initial_seconds", _seconds),
        "multiplier": _set("multiplier", _number),
        "max": _set("max_seconds", _seconds),
        "jitter": _set("jitter", _number),
    }
    _checked_keys(table, setters, key)
    backoff = common_pb2.Backoff()
    for k, v in table.items():
        setters[k](backoff, v, f"{key}.{k}")
    if backoff.multiplier and backoff.multiplier < 1:
        raise _Bad(f"{key}.multiplier", f"must be >= 1, got {backoff.multiplier:g}")
    if not 0 <= backoff.jitter <= 1:
        raise _Bad(f"{key}.jitter", f"must be a fraction 0..1, got {backoff.jitter:g}")
    agent.backoff.CopyFrom(backoff)


def _set_resources(agent: common_pb2.AgentSpec, value: Any, key: str) -> None:
    table = _table(value, key)
    setters = {
        "cpu_millicores": _set("cpu_millicores", lambda v, k: _int(v, k, maximum=2**62)),
        "memory_bytes": _set("memory_bytes", lambda v, k: _int(v, k, maximum=2**62)),
    }
    _checked_keys(table, setters, key)
    for k, v in table.items():
        setters[k](agent.resources, v, f"{key}.{k}")


def _exit_codes(value: Any, key: str) -> list[int]:
    if not isinstance(value, list):
        raise _Bad(key, f"must be a list of exit codes, got {_kind(value)}")
    return [_int(v, f"{key}[{i}]", maximum=255) for i, v in enumerate(value)]


_AGENT_SETTERS: dict[str, Callable[[Any, Any, str], None]] = {
    "id": _set("id", _str),
    "argv": _set("argv", _strings),
    "type": _set("type", _str),
    "version": _set("version", _str),
    "env": _set("env", _string_map),
    "cwd": _set("cwd", _str),
    "user": _set("user", _str),
    "autostart": _set("autostart", _bool),
    "restart": _set_restart,
    "expected_exit_codes": _set("expected_exit_codes", _exit_codes),
    "start_secs": _set("start_secs", _seconds),
    "backoff": _set_backoff,
    "max_retries": _set("max_retries", _int),
    "stop_signal": _set_signal,
    "stop_timeout": _set("stop_timeout_seconds", _seconds),
    "log_max_bytes": _set("log_max_bytes", lambda v, k: _int(v, k, maximum=2**62)),
    "log_backups": _set("log_backups", _int),
    "labels": _set("labels", _string_map),
    "health": _set_health,
    "checks": _set_checks,
    "config": _set_config,
    "resources": _set_resources,
}

_UPDATE_SETTERS: dict[str, Callable[[Any, Any, str], None]] = {
    "max_parallel": _set("max_parallel", _amount),
    "canary": _set("canary", _amount),
    "auto_promote": _set("auto_promote", _bool),
    "min_healthy_time": _set("min_healthy_time_seconds", _seconds),
    "healthy_deadline": _set("healthy_deadline_seconds", _seconds),
    "progress_deadline": _set("progress_deadline_seconds", _seconds),
    "auto_revert": _set("auto_revert", _bool),
    "pause_between_batches": _set("pause_between_batches_seconds", _seconds),
}

_PLACEMENT_SETTERS: dict[str, Callable[[Any, Any, str], None]] = {
    "count": _set("count", _int),
    "spread": _set("spread", _str),
    "reschedule_after": _set("reschedule_after_seconds", _seconds),
}


def _artifact(value: Any, key: str) -> common_pb2.ArtifactRef:
    """{name, version} or {digest}, or the short forms "web:1.4.2" / "sha256:<hex>"."""
    if isinstance(value, str):
        if value.startswith("sha256:"):
            value = {"digest": value}
        else:
            name, sep, version = value.partition(":")
            if not (sep and name and version):
                raise _Bad(key, f'give NAME:VERSION ("web:1.4.2") or a digest, got {value!r}')
            value = {"name": name, "version": version}
    table = _table(value, key)
    _checked_keys(table, {"name": 0, "version": 0, "digest": 0}, key)
    ref = common_pb2.ArtifactRef(
        name=_str(table.get("name", ""), f"{key}.name"),
        version=_str(table.get("version", ""), f"{key}.version"),
        digest=_str(table.get("digest", ""), f"{key}.digest"),
    )
    if ref.digest and not _DIGEST.fullmatch(ref.digest):
        raise _Bad(f"{key}.digest", f"must be sha256:<64 lowercase hex digits>, got {ref.digest!r}")
    if not ref.digest and not (ref.name and ref.version):
        raise _Bad(key, "needs name and version, or digest")
    return ref


_DEFINITION_KEYS = {"name": 0, "selector": 0, "agent": 0, "artifact": 0, "update": 0,
                    "placement": 0}  # fmt: skip


def definition_from_dict(raw: Any) -> desired_pb2.Definition:
    """One definition table -> its message; `_Bad` naming the key for any problem."""
    table = _table(raw, "definition")
    _checked_keys(table, _DEFINITION_KEYS, "")
    if "name" not in table:
        raise _Bad("name", "is required")
    msg = desired_pb2.Definition(name=_str(table["name"], "name"))
    if not msg.name:
        raise _Bad("name", "must not be empty")
    selector_text = _str(table.get("selector", ""), "selector")
    try:
        msg.selector.CopyFrom(selectors.to_proto(selectors.parse(selector_text)))
    except InvalidArgument as exc:
        raise _Bad("selector", f"{selector_text!r}: {exc.message}") from None
    if "agent" not in table:
        raise _Bad("agent", "is required (a table with at least argv)")
    agent = _table(table["agent"], "agent")
    _checked_keys(agent, _AGENT_SETTERS, "agent")
    for k, v in agent.items():
        _AGENT_SETTERS[k](msg.agent, v, f"agent.{k}")
    if not msg.agent.argv:
        raise _Bad("agent.argv", "is required: the program to run and its arguments")
    for name, default in _LITERAL_DEFAULTS.items():
        if name not in agent:
            setattr(msg.agent, name, default)
    if "artifact" in table:
        msg.artifact.CopyFrom(_artifact(table["artifact"], "artifact"))
    for key, setters, target in (
        ("update", _UPDATE_SETTERS, msg.update),
        ("placement", _PLACEMENT_SETTERS, msg.placement),
    ):
        if key in table:
            part = _table(table[key], key)
            _checked_keys(part, setters, key)
            for k, v in part.items():
                setters[k](target, v, f"{key}.{k}")
    return msg


# --- and back: the canonical rendering ------------------------------------------------

_RESTART_NAME = {v: k for k, v in _RESTART.items()}
_HEALTH_NAME = {v: k for k, v in _HEALTH_KIND.items()}


def _health_dict(check: common_pb2.HealthCheck) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": _HEALTH_NAME.get(check.kind, str(check.kind))}
    for key, field in (
        ("timeout", "timeout_seconds"),
        ("interval", "interval_seconds"),
        ("failure_threshold", "failure_threshold"),
        ("url", "url"),
        ("expected_status_min", "expected_status_min"),
        ("expected_status_max", "expected_status_max"),
        ("address", "address"),
        ("initial_delay", "initial_delay_seconds"),
        ("restart_when_unhealthy", "restart_when_unhealthy"),
    ):
        value = getattr(check, field)
        if value:
            out[key] = value
    if check.command:
        out["command"] = list(check.command)
    return out


def _config_value(config: bytes) -> Any:
    """A JSON table written the way `_set_config` writes one, as that table (so a diff
    shows the key that changed); anything else as its text. Both read back exactly."""
    text = config.decode("utf-8", errors="replace")
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if not isinstance(value, dict | list):
        return text
    compact = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return value if compact == text else text


def definition_to_dict(msg: desired_pb2.Definition) -> dict[str, Any]:
    """A definition in the file's spelling (what `definition_from_dict` reads back).

    Unset keys are left out, and so are the four literal agent keys when they
    hold the daemon TOML's default; so the rendering of an unchanged
    definition never differs, and a diff shows only what an operator changed.
    """
    out: dict[str, Any] = {"name": msg.name}
    if msg.HasField("selector"):
        text = str(selectors.from_proto(msg.selector))
        if text:
            out["selector"] = text
    a = msg.agent
    agent: dict[str, Any] = {}
    for key in ("id", "type", "version", "cwd", "user", "stop_signal"):
        if key == "id" and a.id == msg.name:
            continue
        if getattr(a, key):
            agent[key] = getattr(a, key)
    agent["argv"] = list(a.argv)
    if a.env:
        agent["env"] = dict(sorted(a.env.items()))
    if a.labels:
        agent["labels"] = dict(sorted(a.labels.items()))
    for key, default in _LITERAL_DEFAULTS.items():
        if getattr(a, key) != default:
            agent[key] = getattr(a, key)
    if a.restart:
        agent["restart"] = _RESTART_NAME.get(a.restart, str(a.restart))
    if a.expected_exit_codes:
        agent["expected_exit_codes"] = list(a.expected_exit_codes)
    if a.stop_timeout_seconds:
        agent["stop_timeout"] = a.stop_timeout_seconds
    if a.log_max_bytes:
        agent["log_max_bytes"] = a.log_max_bytes
    if a.HasField("backoff"):
        b = a.backoff
        backoff = {
            k: v
            for k, v in (
                ("initial", b.initial_seconds),
                ("multiplier", b.multiplier),
                ("max", b.max_seconds),
                ("jitter", b.jitter),
            )
            if v
        }
        if backoff:
            agent["backoff"] = backoff
    checks = ([a.health] if a.HasField("health") and a.health.kind else []) + list(a.checks)
    if len(checks) == 1:
        agent["health"] = _health_dict(checks[0])
    elif checks:
        agent["health"] = [_health_dict(c) for c in checks]
    if a.config:
        agent["config"] = _config_value(a.config)
    if a.resources.cpu_millicores or a.resources.memory_bytes:
        agent["resources"] = {
            k: v
            for k, v in (
                ("cpu_millicores", a.resources.cpu_millicores),
                ("memory_bytes", a.resources.memory_bytes),
            )
            if v
        }
    out["agent"] = agent
    art = msg.artifact if msg.HasField("artifact") else a.artifact
    if art.name or art.digest:
        out["artifact"] = {
            k: v for k, v in (("name", art.name), ("version", art.version), ("digest", art.digest))
            if v
        }  # fmt: skip
    u = msg.update
    update: dict[str, Any] = {}
    for key, field in (
        ("max_parallel", "max_parallel"),
        ("canary", "canary"),
        ("auto_promote", "auto_promote"),
        ("auto_revert", "auto_revert"),
    ):
        value = getattr(u, field)
        if value:
            update[key] = int(value) if isinstance(value, str) and value.isdigit() else value
    for key, field in (
        ("min_healthy_time", "min_healthy_time_seconds"),
        ("healthy_deadline", "healthy_deadline_seconds"),
        ("progress_deadline", "progress_deadline_seconds"),
        ("pause_between_batches", "pause_between_batches_seconds"),
    ):
        if u.HasField(field):  # type: ignore[arg-type]  # the optional fields above
            update[key] = getattr(u, field)
    if update:
        out["update"] = update
    p = msg.placement
    placement: dict[str, Any] = {}
    if p.count:
        placement["count"] = p.count
    if p.spread:
        placement["spread"] = p.spread
    if p.HasField("reschedule_after_seconds"):
        placement["reschedule_after"] = p.reschedule_after_seconds
    if placement:
        out["placement"] = placement
    return out


def render(msg: desired_pb2.Definition) -> str:
    """The canonical YAML of a definition (what `definitions show` prints and history diffs)."""
    text: str = yaml.safe_dump(
        definition_to_dict(msg), sort_keys=False, allow_unicode=True, width=1_000_000
    )
    return text
