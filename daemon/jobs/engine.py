"""The node's job driver: accept, queue, run steps, stop, re-adopt, clean up.

Each step runs under a wrapper (daemon.jobs.runner_main) in its own session
and process group, spawned by the supervisor's `spawn_detached` (stdout and
stderr are the job's ``output`` file, opened O_APPEND and handed to the
child: the daemon never carries output). The daemon watches the wrapper with
a pidfd and reads the step's exit status from the file the wrapper wrote, so
it works the same for a step it spawned and one it re-adopted after its own
restart (then the wrapper is not its child and cannot be waited for).

Every change is written to ``state.json`` before it is acted on or told:
"launching step n" before the spawn, its pid right after, "stopping for
timeout/cancel" before the first signal. After a restart (even kill -9) a
RUNNING job's step is re-adopted when its pid and create time still match;
if it ended meanwhile its status file says how; a step that was being
launched and left neither a process nor a status is FAILED, never run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import math
import os
import pwd
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import psutil

from daemon.config import JobsConfig
from daemon.jobs import decide
from daemon.jobs.decide import Queued, StepOutcome
from daemon.jobs.store import JOB_ID_RE, Current, JobRecord, JobStore, StepRecord, Stop
from daemon.supervisor.clock import Clock, SystemClock
from daemon.supervisor.process import (
    AgentProcess,
    SpawnError,
    adopt,
    cannot_enter,
    daemon_env,
    find_leftovers,
    name_processes,
    spawn_detached,
)
from fleet.errors import InvalidArgument, NotFound, ResourceExhausted
from fleet.v1 import daemon_pb2, jobs_pb2

__all__ = [
    "ANSWER_OUTPUT_BYTES",
    "RUNNER",
    "Job",
    "JobEngine",
    "OutputChunk",
    "step_results",
    "validate_request",
]

log = logging.getLogger(__name__)

NOT_RUN = 127
"""Exit code of a step that never ran or whose status was lost (as a shell's
"cannot execute"): negative codes mean a signal, so -1 would read as SIGHUP."""
STATUS_ROOM = 4096
"""Bytes of a step's status file allocated before the step starts (its wrapper writes
one short JSON line there when the step ends, even on a disk the step filled)."""

RUNNER = Path(__file__).with_name("runner_main.py")
"""The step wrapper, run as a script by the daemon's own interpreter."""
MAX_TIMEOUT = 30 * 86400.0
"""Longest job or step timeout the node accepts (30 days)."""
DEFAULT_TIMEOUT = 3600.0
"""A job's timeout when the request says 0 (as JobSpec.timeout_seconds' default)."""
RETENTION_INTERVAL = 3600.0
"""Seconds between sweeps of finished job directories."""
ANSWER_OUTPUT_BYTES = 64 * 1024
"""Largest whole output a StartJob answer carries with the job's end; a longer one is
uploaded, and the end reported after it (a finished target has all its output stored)."""
ANSWERED = "answered_version"
"""`JobRecord.extra` key: the version whose end a StartJob answer carried (instead of a
report). `extra`, not a field: an older daemon reading this state.json still loads it."""

_WHEN: dict[int, decide.When] = {
    jobs_pb2.STEP_WHEN_UNSPECIFIED: "on_success",
    jobs_pb2.STEP_WHEN_ON_SUCCESS: "on_success",
    jobs_pb2.STEP_WHEN_ON_FAILURE: "on_failure",
    jobs_pb2.STEP_WHEN_ALWAYS: "always",
}


