"""How jobs read on a terminal: prefixed output lines, progress, summary, exit codes.

Pure: plain dicts (`views.job_view`) and bytes in, strings and numbers out.
The follow loop (`jobfollow.py`) and the commands (`jobs.py`) print them.

Exit codes of `run`, `jobs rerun` and `jobs show` (the job's outcome, so
scripts can gate on it): 0 every target succeeded (or, for `jobs show`, the
job has not ended yet); EXIT_JOB_FAILED (3) no target succeeded;
EXIT_JOB_PARTIAL (4) some did, some did not; EXIT_JOB_CANCELLED (5) an
operator cancelled it. 1, 2 and 130 keep fleetctl's meaning.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from typing import Any

from fleetctl.runtime import EXIT_OK
from fleetctl.timespec import format_age, format_duration, format_time

__all__ = [
    "EXIT_JOB_CANCELLED",
    "EXIT_JOB_FAILED",
    "EXIT_JOB_PARTIAL",
    "TARGET_ORDER",
    "TERMINAL_JOB",
    "TERMINAL_TARGET",
    "LineSplitter",
    "command_text",
    "counts_text",
    "exit_code",
    "header_lines",
    "offline_note",
    "progress_line",
    "spec_lines",
    "summary_line",
    "target_counts",
    "truncation_marker",
]

EXIT_JOB_FAILED = 3
EXIT_JOB_PARTIAL = 4
EXIT_JOB_CANCELLED = 5

TERMINAL_JOB = frozenset({"SUCCESS", "FAILED", "PARTIAL", "CANCELLED"})
TERMINAL_TARGET = frozenset(
    {"SUCCESS", "FAILED", "TIMEOUT", "CANCELLED", "SKIPPED", "UNDELIVERABLE"}
)
TARGET_ORDER = (
    "SUCCESS",
    "FAILED",
    "TIMEOUT",
    "CANCELLED",
    "SKIPPED",
    "UNDELIVERABLE",
    "RUNNING",
    "QUEUED",
    "PENDING",
)
"""The order states are counted in: outcomes first, then what is still moving."""

STATE_STYLE = {
    "SUCCESS": "green",
    "FAILED": "red bold",
    "TIMEOUT": "red",
    "PARTIAL": "yellow",
    "CANCELLED": "dim",
    "SKIPPED": "yellow",
    "UNDELIVERABLE": "yellow",
    "RUNNING": "cyan",
    "QUEUED": "cyan",
}


def exit_code(view: Mapping[str, Any]) -> int:
    """The job's outcome as an exit code: 0 only if every target succeeded.

    A job that has not ended is 0 (`jobs show` of a running job); `run`
    only asks once it ended.
    """
    state = view["state"]
    if state == "CANCELLED":
        return EXIT_JOB_CANCELLED
    if state not in TERMINAL_JOB:
        return EXIT_OK
    targets = [t["state"] for t in view["targets"]]
    if not targets:
        return EXIT_OK if state == "SUCCESS" else EXIT_JOB_FAILED
    if all(s == "SUCCESS" for s in targets):
        return EXIT_OK
    return EXIT_JOB_PARTIAL if "SUCCESS" in targets else EXIT_JOB_FAILED


def counts_text(counts: Mapping[str, int]) -> str:
    """ "3 success, 1 failed, 2 running" in TARGET_ORDER; "no targets" when empty."""
    parts = [f"{counts[s]} {s.lower()}" for s in TARGET_ORDER if counts.get(s)]
    parts += [f"{n} {s.lower()}" for s, n in sorted(counts.items()) if s not in TARGET_ORDER and n]
    return ", ".join(parts) or "no targets"


def target_counts(targets: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Targets counted by state (when a reply carries targets but no counts)."""
    out: dict[str, int] = {}
    for t in targets:
        out[t["state"]] = out.get(t["state"], 0) + 1
    return out


def progress_line(view: Mapping[str, Any], elapsed_seconds: float) -> str:
    """The line on stderr while following: "job 01J..: RUNNING 3/10 done (...) 12s"."""
    counts = view["counts"] or target_counts(view["targets"])
    total = sum(counts.values())
    done = sum(n for s, n in counts.items() if s in TERMINAL_TARGET)
    return (
        f"job {view['id']} {view['state']}: {done}/{total} done ({counts_text(counts)})"
        f" {format_duration(elapsed_seconds)}"
    )


