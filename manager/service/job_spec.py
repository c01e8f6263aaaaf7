"""JobSpec validation: every check names the field, and runs before anything is stored.

`check_spec` takes the JobSpec message and returns `CheckedSpec`, the plain
values the rest of the manager uses; `resolve_targets` picks the nodes.
Both raise `InvalidArgument` (FailedPrecondition for a selector that matches
no node: the spec is fine, the fleet is not what it expected).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from fleet import selectors
from fleet.errors import FailedPrecondition, InvalidArgument, Resource
from fleet.labels import validate_label_value, validate_node_id
from fleet.v1 import jobs_pb2
from manager.service.jobs import (
    DEFAULT_DELIVERY_TIMEOUT,
    DEFAULT_TIMEOUT,
    resolve_concurrency,
)

__all__ = [
    "MAX_DELIVERY_TIMEOUT",
    "MAX_STEPS",
    "MAX_TARGETS",
    "MAX_TIMEOUT",
    "CheckedSpec",
    "check_spec",
    "resolve_targets",
]

MAX_STEPS = 100
"""Steps per job."""
MAX_TARGETS = 10_000
"""Nodes per job (node_ids, or what the selector matches)."""
MAX_TIMEOUT = 7 * 86400.0
"""Longest execution timeout (a week)."""
MAX_DELIVERY_TIMEOUT = 86400.0
"""Longest a job waits for an offline node (a day)."""
MAX_ARGS = 4096
"""Arguments per argv (and interpreter)."""
MAX_ARG = 64 * 1024
"""Characters per argument, env value, cwd."""
MAX_SCRIPT = 1024 * 1024
"""A script body's characters."""
MAX_ENV = 256
"""Environment variables per command."""

_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")
_LOCK = re.compile(r"[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?")
_WHEN = frozenset(jobs_pb2.StepWhen.values())


@dataclass(frozen=True)
class CheckedSpec:
    """A valid JobSpec as plain values (and the message itself, for StartJob)."""

    message: jobs_pb2.JobSpec
    """The spec as sent (validated)."""
    selector: selectors.Selector | None
    """The nodes' selector, or None when node_ids lists them."""
    node_ids: tuple[str, ...]
    """The nodes named, in order (empty with a selector)."""
    max_errors: int
    """0: no limit."""
    canary: int
    """Nodes of the first stage (0: none)."""
    delivery_timeout: float
    """Seconds an unreachable node may take to get its target."""
    timeout: float
    """Execution timeout per target, seconds."""


def _text(value: str, field: str, limit: int = MAX_ARG) -> None:
    if "\x00" in value:
        raise InvalidArgument("must not contain NUL bytes", field=field)
    if len(value) > limit:
        raise InvalidArgument(f"must be at most {limit} characters, got {len(value)}", field=field)


def _argv(values: Sequence[str], field: str) -> None:
    if len(values) > MAX_ARGS:
        raise InvalidArgument(f"at most {MAX_ARGS} arguments, got {len(values)}", field=field)
    for i, arg in enumerate(values):
        _text(arg, f"{field}[{i}]")
    if values and not values[0]:
        raise InvalidArgument("the program (first element) must not be empty", field=f"{field}[0]")


def _seconds(value: float, field: str, low: float, high: float, *, zero_ok: bool = False) -> None:
    if zero_ok and value == 0:
        return
    if not low <= value <= high:  # NaN fails too
        allowed = f"0 or {low:g}..{high:g}" if zero_ok else f"{low:g}..{high:g}"
        raise InvalidArgument(f"must be {allowed} seconds, got {value}", field=field)


def _command(cmd: jobs_pb2.JobCommand, field: str, timeout: float) -> None:
    if cmd.argv and cmd.script:
        raise InvalidArgument(
            "give argv or script (with interpreter), not both", field=f"{field}.argv"
        )
    if cmd.script:
        _text(cmd.script, f"{field}.script", MAX_SCRIPT)
        if not cmd.interpreter:
            raise InvalidArgument(
                'a script needs an interpreter, e.g. ["/bin/sh", "-eu"]',
                field=f"{field}.interpreter",
            )
        _argv(cmd.interpreter, f"{field}.interpreter")
    else:
        if not cmd.argv:
            raise InvalidArgument(
                "must not be empty: the program and its arguments (or a script)",
                field=f"{field}.argv",
            )
        _argv(cmd.argv, f"{field}.argv")
        if cmd.interpreter:
            raise InvalidArgument(
                "only with a script (argv runs the program directly)",
                field=f"{field}.interpreter",
            )
    if len(cmd.env) > MAX_ENV:
        raise InvalidArgument(
            f"at most {MAX_ENV} variables, got {len(cmd.env)}", field=f"{field}.env"
        )
    for key, value in sorted(cmd.env.items()):
        if not _ENV_KEY.fullmatch(key) or len(key) > 256:
            raise InvalidArgument(
                f"invalid variable name {key[:80]!r}: letters, digits and _, not starting "
                "with a digit",
                field=f"{field}.env",
            )
        _text(value, f"{field}.env[{key}]")
    if cmd.cwd:
        _text(cmd.cwd, f"{field}.cwd", 4096)
        if not cmd.cwd.startswith("/"):
            raise InvalidArgument(
                f"must be an absolute path, got {cmd.cwd!r}", field=f"{field}.cwd"
            )
    if cmd.user and not _USER.fullmatch(cmd.user):
        raise InvalidArgument(
            f"invalid user name {cmd.user[:80]!r} (1..32 of [A-Za-z0-9_.-])", field=f"{field}.user"
        )
    _seconds(cmd.timeout_seconds, f"{field}.timeout_seconds", 1, timeout, zero_ok=True)


