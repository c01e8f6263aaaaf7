"""A job's directory on the node: ``<jobs dir>/<job id>/``.

- ``request.pb``: the StartJobRequest as accepted (written once).
- ``state.json``: where the job is (`JobRecord`); rewritten atomically and
  durably (daemon.supervisor.persistence.atomic_write) on every change, so a
  daemon killed at any point finds the old or the new state, never a torn one.
- ``output``: stdout+stderr of every step, appended by the steps themselves.
- ``step-<n>.status``: the exit status the step's wrapper wrote (runner_main).
- ``step-<n>.script``: a step's script body, when it has one.

A directory is accepted once ``state.json`` exists (written last); one
without it is a StartJob that never answered, and is removed at load.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from daemon.jobs.decide import FINAL
from daemon.supervisor.persistence import atomic_write
from fleet.v1 import daemon_pb2

__all__ = ["JOB_ID_RE", "Current", "JobRecord", "JobStore", "StepRecord"]

FORMAT = 1
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""Job ids the node accepts: they name a directory, so no "/" and no leading dot."""

Stop = Literal["", "timeout", "cancel"]


@dataclass
class StepRecord:
    """One step's progress (a JobStepResult in the making)."""

    name: str
    when: Literal["on_success", "on_failure", "always"]
    state: str = "PENDING"
    """PENDING (not reached), RUNNING, or a final state."""
    exit_code: int = 0
    started_at: float = 0.0
    ended_at: float = 0.0
    reason: str = ""


@dataclass
class Current:
    """The step whose process runs (or is being launched)."""

    index: int
    pid: int = 0
    """The wrapper's pid (its session and process group); 0 while launching."""
    create_time: float = 0.0
    """psutil create time of `pid` (tells a recycled pid apart)."""
    stopping: Literal["", "step_timeout", "timeout", "cancel"] = ""
    """A stop was ordered (persisted before the first signal, so a restarted
    daemon finishes it and records the right state)."""


@dataclass
class JobRecord:
    """A job's state on this node: ``state.json``."""

    job_id: str
    lock: str
    timeout: float
    created_at: float
    steps: list[StepRecord]
    state: str = "QUEUED"
    started_at: float = 0.0
    ended_at: float = 0.0
    exit_code: int = 0
    reason: str = ""
    current: Current | None = None
    stop: Stop = ""
    """The whole job was stopped by its timeout or a cancel."""
    version: int = 1
    """Bumped on every change the manager must hear about."""
    acked_version: int = 0
    """The last version the manager acknowledged (ReportJobStatus answered)."""
    output_truncated: bool = False
    """The manager said it keeps no more of this output."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        """The job ended (its state never changes again)."""
        return self.state in FINAL

    @property
    def settled(self) -> bool:
        """Ended and the manager acknowledged its final state."""
        return self.final and self.acked_version >= self.version


def _record_from(raw: dict[str, Any]) -> JobRecord:
    steps = [StepRecord(**s) for s in raw.pop("steps")]
    current = raw.pop("current", None)
    raw.pop("format", None)
    return JobRecord(steps=steps, current=None if current is None else Current(**current), **raw)


class JobStore:
    """The jobs directory: create, save, load, list and remove job directories."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def dir(self, job_id: str) -> Path:
        return self.root / job_id

    def output_path(self, job_id: str) -> Path:
        return self.root / job_id / "output"

    def status_path(self, job_id: str, index: int) -> Path:
        return self.root / job_id / f"step-{index}.status"

    def script_path(self, job_id: str, index: int) -> Path:
        return self.root / job_id / f"step-{index}.script"

    def exists(self, job_id: str) -> bool:
        return (self.root / job_id / "state.json").exists()

    def create(self, request: daemon_pb2.StartJobRequest, record: JobRecord) -> None:
        """Make the job's directory durable: request, empty output, then state.json."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.dir(record.job_id)
        path.mkdir(mode=0o700, exist_ok=True)
        atomic_write(path / "request.pb", request.SerializeToString())
        fd = os.open(path / "output", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
        os.close(fd)
        self.save(record)

    def save(self, record: JobRecord) -> None:
        body = {"format": FORMAT, **asdict(record)}
        atomic_write(
            self.dir(record.job_id) / "state.json",
            json.dumps(body, indent=1, sort_keys=True).encode() + b"\n",
        )

    def load(self, job_id: str) -> tuple[daemon_pb2.StartJobRequest, JobRecord] | None:
        """The job's request and record; None when it has no (readable) state."""
        path = self.dir(job_id)
        try:
            raw = json.loads((path / "state.json").read_bytes())
            request = daemon_pb2.StartJobRequest.FromString((path / "request.pb").read_bytes())
            return request, _record_from(raw)
        except FileNotFoundError:
            return None

    def job_ids(self, *, clean: bool = False) -> list[str]:
        """Every accepted job here; `clean` (at start only: a StartJob may be writing one
        now) removes directories of StartJobs that never answered."""
        try:
            entries = sorted(self.root.iterdir())
        except FileNotFoundError:
            return []
        out: list[str] = []
        for entry in entries:
            if not entry.is_dir() or not JOB_ID_RE.match(entry.name):
                continue
            if (entry / "state.json").exists():
                out.append(entry.name)
            elif clean:
                shutil.rmtree(entry, ignore_errors=True)
        return out

    def remove(self, job_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.dir(job_id))

    def read_status(self, job_id: str, index: int) -> dict[str, Any] | None:
        """What the step's wrapper recorded, or None if it recorded nothing."""
        try:
            # The file was allocated ahead (zeros): what the wrapper wrote is before them.
            data = self.status_path(job_id, index).read_bytes().rstrip(b"\0").strip()
        except FileNotFoundError:
            return None
        if not data:
            return None
        try:
            value = json.loads(data.splitlines()[0])
        except ValueError:
            return None
        return value if isinstance(value, dict) else None
