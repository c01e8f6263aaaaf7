"""Tells the manager about this node's jobs: ReportJobStatus and UploadJobOutput.

Runs inside the manager link's connection (`ManagerLink` starts `run` next
to the heartbeat; a transport error ends both and the link redials). The
calls go through the generated stub, or the same methods of the control
stream (daemon.control), which answer and fail like the unary calls: the
order below holds on either transport. One
task serves every job in turn, one call in flight, so memory stays one
chunk (`chunk_bytes`) however much output there is; file reads happen in a
thread.

Order per job, each round:

1. A changed non-final state is reported at once (QUEUED -> RUNNING, a step
   ended), and a running job's output_bytes at most every
   `progress_interval` seconds; the answer may say cancel, which cancels it.
2. Output is uploaded from the manager's acknowledged offset, learnt with
   an empty chunk after every (re)connect and every refused chunk, so a
   retried chunk is never stored twice and nothing is skipped. The manager
   may say `truncated` (its bound): then nothing more is sent.
3. The final state is reported only once all output is acknowledged (or cut
   by the manager): a job the manager sees finished has its output complete
   there. Its acknowledgement is persisted (state.json acked_version), so a
   daemon restarted before it resends the final state, never loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc

from daemon.jobs import decide
from daemon.jobs.engine import Job, JobEngine, step_results
from fleet.errors import FleetError
from fleet.v1 import jobs_pb2, manager_pb2

__all__ = ["CHUNK_BYTES", "JobReporter", "status_request"]

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
"""Bytes per UploadJobOutput call (well under the 4 MiB message limit)."""
_RETRY_CODES = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
_CHUNKS_PER_TURN = 16
"""Chunks one job sends before the next job gets a turn (fairness)."""

Call = Callable[[Any, Any], Awaitable[Any]]


class JobCalls(Protocol):
    """Where reports go: the generated ManagerService stub or the control stream."""

    @property
    def ReportJobStatus(self) -> Any:  # the RPC's name
        """As the stub's."""

    @property
    def UploadJobOutput(self) -> Any:
        """As the stub's."""


def status_request(node_id: str, job: Job, output_bytes: int) -> manager_pb2.ReportJobStatusRequest:
    """The job's record as a ReportJobStatusRequest."""
    r = job.record
    return manager_pb2.ReportJobStatusRequest(
        node_id=node_id,
        job_id=r.job_id,
        state=jobs_pb2.JobTargetState.Value(f"JOB_TARGET_STATE_{r.state}"),
        exit_code=r.exit_code,
        started_at=int(r.started_at * 1000),
        ended_at=int(r.ended_at * 1000),
        reason=r.reason,
        steps=step_results(r),
        output_bytes=output_bytes,
    )


