"""Job files (TOML or YAML) and `fleetctl run` flags in, one `jobs_pb2.JobSpec` out.

Pure: text and flag values in, a message out (reading the file is the
command's job). A job file holds one job::

    name = "apt-upgrade"
    selector = "role=web"          # or nodes = ["web-1", "web-2"]
    max_concurrency = "25%"        # or 10
    max_errors = 2
    canary = 1
    timeout = "10m"                # per target
    delivery_timeout = "5m"
    lock = "apt"

    [[steps]]
    name = "update"
    argv = ["apt-get", "update"]
    env = { DEBIAN_FRONTEND = "noninteractive" }
    timeout = "5m"

    [[steps]]
    name = "report"
    script = "dpkg -l | wc -l"
    interpreter = ["/bin/sh", "-eu"]
    when = "always"                # on_success (default), on_failure, always

Durations are seconds or strings like "30s" / "5m", as in definition files
(`deffile.py`, whose value checks this reuses). Every problem is a
`JobSpecError` naming the file, the line when it can be found, and the key:
``job.toml:14: steps[1].when: must be one of on_success, on_failure, always;
got 'sometimes'``. Flags override the file (`build_spec`): targets (-l or
--node replace the file's selector or nodes), the window and timeouts, the
lock and name; --user and --cwd replace every step's, --env adds to every
step's environment.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from fleet import selectors
from fleet.v1 import jobs_pb2
from fleetctl.deffile import (
    FileFormat,
    _Bad,
    _checked_keys,
    _int,
    _kind,
    _seconds,
    _str,
    _strings,
    _table,
    yaml_problem,
)
from fleetctl.timespec import parse_duration

__all__ = [
    "JobFileError",
    "JobFlags",
    "JobSpecError",
    "build_spec",
    "detect_format",
    "load_job",
    "parse_amount",
    "parse_env",
    "spec_from_dict",
]

WHEN = {
    "on_success": jobs_pb2.STEP_WHEN_ON_SUCCESS,
    "on_failure": jobs_pb2.STEP_WHEN_ON_FAILURE,
    "always": jobs_pb2.STEP_WHEN_ALWAYS,
}
"""The `when` spellings of a job file."""

_TOP_KEYS = frozenset(
    {
        "name",
        "selector",
        "nodes",
        "max_concurrency",
        "max_errors",
        "canary",
        "timeout",
        "delivery_timeout",
        "lock",
        "steps",
    }
)
_STEP_KEYS = frozenset(
    {"name", "argv", "script", "interpreter", "env", "cwd", "user", "timeout", "when"}
)
_ENV_NAME = re.compile(r"[^=\0]+")


class JobSpecError(ValueError):
    """The job as given cannot run; the message is one line naming the flag or file key."""


class JobFileError(JobSpecError):
    """A job file is unusable; the message names the file, the line if known, and the key."""


# --- reading the file -----------------------------------------------------------------


def detect_format(path: str, text: str) -> FileFormat:
    """TOML or YAML by extension; for stdin ("-"), TOML if it parses as TOML."""
    lower = path.lower()
    if lower.endswith(".toml"):
        return "toml"
    if lower.endswith((".yaml", ".yml")):
        return "yaml"
    if path != "-":
        raise JobFileError(
            f"{path}: cannot tell TOML from YAML by the name; name it .toml, .yaml or .yml"
        )
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return "yaml"
    return "toml"


def load_job(source: str, text: str) -> jobs_pb2.JobSpec:
    """The job in one file's `text` (`source` names the file in errors)."""
    fmt = detect_format(source, text)
    data: Any
    if fmt == "toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise JobFileError(f"{source}: not valid TOML: {exc}") from None
    else:
        try:
            documents = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as exc:
            raise JobFileError(f"{source}: not valid YAML: {yaml_problem(exc)}") from None
        if len(documents) != 1:
            raise JobFileError(
                f"{source}: holds {len(documents)} YAML documents; a job file holds one job"
            )
        data = documents[0]
    if not isinstance(data, Mapping):
        raise JobFileError(
            f"{source}: expected the job's keys (name, selector, steps, ...), got {_kind(data)}"
        )
    try:
        return spec_from_dict(data)
    except _Bad as exc:
        line = _line_of(fmt, text, exc.key)
        where = f"{source}:{line}" if line else source
        raise JobFileError(f"{where}: {exc.key}: {exc.problem}") from None


