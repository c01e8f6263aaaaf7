"""The daemon's state dir: what it must remember across its own restarts.

- ``agents.json``: per agent the running process (pid + create time, which
  together survive pid reuse), the process hash and the spec it was started
  with, whether an operator stopped it, and its config version.
- ``update.json``: the last pushed spec set and its version.

Every write is atomic and durable: write a temp file in the same directory,
fsync it, rename it over the old one, fsync the directory. A crash at any
point leaves either the old or the new file, never a torn one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from daemon.supervisor.policy import ExitKind, LastExit
from daemon.supervisor.spec import AgentSpec, spec_from_dict, spec_to_dict
from fleet.errors import ConfigError

__all__ = ["PersistedAgent", "StateStore", "atomic_write"]

FORMAT = 1
_EXIT_KINDS = frozenset(get_args(ExitKind))


@dataclass(frozen=True)
class PersistedAgent:
    """One agent as remembered in agents.json."""

    spec: AgentSpec
    """The spec its current process was started with (or the current spec if none)."""
    pid: int = 0
    """The agent's pid, 0 when no process is running."""
    create_time: float = 0.0
    """psutil create time of `pid`."""
    process_hash: str = ""
    """`spec.process_hash()` at start: a different current hash means restart."""
    operator_stopped: bool = False
    """An operator stopped it: do not autostart it after a daemon restart."""
    config_version: int = 0
    """Version of the config payload SDK agents see."""
    restart_count: int = 0
    """Restarts so far (kept so the counter survives the daemon)."""
    start_time: float = 0.0
    """When the current process started (epoch seconds)."""
    last_exit: LastExit | None = None
    """How the last process ended (so "why did it restart?" survives the daemon)."""
    registered_version: str = ""
    """The version the running process gave when it registered (SDK): still true of it
    after a daemon restart, which re-adopts the same process."""


def _unreadable(path: Path, why: str) -> ConfigError:
    # Guessing here could start second copies of running agents: refuse instead.
    return ConfigError(
        f"{path}: unreadable daemon state ({why}); move it away to start without it "
        "(running agents will then not be re-adopted)"
    )


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably (tmp + fsync + rename + fsync dir)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        # A full disk: the old file stays, and the half-written copy gives its space back.
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateStore:
    """Reads and writes the state dir's files."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.agents_path = state_dir / "agents.json"
        self.update_path = state_dir / "update.json"

    def load_agents(self) -> dict[str, PersistedAgent]:
        """agents.json, or {} when there is none yet."""
        raw = self._load(self.agents_path)
        if raw is None:
            return {}
        agents: dict[str, PersistedAgent] = {}
        try:
            for agent_id, entry in raw.get("agents", {}).items():
                agents[agent_id] = _agent_from(entry)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _unreadable(self.agents_path, f"bad entry: {exc!r}") from None
        return agents

    def save_agents(self, agents: Mapping[str, PersistedAgent]) -> None:
        """Write agents.json atomically."""
        body = {
            agent_id: {
                "spec": spec_to_dict(a.spec),
                "pid": a.pid,
                "create_time": a.create_time,
                "process_hash": a.process_hash,
                "operator_stopped": a.operator_stopped,
                "config_version": a.config_version,
                "restart_count": a.restart_count,
                "start_time": a.start_time,
                "last_exit": None if a.last_exit is None else dataclasses.asdict(a.last_exit),
                "registered_version": a.registered_version,
            }
            for agent_id, a in sorted(agents.items())
        }
        self._save(self.agents_path, {"format": FORMAT, "agents": body})

    def load_update(self) -> tuple[int, tuple[AgentSpec, ...]] | None:
        """(version, specs) of the last pushed update, or None if none was pushed."""
        raw = self._load(self.update_path)
        if raw is None:
            return None
        try:
            specs = tuple(spec_from_dict(s) for s in raw.get("specs", []))
            return int(raw["version"]), specs
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _unreadable(self.update_path, f"bad entry: {exc!r}") from None

    def save_update(self, version: int, specs: Sequence[AgentSpec]) -> None:
        """Write update.json atomically."""
        body = {"format": FORMAT, "version": version, "specs": [spec_to_dict(s) for s in specs]}
        self._save(self.update_path, body)

    @staticmethod
    def _load(path: Path) -> dict[str, Any] | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            value = json.loads(data)
        except ValueError as exc:
            raise _unreadable(path, str(exc)) from None
        if not isinstance(value, dict):
            raise _unreadable(path, "not a JSON object")
        return value

    @staticmethod
    def _save(path: Path, body: dict[str, Any]) -> None:
        # Made on the first write, not before: a daemon that fails to start
        # leaves no trace on disk.
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, json.dumps(body, indent=1, sort_keys=True).encode() + b"\n")


def _agent_from(entry: dict[str, Any]) -> PersistedAgent:
    return PersistedAgent(
        spec=spec_from_dict(entry["spec"]),
        pid=int(entry.get("pid", 0)),
        create_time=float(entry.get("create_time", 0.0)),
        process_hash=str(entry.get("process_hash", "")),
        operator_stopped=bool(entry.get("operator_stopped", False)),
        config_version=int(entry.get("config_version", 0)),
        restart_count=int(entry.get("restart_count", 0)),
        start_time=float(entry.get("start_time", 0.0)),
        last_exit=_last_exit_from(entry.get("last_exit")),
        registered_version=str(entry.get("registered_version", "")),
    )


def _last_exit_from(raw: Any) -> LastExit | None:
    """The stored last exit; None if there is none or it cannot be read.

    Unlike a bad pid entry, an unreadable record is dropped, not fatal: it is
    for people, and must not stop the daemon from re-adopting its agents. A
    newer daemon's kind (after a downgrade) is unreadable too.
    """
    if not isinstance(raw, dict) or raw.get("kind") not in _EXIT_KINDS:
        return None  # None: never exited, or written by an older daemon
    try:
        code, reason, at = int(raw["code"]), str(raw["reason"]), float(raw["at"])
    except (KeyError, TypeError, ValueError):
        return None
    return LastExit(kind=raw["kind"], code=code, reason=reason, at=at)