def validate_request(request: daemon_pb2.StartJobRequest) -> None:
    """InvalidArgument naming the field for anything the node cannot run."""
    if not request.job_id:
        raise InvalidArgument("is required", field="job_id")
    if not JOB_ID_RE.match(request.job_id):
        raise InvalidArgument(
            "must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
            field="job_id",
        )
    if not request.steps:
        raise InvalidArgument("at least one step is required", field="steps")
    if len(request.steps) > 100:
        raise InvalidArgument(f"at most 100 steps (got {len(request.steps)})", field="steps")
    _check_timeout(request.timeout_seconds, "timeout_seconds")
    if len(request.lock) > 128 or "\0" in request.lock:
        raise InvalidArgument("must be at most 128 characters, without NUL", field="lock")
    for i, step in enumerate(request.steps):
        where = f"steps[{i}]"
        if step.when not in _WHEN:
            raise InvalidArgument(f"unknown value {step.when}", field=f"{where}.when")
        cmd = step.command
        if cmd.argv and cmd.script:
            raise InvalidArgument("give argv or script, not both", field=f"{where}.command")
        if not cmd.argv and not cmd.script:
            raise InvalidArgument("argv or script is required", field=f"{where}.command.argv")
        if cmd.argv and not cmd.argv[0]:
            raise InvalidArgument("the program must not be empty", field=f"{where}.command.argv")
        if cmd.script and not cmd.interpreter:
            raise InvalidArgument(
                'a script needs an interpreter, e.g. ["/bin/sh", "-e"]',
                field=f"{where}.command.interpreter",
            )
        if cmd.script and not cmd.interpreter[0]:
            raise InvalidArgument(
                "the interpreter must not be empty", field=f"{where}.command.interpreter"
            )
        for name, values in (("argv", cmd.argv), ("interpreter", cmd.interpreter)):
            if any("\0" in v for v in values):
                raise InvalidArgument("must not contain NUL", field=f"{where}.command.{name}")
        for key, value in cmd.env.items():
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise InvalidArgument(
                    f"bad variable {key!r}: names are non-empty without '=' or NUL",
                    field=f"{where}.command.env",
                )
        for name, value in (("cwd", cmd.cwd), ("user", cmd.user), ("name", step.name)):
            if "\0" in value:
                raise InvalidArgument("must not contain NUL", field=f"{where}.command.{name}")
        _check_timeout(cmd.timeout_seconds, f"{where}.command.timeout_seconds")


def _check_timeout(value: float, name: str) -> None:
    if not (math.isfinite(value) and 0 <= value <= MAX_TIMEOUT):
        raise InvalidArgument(
            f"must be between 0 and {MAX_TIMEOUT:g} seconds (got {value})", field=name
        )


@dataclass
class Job:
    """A job the daemon holds in memory (not yet settled with the manager)."""

    request: daemon_pb2.StartJobRequest
    record: JobRecord
    seq: int
    """Arrival order among queued jobs."""
    task: asyncio.Task[None] | None = None
    process: AgentProcess | None = None
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set (and replaced) on every change, for followers of the output."""
    holds: int = 0
    """StartJob answers waiting for this job's end: the reporter leaves it alone meanwhile
    (the answer may carry the end; reporting it too would cost the call it saves)."""


@dataclass(frozen=True)
class OutputChunk:
    """A piece of a job's output file."""

    data: bytes
    offset: int
    next_offset: int
    eof: bool
    """The job ended and nothing follows `next_offset`."""