# --- values ---------------------------------------------------------------------------


def _positive_seconds(value: Any, key: str) -> float:
    seconds = _seconds(value, key)
    if seconds <= 0:
        raise _Bad(key, f"must be a duration > 0, got {value!r}")
    return seconds


def _amount(value: Any, key: str) -> str:
    """A window: a number of targets (>= 1) or a percentage (1%..100%)."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(text, str):
        raw = text.strip()
        digits = raw.removesuffix("%").strip()
        if digits.isdigit() and int(digits) >= 1 and (not raw.endswith("%") or int(digits) <= 100):
            return f"{int(digits)}%" if raw.endswith("%") else str(int(digits))
    raise _Bad(key, f"{_AMOUNT}, got {_kind(value)}")


_AMOUNT = "must be a number of targets (>= 1) or a percentage like 25%"


def _env(value: Any, key: str) -> dict[str, str]:
    table = _table(value, key)
    out = {}
    for name, v in table.items():
        if not _ENV_NAME.fullmatch(name):
            raise _Bad(
                f"{key}.{name}", "an environment variable name must be non-empty and hold no '='"
            )
        out[name] = _str(v, f"{key}.{name}")
    return out


def _interpreter(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise _Bad(key, f"cannot split {value!r} into words: {exc}") from None
    else:
        argv = _strings(value, key)
    if not argv or not argv[0]:
        raise _Bad(key, 'must name a program, e.g. ["/bin/sh", "-eu"]')
    return argv


def _step(raw: Any, index: int) -> jobs_pb2.JobStep:
    key = f"steps[{index}]"
    table = _table(raw, key)
    _checked_keys(table, dict.fromkeys(_STEP_KEYS), key)
    command = jobs_pb2.JobCommand()
    if "argv" in table and "script" in table:
        raise _Bad(f"{key}.script", "give argv or script (with interpreter), not both")
    if "argv" in table:
        argv = _strings(table["argv"], f"{key}.argv")
        if not argv or not argv[0]:
            raise _Bad(f"{key}.argv", "must name a program (an empty argv runs nothing)")
        command.argv.extend(argv)
        if "interpreter" in table:
            raise _Bad(f"{key}.interpreter", "goes with script, not argv")
    elif "script" in table:
        command.script = _str(table["script"], f"{key}.script")
        if not command.script.strip():
            raise _Bad(f"{key}.script", "is empty")
        if "interpreter" not in table:
            raise _Bad(
                f"{key}.interpreter",
                'is required with script, e.g. interpreter = ["/bin/sh", "-eu"]',
            )
        command.interpreter.extend(_interpreter(table["interpreter"], f"{key}.interpreter"))
    else:
        raise _Bad(key, "needs argv (a program and its arguments) or script and interpreter")
    if "env" in table:
        command.env.update(_env(table["env"], f"{key}.env"))
    if "cwd" in table:
        command.cwd = _str(table["cwd"], f"{key}.cwd")
    if "user" in table:
        command.user = _str(table["user"], f"{key}.user")
    if "timeout" in table:
        command.timeout_seconds = _positive_seconds(table["timeout"], f"{key}.timeout")
    step = jobs_pb2.JobStep(command=command)
    if "name" in table:
        step.name = _str(table["name"], f"{key}.name")
    if "when" in table:
        when = _str(table["when"], f"{key}.when")
        if when not in WHEN:
            raise _Bad(f"{key}.when", f"must be one of {', '.join(WHEN)}; got {when!r}")
        step.when = WHEN[when]
    return step


def spec_from_dict(data: Mapping[str, Any]) -> jobs_pb2.JobSpec:
    """A job file's table as a JobSpec; `_Bad` (with the key) for a bad value."""
    _checked_keys(data, dict.fromkeys(_TOP_KEYS), "")
    spec = jobs_pb2.JobSpec()
    if "name" in data:
        spec.name = _str(data["name"], "name")
    if "selector" in data and "nodes" in data:
        raise _Bad("nodes", "give selector or nodes, not both")
    if "selector" in data:
        text = _str(data["selector"], "selector")
        try:
            spec.selector.CopyFrom(selectors.to_proto(selectors.parse(text)))
        except selectors.SelectorError as exc:
            raise _Bad("selector", f"invalid selector {text!r}: {exc.message}") from None
    if "nodes" in data:
        nodes = _strings(data["nodes"], "nodes")
        if not nodes or not all(nodes):
            raise _Bad("nodes", "must list node ids (non-empty)")
        twice = sorted({n for n in nodes if nodes.count(n) > 1})
        if twice:
            raise _Bad("nodes", f"names {twice[0]!r} twice")
        spec.node_ids.extend(nodes)
    if "max_concurrency" in data:
        spec.max_concurrency = _amount(data["max_concurrency"], "max_concurrency")
    if "max_errors" in data:
        spec.max_errors = _int(data["max_errors"], "max_errors")
    if "canary" in data:
        spec.canary = _int(data["canary"], "canary")
    if "timeout" in data:
        spec.timeout_seconds = _positive_seconds(data["timeout"], "timeout")
    if "delivery_timeout" in data:
        spec.delivery_timeout_seconds = _positive_seconds(
            data["delivery_timeout"], "delivery_timeout"
        )
    if "lock" in data:
        spec.lock = _str(data["lock"], "lock")
    if "steps" not in data:
        raise _Bad("steps", "is required: at least one step ([[steps]] in TOML)")
    raw_steps = data["steps"]
    if not isinstance(raw_steps, list) or not raw_steps:
        raise _Bad("steps", f"must be a non-empty list of step tables, got {_kind(raw_steps)}")
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_steps):
        step = _step(raw, i)
        if step.name and step.name in seen:
            raise _Bad(f"steps[{i}].name", f"{step.name!r} is also steps[{seen[step.name]}]'s name")
        seen.setdefault(step.name, i)
        spec.steps.append(step)
    return spec