def summary_line(view: Mapping[str, Any]) -> str:
    """The last line of a run: the outcome, the counts, how long, and why it ended early."""
    counts = view["counts"] or target_counts(view["targets"])
    took = view["duration_seconds"]
    line = f"job {view['id']} {view['state']}: {counts_text(counts)}"
    if took is not None:
        line += f" in {format_duration(took) if took >= 1 else f'{took:.2f}s'}"
    if view["reason"]:
        line += f" ({view['reason']})"
    return line


def command_text(step: Mapping[str, Any]) -> str:
    """A step's command for people: the argv, or the script's first line and interpreter."""
    if step["argv"]:
        return shlex.join(step["argv"])
    lines = str(step["script"]).strip().splitlines()
    first = lines[0] if lines else ""
    more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
    return f"{shlex.join(step['interpreter'])} <<< {first!r}{more}"


def truncation_marker(job_id: str, node_id: str, stored_bytes: int) -> str:
    """What stands where the manager stopped storing a target's output."""
    return (
        f"[fleetctl: the manager stored only the first {stored_bytes} bytes of this output;"
        f" the rest is on the node: fleetctl jobs logs {job_id} {node_id} --from-node]"
    )


def _when(ms: int, iso: str | None, now_ms: int) -> str:
    return f"{iso} ({format_age(ms, now_ms=now_ms)})" if ms else "-"


def spec_lines(view: Mapping[str, Any]) -> list[str]:
    """Where a job runs, under which window, and what: the lines of a plan."""
    spec = view["spec"]
    where = (
        f"selector {spec['selector']!r}"
        if spec["selector"] is not None
        else f"nodes {', '.join(spec['node_ids'])}"
    )
    window = [f"max_concurrency {spec['max_concurrency'] or 'all'}"]
    if spec["max_errors"]:
        window.append(f"max_errors {spec['max_errors']}")
    if spec["canary"]:
        window.append(f"canary {spec['canary']}")
    for key, label in (("timeout_seconds", "timeout"), ("delivery_timeout_seconds", "delivery")):
        if spec[key] is not None:
            window.append(f"{label} {format_duration(spec[key])}")
    if spec["lock"]:
        window.append(f"lock {spec['lock']}")
    lines = [
        f"Targets:  {where}: {counts_text(view['counts'] or target_counts(view['targets']))}",
        f"Policy:   {', '.join(window)}",
    ]
    steps = spec["steps"]
    if len(steps) == 1:
        lines.append(f"Command:  {command_text(steps[0])}{_step_extras(steps[0])}")
    else:
        lines.append("Steps:")
        for step in steps:
            when = "" if step["when"] == "on_success" else f" [{step['when']}]"
            lines.append(
                f"  {step['index'] + 1}. {step['name']}{when}: {command_text(step)}"
                f"{_step_extras(step)}"
            )
    return lines


def _step_extras(step: Mapping[str, Any]) -> str:
    extras = [f"{label} {step[key]}" for key, label in (("user", "as"), ("cwd", "in")) if step[key]]
    if step["env_keys"]:
        extras.append(f"env {','.join(step['env_keys'])}")
    if step["timeout_seconds"]:
        extras.append(f"timeout {format_duration(step['timeout_seconds'])}")
    return f" ({'; '.join(extras)})" if extras else ""


def header_lines(view: Mapping[str, Any], *, now_ms: int) -> list[str]:
    """`jobs show`'s header: what the job is, who ran it, where it is."""
    took = view["duration_seconds"]
    lines = [
        f"Job:      {view['id']}" + (f" ({view['name']})" if view["name"] else ""),
        f"State:    {view['state']}" + (f" ({view['reason']})" if view["reason"] else ""),
        f"Created:  {_when(view['created_at_ms'], view['created_at'], now_ms)}"
        f" by {view['actor'] or '-'}",
    ]
    if view["ended_at_ms"]:
        lines.append(
            f"Ended:    {view['ended_at']}"
            + (f" (took {format_duration(took)})" if took is not None else "")
        )
    if view["rerun_of"]:
        lines.append(f"Rerun of: {view['rerun_of']}")
    return lines + spec_lines(view)