def check_spec(spec: jobs_pb2.JobSpec) -> CheckedSpec:
    """Validate `spec` (InvalidArgument naming the field); the plain values."""
    validate_label_value(spec.name, field="spec.name")
    timeout = spec.timeout_seconds if spec.HasField("timeout_seconds") else DEFAULT_TIMEOUT
    _seconds(timeout, "spec.timeout_seconds", 1, MAX_TIMEOUT)
    delivery = (
        spec.delivery_timeout_seconds
        if spec.HasField("delivery_timeout_seconds")
        else DEFAULT_DELIVERY_TIMEOUT
    )
    _seconds(delivery, "spec.delivery_timeout_seconds", 0, MAX_DELIVERY_TIMEOUT)
    if not spec.steps:
        raise InvalidArgument("must have at least one step (a command)", field="spec.steps")
    if len(spec.steps) > MAX_STEPS:
        raise InvalidArgument(
            f"at most {MAX_STEPS} steps, got {len(spec.steps)}", field="spec.steps"
        )
    for i, step in enumerate(spec.steps):
        where = f"spec.steps[{i}]"
        _text(step.name, f"{where}.name", 63)
        if any(ord(c) < 32 for c in step.name):
            raise InvalidArgument("must not contain control characters", field=f"{where}.name")
        if step.when not in _WHEN:
            raise InvalidArgument(
                f"unknown value {step.when}; use ON_SUCCESS, ON_FAILURE or ALWAYS",
                field=f"{where}.when",
            )
        if not step.HasField("command"):
            raise InvalidArgument("is required", field=f"{where}.command")
        _command(step.command, f"{where}.command", timeout)
    has_selector = spec.HasField("selector")
    if has_selector and spec.node_ids:
        raise InvalidArgument("give a selector or node_ids, not both", field="spec.node_ids")
    if not has_selector and not spec.node_ids:
        raise InvalidArgument(
            "pick the nodes: a selector or node_ids (an empty selector picks every node)",
            field="spec.selector",
        )
    selector = selectors.from_proto(spec.selector, field="spec.selector") if has_selector else None
    if len(spec.node_ids) > MAX_TARGETS:
        raise InvalidArgument(
            f"at most {MAX_TARGETS} nodes, got {len(spec.node_ids)}", field="spec.node_ids"
        )
    seen: set[str] = set()
    for i, node_id in enumerate(spec.node_ids):
        validate_node_id(node_id, field=f"spec.node_ids[{i}]")
        if node_id in seen:
            raise InvalidArgument(f"{node_id} is listed twice", field=f"spec.node_ids[{i}]")
        seen.add(node_id)
    try:
        resolve_concurrency(spec.max_concurrency, 1)
    except ValueError as exc:
        raise InvalidArgument(str(exc).split(": ", 1)[-1], field="spec.max_concurrency") from None
    if spec.max_errors < 0:
        raise InvalidArgument(
            f"must be >= 0 (0: no limit), got {spec.max_errors}", field="spec.max_errors"
        )
    if spec.canary < 0:
        raise InvalidArgument(
            f"must be >= 0 (0: no canary stage), got {spec.canary}", field="spec.canary"
        )
    if spec.lock and not _LOCK.fullmatch(spec.lock):
        raise InvalidArgument(
            f"invalid lock name {spec.lock[:80]!r}: 1..63 of [a-z0-9_.-], starting and "
            "ending alphanumeric",
            field="spec.lock",
        )
    return CheckedSpec(
        message=spec,
        selector=selector,
        node_ids=tuple(spec.node_ids),
        max_errors=spec.max_errors,
        canary=spec.canary,
        delivery_timeout=delivery,
        timeout=timeout,
    )


class _Labelled(Protocol):
    @property
    def node_id(self) -> str: ...
    @property
    def labels(self) -> Mapping[str, str]: ...


_N = TypeVar("_N", bound=_Labelled)


def resolve_targets(spec: CheckedSpec, nodes: Sequence[_N]) -> list[_N]:
    """The job's nodes in its order (node_ids as listed; a selector's by node id).

    InvalidArgument for a node id not registered, or a canary larger than the
    job; FailedPrecondition for a selector matching no node.
    """
    by_id = {n.node_id: n for n in nodes}
    if spec.selector is None:
        for i, node_id in enumerate(spec.node_ids):
            if node_id not in by_id:
                raise InvalidArgument(
                    f"node {node_id!r} is not registered",
                    field=f"spec.node_ids[{i}]",
                    resource=Resource("node", node_id),
                )
        picked = [by_id[n] for n in spec.node_ids]
    else:
        picked = sorted(
            (n for n in nodes if spec.selector.matches(n.labels)), key=lambda n: n.node_id
        )
        if not picked:
            # Client-neutral, as every manager message (docs/fleet-service.md, "Errors"):
            # fleetctl adds the command that shows what the selector matches.
            raise FailedPrecondition(f"spec.selector: {spec.selector} matches no registered node")
        if len(picked) > MAX_TARGETS:
            raise InvalidArgument(
                f"matches {len(picked)} nodes; a job runs on at most {MAX_TARGETS}",
                field="spec.selector",
            )
    if spec.canary > len(picked):
        raise InvalidArgument(
            f"{spec.canary} is more than the job's {len(picked)} node(s)", field="spec.canary"
        )
    return picked