# --- where a key is in the text (best effort) -----------------------------------------

_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _path(key: str) -> list[str | int]:
    return [
        m.group(1) if m.group(1) is not None else int(m.group(2)) for m in _PATH_PART.finditer(key)
    ]


def _line_of(fmt: FileFormat, text: str, key: str) -> int | None:
    """The 1-based line holding `key` ("steps[1].when"), or None if it cannot be found."""
    path = _path(key)
    if not path:
        return None
    return _yaml_line(text, path) if fmt == "yaml" else _toml_line(text, path)


def _yaml_line(text: str, path: Sequence[str | int]) -> int | None:
    try:
        node: Any = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in path:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            found = [(k, v) for k, v in node.value if getattr(k, "value", None) == part]
            if not found:
                break  # a missing key: point at the table that lacks it
            key_node, node = found[0]
            line = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\s\"-]+?)\s*\]\]?\s*(#.*)?$")


def _toml_line(text: str, path: Sequence[str | int]) -> int | None:
    """Top-level keys, and keys of the n-th ``[[steps]]`` table (or its sub-tables)."""
    lines = text.splitlines()
    if path[0] == "steps" and len(path) >= 2 and isinstance(path[1], int):
        headers = [i for i, ln in enumerate(lines) if _is_header(ln, "[[", "steps")]
        if path[1] >= len(headers):
            return _assignment(lines, 0, "steps")
        start = headers[path[1]]
        if len(path) < 3 or not isinstance(path[2], str):
            return start + 1
        found = _assignment(lines, start + 1, path[2], sub_table=f"steps.{path[2]}")
        return found if found is not None else start + 1
    if isinstance(path[0], str):
        return _assignment(lines, 0, path[0])
    return None


def _is_header(line: str, brackets: str, name: str) -> bool:
    match = _HEADER.match(line)
    return match is not None and match.group(1) == brackets and match.group(2) == name


def _assignment(lines: list[str], start: int, key: str, *, sub_table: str = "") -> int | None:
    """The line assigning `key` in the table that begins at `start` (or its sub-table)."""
    assign = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=")
    for i in range(start, len(lines)):
        header = _HEADER.match(lines[i])
        if header:
            if sub_table and header.group(1) == "[" and header.group(2) == sub_table:
                return i + 1
            if not sub_table or header.group(1) == "[[":
                return None
            continue
        if assign.match(lines[i]):
            return i + 1
    return None