class JobReporter:
    """Reports job states and uploads job output while the manager link is connected."""

    def __init__(
        self,
        engine: JobEngine,
        node_id: str,
        *,
        chunk_bytes: int = CHUNK_BYTES,
        tail_interval: float = 0.5,
        progress_interval: float = 5.0,
        retry_delay: float = 2.0,
    ) -> None:
        self.engine = engine
        self.node_id = node_id
        self.chunk_bytes = chunk_bytes
        self.tail_interval = tail_interval
        self.progress_interval = progress_interval
        self.retry_delay = retry_delay
        self._poke = asyncio.Event()
        self._acked: dict[str, int | None] = {}
        self._progress: dict[str, tuple[float, int]] = {}
        self.uploaded_bytes = 0
        """Bytes the manager acknowledged through this reporter (for tests and metrics)."""
        self.reports = 0
        """ReportJobStatus calls the manager answered (for tests and metrics)."""

    def poke(self, _job_id: str = "") -> None:
        """A job changed: look at the jobs again now."""
        self._poke.set()

    async def run(self, stub: JobCalls, call: Call) -> None:
        """Serve until cancelled; transport errors propagate (the link redials).

        `call(method, request)` is the link's call wrapper: transport failures
        raise (ending the connection), other refusals raise FleetError.
        """
        self._acked = {}  # a new connection: ask the manager where each upload stands
        self._progress = {}
        while True:
            self._poke.clear()
            busy = False
            pause = 0.0
            for job in self.engine.jobs():
                if job.holds:
                    continue  # a StartJob answer may carry its end (JobEngine.start_job)
                try:
                    busy = await self._serve(job, stub, call) or busy
                except FleetError as exc:
                    pause = max(pause, self._refused(job, exc))
            if pause:
                await asyncio.sleep(pause)
                continue
            if busy:
                continue
            running = any(not j.record.final for j in self.engine.jobs())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.tail_interval if running else 60.0):
                    await self._poke.wait()

    def _refused(self, job: Job, exc: FleetError) -> float:
        """Handle a refusal for `job`; returns seconds to pause before the next round."""
        job_id = job.record.job_id
        self._acked[job_id] = None  # ask again before the next chunk
        if exc.code in _RETRY_CODES:
            log.info("manager busy with job %s (%s); retrying", job_id, exc.code.name)
            return self.retry_delay
        if exc.code == grpc.StatusCode.FAILED_PRECONDITION:
            log.info("manager refused a chunk of job %s (%s); resuming at its offset", job_id, exc)
            return 0.0
        if exc.code == grpc.StatusCode.UNIMPLEMENTED:
            # An older manager: keep everything, try again now and then (and on reconnect).
            log.warning("manager does not take job reports (%s); retrying in 60s", exc)
            return 60.0
        # NOT_FOUND / INVALID_ARGUMENT: the manager will never take this job's
        # reports (it forgot the job); stop sending them, the output stays here.
        log.warning("manager refused reports for job %s, giving up on them: %s", job_id, exc)
        record = job.record
        self.engine.acknowledge(job_id, record.version, truncated=True)
        return 0.0

    async def _serve(self, job: Job, stub: JobCalls, call: Call) -> bool:
        """One turn for `job`; True if it did something (more may be waiting)."""
        record = job.record
        job_id = record.job_id
        did = False
        if not record.final and record.version > record.acked_version:
            await self._report(job, stub, call)
            did = True
        elif not record.final:
            size = self.engine.output_size(job_id)
            last_at, last_size = self._progress.get(job_id, (0.0, -1))
            if size != last_size and time.monotonic() - last_at >= self.progress_interval:
                await self._report(job, stub, call)
        for _ in range(_CHUNKS_PER_TURN):
            record = job.record
            size = self.engine.output_size(job_id)
            plan = decide.next_upload(
                self._acked.get(job_id),
                size,
                finished=record.final,
                truncated=record.output_truncated,
                chunk=self.chunk_bytes,
            )
            if plan.action == "ask":
                await self._upload(job, stub, call, 0, b"")
            elif plan.action == "send":
                data = await asyncio.to_thread(
                    _read, self.engine.store.output_path(job_id), plan.offset, plan.length
                )
                if not data:
                    break  # the file shrank? ask again next round
                await self._upload(job, stub, call, plan.offset, data)
            else:
                if plan.action == "done" and record.final and not record.settled:
                    await self._report(job, stub, call)
                    did = True
                break
            did = True
        return did

    async def _report(self, job: Job, stub: JobCalls, call: Call) -> None:
        record = job.record
        version = record.version
        size = self.engine.output_size(record.job_id)
        reply: manager_pb2.ReportJobStatusResponse = await call(
            stub.ReportJobStatus, status_request(self.node_id, job, size)
        )
        self.reports += 1
        self._progress[record.job_id] = (time.monotonic(), size)
        self.engine.acknowledge(record.job_id, version)
        if reply.cancel and not record.final:
            log.info("manager cancelled job %s", record.job_id)
            await self.engine.cancel(record.job_id, "cancelled by the manager")

    async def _upload(
        self,
        job: Job,
        stub: JobCalls,
        call: Call,
        offset: int,
        data: bytes,
    ) -> None:
        job_id = job.record.job_id
        reply: manager_pb2.UploadJobOutputResponse = await call(
            stub.UploadJobOutput,
            manager_pb2.UploadJobOutputRequest(
                node_id=self.node_id, job_id=job_id, offset=offset, data=data
            ),
        )
        before = self._acked.get(job_id)
        self._acked[job_id] = reply.acked_offset
        if before is not None and reply.acked_offset > before:
            self.uploaded_bytes += reply.acked_offset - before
        if reply.truncated and not job.record.output_truncated:
            log.info(
                "manager keeps no more of job %s's output (%d bytes)", job_id, reply.acked_offset
            )
            self.engine.acknowledge(job_id, job.record.acked_version, truncated=True)


def _read(path: os.PathLike[str], offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)