class JobEngine:
    """Runs the jobs the manager sends this node.

    `on_change(job_id)` is called after every persisted change (the
    reporter sends it to the manager). `config_path` names the config file in
    the reason a disabled node gives.
    """

    def __init__(
        self,
        cfg: JobsConfig,
        *,
        root: Path,
        config_path: str = "the daemon's config",
        clock: Clock | None = None,
        on_change: Callable[[str], None] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.cfg = cfg
        self.store = JobStore(root)
        self.config_path = config_path
        self.clock: Clock = clock or SystemClock()
        self._on_change = on_change or (lambda _job_id: None)
        self._python = python
        self._jobs: dict[str, Job] = {}
        self._seq = 0
        self._started = False
        self._retention: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # --- lifecycle ------------------------------------------------------

    async def start(self) -> None:
        """Load every job not yet settled; re-adopt running steps; start queued jobs."""
        for job_id in await asyncio.to_thread(self.store.job_ids, clean=True):
            try:
                loaded = self.store.load(job_id)
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("job %s: unreadable state, left alone: %r", job_id, exc)
                continue
            if loaded is None or loaded[1].settled:
                continue
            request, record = loaded
            job = self._add(request, record)
            if record.state == "RUNNING":
                job.task = asyncio.create_task(self._run(job), name=f"job-{job_id}")
        self._started = True
        self._schedule()
        self._retention = asyncio.create_task(self._retention_loop(), name="job-retention")

    async def stop(self) -> None:
        """Stop watching; running steps keep running (a restarted daemon re-adopts them)."""
        self._started = False
        tasks = [j.task for j in self._jobs.values() if j.task is not None]
        if self._retention is not None:
            tasks.append(self._retention)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for job in self._jobs.values():
            if job.process is not None:
                job.process.close()
                job.process = None

    # --- queries ----------------------------------------------------------

    def jobs(self) -> list[Job]:
        """Jobs held in memory (not settled with the manager), in arrival order."""
        return sorted(self._jobs.values(), key=lambda j: j.seq)

    def record(self, job_id: str) -> JobRecord:
        """The job's record, from memory or its directory; NotFound if the node has none."""
        job = self._jobs.get(job_id)
        if job is not None:
            return job.record
        if JOB_ID_RE.match(job_id):
            loaded = self.store.load(job_id)
            if loaded is not None:
                return loaded[1]
        raise NotFound(f"job {job_id!r} is not on this node (never sent, or cleaned up)")

    def output_size(self, job_id: str) -> int:
        try:
            return os.stat(self.store.output_path(job_id)).st_size
        except FileNotFoundError:
            return 0

    async def read_output(self, job_id: str, offset: int, max_bytes: int) -> OutputChunk:
        """Up to `max_bytes` of the output from `offset` (read in a thread)."""
        record = self.record(job_id)
        final = record.final
        path = self.store.output_path(job_id)

        def read() -> tuple[bytes, int]:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(min(offset, size))
                return f.read(max_bytes), size

        data, size = await asyncio.to_thread(read)
        start = min(offset, size)
        nxt = start + len(data)
        return OutputChunk(data, start, nxt, final and nxt >= size)

    async def wait_change(self, job_id: str, seconds: float) -> None:
        """Wait until the job changes state, or `seconds`."""
        job = self._jobs.get(job_id)
        if job is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await job.changed.wait()

    # --- commands ---------------------------------------------------------

    async def start_job(self, request: daemon_pb2.StartJobRequest) -> daemon_pb2.StartJobResponse:
        """StartJob: accept the job (idempotent per id) and answer where it is.

        When the manager accepts an end in the answer (`accept_end`), a new or running job
        is given up to `answer_wait_seconds` to end; an ended job whose whole output fits
        `ANSWER_OUTPUT_BYTES` is answered with its end and output, and counts as
        acknowledged (not reported). A retried StartJob gets the same end again, from
        the job's directory. Without `accept_end` (an older manager) an end that was only
        answered is reported after all."""
        accept = request.accept_end
        state, reason = await self.submit(request, hold=accept)
        job = self._jobs.get(request.job_id)
        if job is None or not accept:
            return await self._answer(request, state, reason, accept)
        try:
            await self._wait_final(job, self.cfg.answer_wait_seconds)
            return await self._answer(request, job.record.state, job.record.reason, accept)
        finally:
            # Released once the end is acknowledged, or not: then the reporter's turn.
            job.holds -= 1
            if not job.holds:
                self._on_change(request.job_id)

    async def _answer(
        self, request: daemon_pb2.StartJobRequest, state: str, reason: str, accept: bool
    ) -> daemon_pb2.StartJobResponse:
        answer = daemon_pb2.StartJobResponse(state=_state(state), reason=reason)
        if not accept or state not in decide.FINAL:
            return answer
        try:
            record = self.record(request.job_id)
        except NotFound:
            return answer  # refused (jobs disabled): nothing was kept
        output = await asyncio.to_thread(
            _read_whole, self.store.output_path(request.job_id), ANSWER_OUTPUT_BYTES
        )
        if output is None:
            return answer  # too long for an answer: uploaded, then reported
        answer.end.CopyFrom(
            daemon_pb2.JobEnd(
                state=_state(record.state),
                exit_code=record.exit_code,
                started_at=_ms(record.started_at),
                ended_at=_ms(record.ended_at),
                reason=record.reason,
                steps=step_results(record),
                output=output,
            )
        )
        if not record.settled:
            # Persisted before the answer leaves: never reported as well. A lost answer
            # is asked for again (the manager retries StartJob until it stores one).
            record.extra[ANSWERED] = record.version
            self.acknowledge(request.job_id, record.version)
        return answer

    async def _wait_final(self, job: Job, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not job.record.final:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await job.changed.wait()

    async def submit(
        self, request: daemon_pb2.StartJobRequest, *, hold: bool = False
    ) -> tuple[str, str]:
        """Accept a job (idempotent per id): (state, reason) to answer StartJob with.
        `hold`: the job in memory gets a hold (`Job.holds`) that the caller releases."""
        validate_request(request)
        job_id = request.job_id
        async with self._lock:
            known = self._known(job_id)
            if known is not None:
                if not hold and known.extra.get(ANSWERED):
                    self._report_answered(job_id, known)
                job = self._jobs.get(job_id)
                if hold and job is not None:
                    job.holds += 1
                return known.state, known.reason
            if not self.cfg.enabled:
                return "FAILED", (
                    f"jobs are disabled on this node ([jobs] enabled = false in {self.config_path})"
                )
            steps = [
                StepRecord(name=s.name or f"step-{i + 1}", when=_WHEN[s.when])
                for i, s in enumerate(request.steps)
            ]
            record = JobRecord(
                job_id=job_id,
                lock=request.lock,
                timeout=request.timeout_seconds or DEFAULT_TIMEOUT,
                created_at=self.clock.now(),
                steps=steps,
            )
            try:
                await asyncio.to_thread(self.store.create, request, record)
            except OSError as exc:
                # Not accepted: nothing half-made left behind, and the manager told why.
                await asyncio.to_thread(self.store.remove, job_id)
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise ResourceExhausted(
                    f"cannot store job {job_id} in {self.store.root}: {exc.strerror}; "
                    "free space on the node's state_dir"
                ) from exc
            job = self._add(request, record)
            if hold:
                job.holds += 1  # before the first change pokes the reporter
            self._schedule()
            self._on_change(job_id)
            return record.state, record.reason

    async def cancel(self, job_id: str, reason: str = "cancelled") -> str:
        """Cancel a queued job at once, or stop a running one; answers the state after."""
        job = self._jobs.get(job_id)
        if job is None:
            return self.record(job_id).state  # NotFound, or already ended
        record = job.record
        if record.final:
            return record.state
        if record.state == "QUEUED":
            for step in record.steps:
                step.state, step.reason = "SKIPPED", f"{reason} before it started"
            self._finish(job, decide.TargetResult("CANCELLED", 0, reason), stop="cancel")
            self._schedule()
            return record.state
        job.cancel.set()
        return record.state

    def acknowledge(self, job_id: str, version: int, *, truncated: bool = False) -> None:
        """The manager stored the job's state up to `version`; a settled job leaves memory."""
        job = self._jobs.get(job_id)
        if job is None:
            return
        record = job.record
        changed = False
        if version > record.acked_version:
            record.acked_version = version
            changed = True
        if truncated and not record.output_truncated:
            record.output_truncated = True
            changed = True
        if changed:
            self._save(record)
        if record.settled and job.task is None:
            del self._jobs[job_id]

    def _report_answered(self, job_id: str, record: JobRecord) -> None:
        """A manager that does not take ends in answers asks about a job whose end only an
        answer carried (replicas of mixed versions): report it after all."""
        record.extra.pop(ANSWERED, None)
        record.acked_version = 0
        self._save(record)
        if job_id not in self._jobs:
            loaded = self.store.load(job_id)
            if loaded is not None:
                self._add(loaded[0], record)
        self._on_change(job_id)

    # --- internals ------------------------------------------------------

    def _known(self, job_id: str) -> JobRecord | None:
        job = self._jobs.get(job_id)
        if job is not None:
            return job.record
        loaded = self.store.load(job_id) if self.store.exists(job_id) else None
        return None if loaded is None else loaded[1]

    def _add(self, request: daemon_pb2.StartJobRequest, record: JobRecord) -> Job:
        self._seq += 1
        job = Job(request, record, self._seq)
        self._jobs[record.job_id] = job
        return job

    def _save(self, record: JobRecord) -> None:
        """Save `record`; on a full disk (or another write error) log and go on: the
        previous state.json stays whole (atomic write), the change still goes to the
        manager, which stores it, and a later change saves it here once there is room."""
        try:
            self.store.save(record)
        except OSError as exc:
            log.error(  # noqa: TRY400 -- one clear line, no traceback
                "job %s: cannot save its state in %s (%s); reporting it to the manager anyway",
                record.job_id,
                self.store.dir(record.job_id),
                exc.strerror or exc,
            )

    def _changed(self, job: Job) -> None:
        """Persist, tell the reporter, wake followers."""
        job.record.version += 1
        self._save(job.record)
        job.changed.set()
        job.changed = asyncio.Event()
        self._on_change(job.record.job_id)

    def _schedule(self) -> None:
        if not self._started:
            return
        jobs = self.jobs()
        queued = [
            Queued(j.record.job_id, j.record.lock) for j in jobs if j.record.state == "QUEUED"
        ]
        running = [
            Queued(j.record.job_id, j.record.lock) for j in jobs if j.record.state == "RUNNING"
        ]
        for job_id in decide.admit(queued, running, self.cfg.max_concurrent):
            job = self._jobs[job_id]
            job.record.state = "RUNNING"
            job.record.started_at = self.clock.now()
            self._changed(job)
            job.task = asyncio.create_task(self._run(job), name=f"job-{job_id}")

    def _finish(self, job: Job, result: decide.TargetResult, *, stop: Stop = "") -> None:
        record = job.record
        record.state = result.state
        record.exit_code = result.exit_code
        record.reason = result.reason
        record.ended_at = self.clock.now()
        record.current = None
        if stop:
            record.stop = stop
        self._changed(job)

    async def _run(self, job: Job) -> None:
        record = job.record
        try:
            deadline = record.started_at + record.timeout
            for index, step in enumerate(record.steps):
                if step.state in decide.FINAL:
                    continue
                if record.current is not None and record.current.index == index:
                    outcome = await self._resume_step(job, index, deadline)
                elif record.stop or job.cancel.is_set() or self.clock.now() >= deadline:
                    if not record.stop:
                        record.stop = "cancel" if job.cancel.is_set() else "timeout"
                    why = "cancelled" if record.stop == "cancel" else "the job's timeout passed"
                    outcome = StepOutcome("SKIPPED", 0, f"skipped: {why}")
                else:
                    failed = any(s.state in ("FAILED", "TIMEOUT") for s in record.steps[:index])
                    if decide.step_runs(step.when, failed):
                        outcome = await self._run_step(job, index, deadline)
                    else:
                        outcome = StepOutcome("SKIPPED", 0, decide.skip_reason(step.when))
                self._record_step(job, index, outcome)
            outcomes = [
                StepOutcome(cast(decide.State, s.state), s.exit_code, s.reason)
                for s in record.steps
            ]
            self._finish(job, decide.target_result(outcomes, record.stop))
        except asyncio.CancelledError:
            raise  # the daemon stops: the step keeps running, re-adopted on restart
        except Exception as exc:
            log.exception("job %s failed in the daemon", record.job_id)
            self._finish(job, decide.TargetResult("FAILED", NOT_RUN, f"the daemon failed: {exc}"))
        finally:
            job.task = None if record.final else job.task
        self._schedule()
        if record.settled:
            self._jobs.pop(record.job_id, None)

    def _record_step(self, job: Job, index: int, outcome: StepOutcome) -> None:
        step = job.record.steps[index]
        step.state = outcome.state
        step.exit_code = outcome.exit_code
        step.reason = outcome.reason
        if outcome.state != "SKIPPED":
            step.ended_at = self.clock.now()
        job.record.current = None
        self._changed(job)

    def _script(self, job: Job, index: int, cmd: jobs_pb2.JobCommand, uid: int | None) -> int:
        """Write the step's script to the job dir; returns a read-only fd on it."""
        path = self.store.script_path(job.record.job_id, index)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o500)
        try:
            os.write(fd, cmd.script.encode())
            if uid is not None:
                os.fchown(fd, uid, -1)  # the step's user must be able to read it
        finally:
            os.close(fd)
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    async def _run_step(self, job: Job, index: int, deadline: float) -> StepOutcome:
        record = job.record
        cmd = job.request.steps[index].command
        uid: int | None = None
        home = ""
        ids = "-"
        if cmd.user:
            try:
                pw = pwd.getpwnam(cmd.user)
            except KeyError:
                return StepOutcome(
                    "FAILED", NOT_RUN, f"user {cmd.user!r} does not exist on this node"
                )
            if pw.pw_uid != os.geteuid():
                if os.geteuid() != 0:
                    return StepOutcome(
                        "FAILED",
                        NOT_RUN,
                        f"cannot run as user {cmd.user!r}: the daemon does not run as root",
                    )
                uid = pw.pw_uid
                home = pw.pw_dir if os.path.isdir(pw.pw_dir) else "/"  # noqa: ASYNC240  # one stat
                gids = os.getgrouplist(pw.pw_name, pw.pw_gid)
                groups = ",".join(str(g) for g in gids)
                ids = f"{pw.pw_uid}:{pw.pw_gid}:{groups}"
                denied = cannot_enter(cmd.cwd, cmd.user, uid, gids) if cmd.cwd else ""
                if denied:  # the wrapper enters it as root, the step could not
                    return StepOutcome("FAILED", NOT_RUN, denied)
        # Checked here, not left to the spawn: its error names the step wrapper's python.
        if cmd.cwd and not os.path.isdir(cmd.cwd):  # noqa: ASYNC240  # one stat
            return StepOutcome(
                "FAILED", NOT_RUN, f"working directory {cmd.cwd!r} does not exist on this node"
            )
        step = record.steps[index]
        step.state = "RUNNING"
        step.started_at = self.clock.now()
        record.current = Current(index)  # "launching": never run twice after a crash
        self._changed(job)
        job_id = record.job_id
        env = daemon_env()
        env.update(cmd.env)
        env.update(_step_marks(self.store.dir(job_id), job_id, index))
        if uid is not None:
            env.update(HOME=home, USER=cmd.user, LOGNAME=cmd.user)
        status = self.store.status_path(job_id, index)
        script_fd = -1
        fd = os.open(status, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            # Room for the wrapper's one status line, taken now: a disk that fills while
            # the step runs (its own output, often) must not cost the step its exit code.
            # Zeros after the line read as no more lines (JobStore.read_status).
            os.posix_fallocate(fd, 0, STATUS_ROOM)
            argv = list(cmd.argv)
            keep = "-"
            if cmd.script:
                script_fd = self._script(job, index, cmd, uid)
                if uid is None:
                    argv = [*cmd.interpreter, str(self.store.script_path(job_id, index))]
                else:
                    # Another user cannot reach the daemon's private job dir: hand
                    # the script over as an open file.
                    keep = str(script_fd)
                    argv = [*cmd.interpreter, f"/dev/fd/{script_fd}"]
            # The job dir is the daemon's (mode 0700): another user starts at home.
            cwd = cmd.cwd or (home if uid is not None else str(self.store.dir(job_id)))
            proc = spawn_detached(
                [
                    self._python,
                    "-I",
                    "-S",
                    str(RUNNER),
                    str(fd),
                    str(status),
                    keep,
                    ids,
                    "--",
                    *argv,
                ],
                env=env,
                cwd=cwd,
                user="",  # the wrapper stays the daemon's user; it starts the step as `ids`
                output_path=self.store.output_path(job_id),
                pass_fds=(fd,) if script_fd < 0 else (fd, script_fd),
            )
        except SpawnError as exc:
            return StepOutcome("FAILED", NOT_RUN, str(exc))
        except OSError as exc:
            return StepOutcome(
                "FAILED",
                NOT_RUN,
                f"cannot write the step's files in {self.store.dir(job_id)}: "
                f"{exc.strerror or exc}; not run",
            )
        finally:
            os.close(fd)
            if script_fd >= 0:
                os.close(script_fd)
        job.process = proc
        record.current = Current(index, proc.pid, proc.create_time)
        self._save(record)
        return await self._watch(job, index, deadline)

    async def _resume_step(self, job: Job, index: int, deadline: float) -> StepOutcome:
        """After a daemon restart: re-adopt the step's wrapper, or learn how it ended."""
        current = job.record.current
        assert current is not None
        proc = adopt(current.pid, current.create_time) if current.pid else None
        if proc is None and not current.pid:
            proc = _find_launched(str(self.store.status_path(job.record.job_id, index)))
        if proc is not None:
            log.info("job %s: re-adopted step %d (pid %d)", job.record.job_id, index + 1, proc.pid)
            job.process = proc
            return await self._watch(job, index, deadline)
        return self._ended(job, index, killed=False)

    async def _watch(self, job: Job, index: int, deadline: float) -> StepOutcome:
        record = job.record
        proc = job.process
        assert proc is not None
        assert record.current is not None
        cmd = job.request.steps[index].command
        step_deadline = (
            record.steps[index].started_at + cmd.timeout_seconds
            if cmd.timeout_seconds
            else math.inf
        )
        killed = False
        if not record.current.stopping:
            exited = asyncio.ensure_future(proc.wait())
            cancelled = asyncio.ensure_future(job.cancel.wait())
            timer = asyncio.ensure_future(
                self.clock.sleep(min(deadline, step_deadline) - self.clock.now())
            )
            try:
                await asyncio.wait({exited, cancelled, timer}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for fut in (exited, cancelled, timer):
                    fut.cancel()
            if proc.running:
                if job.cancel.is_set():
                    record.current.stopping = record.stop = "cancel"
                elif self.clock.now() >= deadline:
                    record.current.stopping = record.stop = "timeout"
                else:
                    record.current.stopping = "step_timeout"
                self._save(record)  # before the first signal
        if proc.running:
            outcome = await proc.stop(signal.SIGTERM, self.cfg.grace_seconds, self.clock)
            killed = outcome.killed
        else:
            await proc.wait()
        job.process = None
        # The wrapper ended its group. Leaving it (setsid, a double fork) is how a process
        # is meant to outlive a job, so such a one is not stopped, only named.
        marks = _step_marks(self.store.dir(record.job_id), record.job_id, index)
        left = await asyncio.to_thread(find_leftovers, proc.pid, marks)
        ended = self._ended(job, index, killed=killed)
        if not left:
            return ended
        note = (
            f"left {len(left)} process(es) running outside its process group (not stopped):"
            f" pid {name_processes(left)}"
        )
        log.warning("job %s step %d: %s", record.job_id, index + 1, note)
        reason = f"{ended.reason}; {note}" if ended.reason else note
        return dataclasses.replace(ended, reason=reason)

    def _ended(self, job: Job, index: int, *, killed: bool) -> StepOutcome:
        """The step's outcome from its status file and why it was stopped, if it was."""
        record = job.record
        current = record.current
        stopping = current.stopping if current is not None else ""
        status = self.store.read_status(record.job_id, index)
        error = ""
        if status is not None:
            code = int(status.get("exit_code", NOT_RUN))
            error = str(status.get("error", ""))
        elif killed:
            code = -int(signal.SIGKILL)
        elif stopping:
            code = -int(signal.SIGTERM)  # it hit the wrapper before its handler was in place
        else:
            code = NOT_RUN
        grace = self.cfg.grace_seconds
        how = f"; killed after {grace:g}s grace" if killed else ""
        if stopping == "cancel":
            return StepOutcome("CANCELLED", code, f"cancelled{how}")
        if stopping == "timeout":
            return StepOutcome("TIMEOUT", code, f"job timeout ({record.timeout:g}s) passed{how}")
        if stopping == "step_timeout":
            limit = job.request.steps[index].command.timeout_seconds
            return StepOutcome("TIMEOUT", code, f"step timeout ({limit:g}s) passed{how}")
        if code != 0 and _out_of_space(self.store.dir(record.job_id)):
            # The step's own complaint ("No space left on device") could not reach its
            # output, which is on the same disk: say it here.
            error = (error or f"exit code {code}") + (
                f"; the disk holding {self.store.root} is full, so the step's output may "
                "be cut short"
            )
        if error:
            return StepOutcome("FAILED", code, error)
        if status is None:
            return StepOutcome(
                "FAILED",
                code,
                "the step ended without recording its exit status (its wrapper was killed, or "
                "the daemon stopped while launching it); not run again",
            )
        if code == 0:
            return StepOutcome("SUCCESS", 0, "")
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return StepOutcome("FAILED", code, f"killed by {name}")
        return StepOutcome("FAILED", code, f"exit code {code}")

    async def _retention_loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("job retention sweep failed; trying again later")
            await self.clock.sleep(RETENTION_INTERVAL)

    async def sweep(self) -> list[str]:
        """Delete finished, settled job directories older than keep_days; returns their ids."""
        cutoff = self.clock.now() - self.cfg.keep_days * 86400
        removed: list[str] = []
        for job_id in await asyncio.to_thread(self.store.job_ids):
            if job_id in self._jobs:
                continue
            try:
                loaded = self.store.load(job_id)
            except (ValueError, TypeError, KeyError):
                continue
            if loaded is None:
                continue
            record = loaded[1]
            # Unsettled jobs stay: the manager has not heard how they ended.
            if record.settled and record.ended_at < cutoff:
                await asyncio.to_thread(self.store.remove, job_id)
                removed.append(job_id)
        if removed:
            log.info(
                "removed %d finished job directories older than %g days",
                len(removed),
                self.cfg.keep_days,
            )
        return removed


def _step_marks(job_dir: Path, job_id: str, index: int) -> dict[str, str]:
    """The variables a step runs with that tell its processes from any other's: the job
    dir names this daemon (two daemons on one host run the same job id)."""
    return {
        "FLEET_JOB_ID": job_id,
        "FLEET_JOB_STEP": str(index + 1),
        "FLEET_JOB_DIR": str(job_dir),
    }


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _state(name: str) -> jobs_pb2.JobTargetState.ValueType:
    return jobs_pb2.JobTargetState.Value(f"JOB_TARGET_STATE_{name}")


def step_results(record: JobRecord) -> list[jobs_pb2.JobStepResult]:
    """The record's steps as the manager is told them (reports and answers)."""
    return [
        jobs_pb2.JobStepResult(
            index=i,
            name=s.name,
            state=_state(s.state),
            exit_code=s.exit_code,
            started_at=_ms(s.started_at),
            ended_at=_ms(s.ended_at),
            reason=s.reason,
        )
        for i, s in enumerate(record.steps)
    ]


def _read_whole(path: Path, limit: int) -> bytes | None:
    """The whole file if it is at most `limit` bytes, else None."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        return b""
    return data if len(data) <= limit else None


def _find_launched(tag: str) -> AgentProcess | None:
    """A step wrapper started just before a crash, before its pid was saved.

    Found by its command line: the runner script and the step's status file
    (unique to this daemon's jobs dir, job and step)."""
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        with contextlib.suppress(psutil.Error):
            cmdline = proc.info["cmdline"] or []
            if len(cmdline) > 5 and cmdline[3] == str(RUNNER) and cmdline[5] == tag:
                return adopt(proc.pid, float(proc.info["create_time"]))
    return None


def _out_of_space(path: Path) -> bool:
    """Whether the filesystem holding `path` has no space left (for a failure's reason)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < STATUS_ROOM