class LineSplitter:
    """Cuts each node's byte stream into whole lines (a partial line waits for its end).

    UTF-8 is decoded per line, so a character split across two chunks comes
    out whole; bytes that are not UTF-8 become U+FFFD.
    """

    def __init__(self) -> None:
        self._partial: dict[str, bytes] = {}

    def feed(self, node_id: str, data: bytes) -> list[str]:
        """The complete lines `data` finishes for `node_id`, without their newlines."""
        buffered = self._partial.get(node_id, b"") + data
        *lines, rest = buffered.split(b"\n")
        self._partial[node_id] = rest
        return [_text(line) for line in lines]

    def flush(self, node_id: str) -> str | None:
        """What is left of `node_id`'s last line (it ended without a newline), or None."""
        rest = self._partial.pop(node_id, b"")
        return _text(rest) if rest else None

    def pending(self) -> list[str]:
        """Nodes with a partial line waiting."""
        return [n for n, rest in self._partial.items() if rest]


def _text(line: bytes) -> str:
    return line.removesuffix(b"\r").decode("utf-8", errors="replace")


DEFAULT_DELIVERY_TIMEOUT = 300.0
"""The manager's delivery timeout for a job that sets none (`manager.service.jobs`)."""


def offline_note(
    pending: Iterable[str],
    offline: Mapping[str, int],
    *,
    created_ms: int,
    delivery_timeout: float | None,
    lost: Mapping[str, int] | None = None,
) -> str:
    """Why a job's targets sit PENDING: their nodes are offline, or still online but
    without their control stream ("" if neither).

    `pending`: the job's PENDING targets; `offline`: node -> last seen (ms) of each
    offline node; `lost`: node -> when its control stream was lost (ms), for nodes
    the manager still holds online in the stream's grace; `delivery_timeout`: the
    job's, None for the manager's default."""
    lost = lost or {}
    waiting = sorted(n for n in pending if n in offline)
    unreached = sorted(n for n in pending if n in lost and n not in offline)
    if not waiting and not unreached:
        return ""
    timeout = DEFAULT_DELIVERY_TIMEOUT if delivery_timeout is None else delivery_timeout
    parts = []
    if waiting:
        shown = _first_five(
            [f"{n} (offline since {format_time(offline[n])})" if offline[n] else n for n in waiting]
        )
        parts.append(f"{len(waiting)} target(s) wait for their node to come back online: {shown}")
    if unreached:
        shown = _first_five([f"{n} (lost at {format_time(lost[n])})" for n in unreached])
        parts.append(
            f"{len(unreached)} target(s) wait for their node's control stream to come back"
            f" (the node still counts as online): {shown}"
        )
    until = format_time(created_ms + round(timeout * 1000))
    return (
        "; ".join(parts)
        + f"; any not delivered by {until} (the delivery timeout, {format_duration(timeout)})"
        " ends UNDELIVERABLE (not counted against max_errors)"
    )


def unreached_note(
    started: Iterable[str], offline: Mapping[str, int], lost: Mapping[str, int]
) -> str:
    """Why started (QUEUED/RUNNING) targets print nothing: the manager cannot reach their
    node, offline or without its control stream ("" if none). What runs there goes on.

    `offline`: node -> last seen (ms) of each offline node; `lost`: node -> when its
    control stream was lost (ms), for nodes still online in the stream's grace."""
    gone = sorted(n for n in started if n in offline)
    cut = sorted(n for n in started if n in lost and n not in offline)
    if not gone and not cut:
        return ""
    shown = _first_five(
        [f"{n} (offline since {format_time(offline[n])})" if offline[n] else n for n in gone]
        + [f"{n} (control stream lost at {format_time(lost[n])})" for n in cut]
    )
    return (
        f"the manager cannot reach the node of {len(gone) + len(cut)} started target(s): "
        f"{shown}; what runs there goes on, and its output follows once the node is back"
    )


def _first_five(items: list[str]) -> str:
    more = f" and {len(items) - 5} more" if len(items) > 5 else ""
    return ", ".join(items[:5]) + more