# --- flags ----------------------------------------------------------------------------


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """--env K=V values; JobSpecError naming the bad one."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.fullmatch(name) or "\0" in value:
            raise JobSpecError(f"--env {item!r}: use NAME=VALUE (NAME non-empty, without '=')")
        out[name] = value
    return out


def parse_amount(text: str, flag: str) -> str:
    """A --max-concurrency value ("10" or "25%"); JobSpecError naming `flag`."""
    try:
        return _amount(text, flag)
    except _Bad:
        raise JobSpecError(f"{flag} {text!r}: {_AMOUNT}") from None


def _flag_seconds(text: str, flag: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise JobSpecError(f"{flag}: {exc}") from None
    if seconds <= 0:
        raise JobSpecError(f"{flag} {text!r}: must be a duration > 0")
    return seconds


@dataclass(frozen=True)
class JobFlags:
    """What `fleetctl run` was given; None (or empty) means "not given"."""

    command: tuple[str, ...] = ()
    """CMD ARGS... after the options (or after --)."""
    selector: str | None = None
    """-l: the nodes whose labels match."""
    nodes: tuple[str, ...] = ()
    """--node (repeated): exactly these nodes."""
    max_concurrency: str | None = None
    """--max-concurrency N or P%."""
    max_errors: int | None = None
    """--max-errors N."""
    canary: int | None = None
    """--canary N."""
    timeout: str | None = None
    """--timeout: a duration, per target."""
    delivery_timeout: str | None = None
    """--delivery-timeout: a duration."""
    lock: str | None = None
    """--lock NAME."""
    user: str | None = None
    """--user: every step runs as this user."""
    env: tuple[str, ...] = ()
    """--env K=V (repeated): added to every step's environment."""
    cwd: str | None = None
    """--cwd: every step's working directory."""
    name: str | None = None
    """--name: the job's name."""


def build_spec(flags: JobFlags, file_spec: jobs_pb2.JobSpec | None = None) -> jobs_pb2.JobSpec:
    """The JobSpec to send: the file's (if any) with the flags applied over it."""
    if file_spec is not None and flags.command:
        raise JobSpecError(
            f"give a command or -f FILE, not both (got -f and {shlex.join(flags.command)!r})"
        )
    spec = jobs_pb2.JobSpec()
    if file_spec is not None:
        spec.CopyFrom(file_spec)
    elif not flags.command:
        raise JobSpecError(
            "nothing to run: give the command after the options"
            " (fleetctl run -l env=prod -- uptime) or a job file with -f"
        )
    elif not flags.command[0]:
        raise JobSpecError("the command's program is empty")
    else:
        spec.steps.append(jobs_pb2.JobStep(command=jobs_pb2.JobCommand(argv=flags.command)))
    if flags.selector is not None and flags.nodes:
        raise JobSpecError("give -l SELECTOR or --node NODE, not both")
    if flags.selector is not None:
        try:
            sel = selectors.parse(flags.selector)
        except selectors.SelectorError as exc:
            raise JobSpecError(f"invalid selector {flags.selector!r}: {exc.message}") from None
        spec.selector.CopyFrom(selectors.to_proto(sel))
        del spec.node_ids[:]
    if flags.nodes:
        if not all(flags.nodes):
            raise JobSpecError("--node: a node id must not be empty")
        spec.ClearField("selector")
        del spec.node_ids[:]
        spec.node_ids.extend(dict.fromkeys(flags.nodes))  # once each, in the given order
    if not spec.HasField("selector") and not spec.node_ids:
        raise JobSpecError(
            "say where: -l SELECTOR for the nodes it matches, or --node NODE (repeatable)"
            + (" (or selector / nodes in the file)" if file_spec is not None else "")
        )
    if flags.max_concurrency is not None:
        spec.max_concurrency = parse_amount(flags.max_concurrency, "--max-concurrency")
    if flags.max_errors is not None:
        if flags.max_errors < 0:
            raise JobSpecError(f"--max-errors {flags.max_errors}: must be >= 0")
        spec.max_errors = flags.max_errors
    if flags.canary is not None:
        if flags.canary < 0:
            raise JobSpecError(f"--canary {flags.canary}: must be >= 0")
        spec.canary = flags.canary
    if flags.timeout is not None:
        spec.timeout_seconds = _flag_seconds(flags.timeout, "--timeout")
    if flags.delivery_timeout is not None:
        spec.delivery_timeout_seconds = _flag_seconds(flags.delivery_timeout, "--delivery-timeout")
    if flags.lock is not None:
        spec.lock = flags.lock
    if flags.name is not None:
        spec.name = flags.name
    env = parse_env(flags.env)
    for step in spec.steps:
        if flags.user is not None:
            step.command.user = flags.user
        if flags.cwd is not None:
            step.command.cwd = flags.cwd
        step.command.env.update(env)
    return spec
