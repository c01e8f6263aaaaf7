"""Simulated daemons: a lightweight in-memory DaemonService for tests and benchmarks.

A `SimDaemon` serves DaemonService over mTLS on its own 127.0.0.1 port
with its own `node/<id>` certificate, exactly as a real daemon would face
the manager, but its agents are rows in a dict: an operation flips their
state after an optional delay instead of spawning processes. It records
what it was asked (calls, caller ports) and, through a `Concurrency` shared
by a whole simulated fleet, the most operations ever in flight at once.

It lives in `bench/` because both `bench/fanout.py` and the tests use it
(`fleet/` must stay plumbing and imports no tier). Tests import it as
`bench.sim`: the repository-root conftest.py makes pytest put the root on
sys.path.

    async with SimFleet.start(ca, tmp_path, count=3) as fleet:
        await fleet.register_all(manager_address)
        fleet.nodes[0].servicer.calls     # [("OperateAgent", "web", "RESTART"), ...]
        fleet.concurrency.peak            # most OperateAgent calls in flight at once
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc import aio

from daemon.config import JobsConfig
from fleet.errors import FailedPrecondition, InvalidArgument, NotFound
from fleet.interceptors import ErrorMappingInterceptor
from fleet.pki import CertificateAuthority
from fleet.tls import (
    TLSConfig,
    channel_credentials,
    channel_options,
    require_role,
    server_credentials,
)
from fleet.v1 import (
    common_pb2,
    daemon_pb2,
    daemon_pb2_grpc,
    jobs_pb2,
    manager_pb2,
    manager_pb2_grpc,
)

__all__ = [
    "Concurrency",
    "PushCall",
    "SimAgent",
    "SimDaemon",
    "SimFleet",
    "SimJob",
    "SimLink",
    "SimNode",
    "output_chunks",
    "start_daemon",
]

_Context = aio.ServicerContext[Any, Any]
_S = common_pb2.AgentStatus
_J = jobs_pb2.JobTargetState
ANSWER_WAIT = JobsConfig().answer_wait_seconds
"""Seconds a StartJob waits for the job's end: the daemon's default."""
_FINAL = frozenset(
    {
        _J.JOB_TARGET_STATE_SUCCESS,
        _J.JOB_TARGET_STATE_FAILED,
        _J.JOB_TARGET_STATE_TIMEOUT,
        _J.JOB_TARGET_STATE_CANCELLED,
    }
)
_PIDS = itertools.count(10_000)


@dataclass
class Concurrency:
    """Operations in flight now and the most ever seen at once (shared by a fleet)."""

    now: int = 0
    """OperateAgent calls being served right now."""
    peak: int = 0
    """The highest `now` ever reached."""

    def enter(self) -> None:
        """One more call in flight."""
        self.now += 1
        self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        """One call done."""
        self.now -= 1


@dataclass(frozen=True)
class SimAgent:
    """An agent a simulated daemon starts with."""

    agent_id: str
    """Its id on the node."""
    type: str = "worker"
    """Its agent type (OperateAgents can select by it)."""
    running: bool = True
    """Whether it starts RUNNING (else STOPPED)."""


DEFAULT_AGENTS = (SimAgent("web", "web"), SimAgent("worker", "worker"))


@dataclass
class PushCall:
    """One PushUpdate call a simulated daemon received."""

    at: float
    """Wall time it arrived."""
    caller: str
    """The calling manager's identity (manager/<name>)."""
    version: int
    """The set version pushed."""
    agents: tuple[tuple[str, int], ...]
    """((agent id, revision), ...) pushed."""
    outcome: str
    """"applied" (it runs this set now), "same" (already did: a no-op) or "stale" (refused)."""


@dataclass
class SimJob:
    """One job target a simulated daemon accepted (StartJob), as the daemon would run it.

    What it "runs" follows the first step's argv: `true` and `false` end at once
    with 0 and 1, `sleep S` ends with 0 after S seconds, anything else runs
    until `SimDaemon.finish_job` (or CancelJob) ends it.
    """

    job_id: str
    """The job's id (StartJob is idempotent per id)."""
    argv: tuple[str, ...]
    """The first step's argv."""
    started_at: int
    """Wall time it started, ms."""
    state: jobs_pb2.JobTargetState.ValueType = _J.JOB_TARGET_STATE_RUNNING
    """Its JobTargetState now."""
    ended_at: int = 0
    """Wall time it ended, ms (0 while running)."""
    exit_code: int = 0
    """Its exit code once ended."""
    output_bytes: int = 0
    """Bytes of output it wrote (uploaded by `SimDaemon.upload_output`)."""
    starts: int = 1
    """StartJob calls received for it (more than one: the manager re-sent it)."""
    reported: str = ""
    """How the manager answered its final ReportJobStatus ("OK", a status code name, ""),
    or "answered" when a StartJob answer carried its end instead."""
    holds: int = 0
    """StartJob answers waiting for its end (then its end is not reported)."""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when it ends."""


class SimDaemon(daemon_pb2_grpc.DaemonServiceServicer):
    """An in-memory DaemonService for one simulated node (manager callers only)."""

    def __init__(
        self,
        node_id: str,
        *,
        agents: Iterable[SimAgent] = DEFAULT_AGENTS,
        concurrency: Concurrency | None = None,
        op_delay: float = 0.0,
        fail_operations: bool = False,
        labels: Mapping[str, str] | None = None,
        bad_revisions: Iterable[int] = (),
        report_delay: float = 0.0,
        answer_wait: float = ANSWER_WAIT,
        answer_states: bool = True,
        crash_after_answer: bool = False,
        push_delay: float = 0.0,
    ) -> None:
        self.node_id = node_id
        self.push_delay = push_delay
        """Seconds a PushUpdate takes before it applies (a daemon fetching an artifact)."""
        self.crash_after_answer = crash_after_answer
        """Its pushed agents crash (FATAL) just after the answer's snapshot is taken, and
        that report is stored before the answer leaves: the answer is the older one."""
        self.answer_states = answer_states
        """Answer a PushUpdate that asks for them with the agents' states (as the daemon
        does since the answer carries them) and then not report them; False: an older
        daemon, which answers without them and reports after every push."""
        self.answer_wait = answer_wait
        """As the daemon's [jobs] answer_wait_seconds: how long StartJob waits for the end."""
        self.labels = dict(labels or {})
        """Labels it registers with."""
        self.bad_revisions = set(bad_revisions)
        """Pushed revisions whose agents crash-loop to FATAL instead of running."""
        self.report_delay = report_delay
        """Seconds between applying a push and reporting the new states."""
        self.spec_version = 0
        """Version of the pushed set it runs (what RegisterNode/SyncAgentStates say)."""
        self.pushed: dict[str, common_pb2.AgentSpec] = {}
        """The pushed (managed) specs it runs, by id."""
        self.pushes: list[tuple[int, tuple[tuple[str, int], ...]]] = []
        """Every accepted push: (version, ((agent id, revision), ...))."""
        self.received: list[PushCall] = []
        """Every PushUpdate call, applied or not: which manager replica pushed what, when."""
        self.on_push: Callable[[], None] | None = None
        """Called after a push changed what it runs (a fleetsim node reports then)."""
        self.update_errors: list[common_pb2.UpdateError] = []
        """Pushed agents it refused (an agent of its own with the same id)."""
        self.link: SimLink | None = None
        """Set by `SimNode.register`: how it reports to the manager."""
        self.concurrency = concurrency or Concurrency()
        """Shared in-flight counter of OperateAgent calls."""
        self.op_delay = op_delay
        """Seconds an operation takes (the time a real restart would)."""
        self.fail_operations = fail_operations
        """Answer every OperateAgent FAILED_PRECONDITION (an agent that will not start)."""
        self.calls: list[tuple[str, ...]] = []
        """(method, agent id, operation name) of every call, in order."""
        self.client_ports: set[str] = set()
        """Client ports the callers connected from (one per connection)."""
        self.jobs: dict[str, SimJob] = {}
        """Job targets it accepted, by job id."""
        self.last_report_at = 0.0
        """Wall time the manager last answered a final ReportJobStatus."""
        self._job_tasks: set[asyncio.Task[None]] = set()
        self.agents: dict[str, common_pb2.AgentInfo] = {}
        for a in agents:
            info = common_pb2.AgentInfo(id=a.agent_id, type=a.type, version="1.0.0")
            _set_running(info) if a.running else _set_stopped(info)
            self.agents[a.agent_id] = info

    def _enter(self, method: str, context: _Context, *detail: str) -> str:
        caller = require_role(context, "manager")  # as the real daemon: managers only
        self.calls.append((method, *detail))
        self.client_ports.add(context.peer().rsplit(":", 1)[-1])
        return str(caller)

    def _agent(self, agent_id: str) -> common_pb2.AgentInfo:
        info = self.agents.get(agent_id)
        if info is None:
            raise NotFound(f"agent {agent_id!r} is not configured on {self.node_id}")
        return info

    @property
    def operations(self) -> list[tuple[str, ...]]:
        """The OperateAgent calls received."""
        return [c for c in self.calls if c[0] == "OperateAgent"]

    async def ListAgents(
        self, request: daemon_pb2.ListAgentsRequest, context: _Context
    ) -> daemon_pb2.ListAgentsResponse:
        self._enter("ListAgents", context)
        return daemon_pb2.ListAgentsResponse(agents=list(self.agents.values()))

    async def OperateAgent(
        self, request: daemon_pb2.OperateAgentRequest, context: _Context
    ) -> daemon_pb2.OperateAgentResponse:
        op = common_pb2.AgentOperation.Name(request.operation).removeprefix("AGENT_OPERATION_")
        self._enter("OperateAgent", context, request.agent_id, op)
        info = self._agent(request.agent_id)
        self.concurrency.enter()
        try:
            if self.op_delay:
                await asyncio.sleep(self.op_delay)
            if self.fail_operations:
                raise FailedPrecondition(f"{request.agent_id} on {self.node_id}: spawn failed")
            if request.operation == common_pb2.AGENT_OPERATION_STOP:
                _set_stopped(info)
            elif request.operation == common_pb2.AGENT_OPERATION_RESTART:
                _set_running(info)
                info.restart_count += 1
            elif request.operation == common_pb2.AGENT_OPERATION_START:
                if info.status != _S.AGENT_STATUS_RUNNING:
                    _set_running(info)
            else:
                raise InvalidArgument("must be START, STOP or RESTART", field="operation")
        finally:
            self.concurrency.leave()
        return daemon_pb2.OperateAgentResponse(success=True, agent=info)

    async def GetAgentMetrics(
        self, request: daemon_pb2.GetAgentMetricsRequest, context: _Context
    ) -> daemon_pb2.GetAgentMetricsResponse:
        self._enter("GetAgentMetrics", context, request.agent_id)
        self._agent(request.agent_id)
        points = [
            common_pb2.ResourceDataPoint(timestamp=1_000 * i, cpu=1.5 * i, memory_rss=1 << 20)
            for i in range(1, 4)
        ]
        return daemon_pb2.GetAgentMetricsResponse(agent_id=request.agent_id, data_points=points)

    async def PushUpdate(
        self, request: daemon_pb2.PushUpdateRequest, context: _Context
    ) -> daemon_pb2.PushUpdateResponse:
        """As the real daemon: stale versions refused, the same version again a no-op, an
        agent of its own with a pushed id kept and the pushed one refused."""
        caller = self._enter("PushUpdate", context)
        if self.push_delay:
            await asyncio.sleep(self.push_delay)
        specs = {s.id: s for s in request.agents}
        call = PushCall(
            time.time(),
            caller,
            request.version,
            tuple(sorted((i, s.revision) for i, s in specs.items())),
            "applied",
        )
        self.received.append(call)
        if request.version < self.spec_version or (
            request.version == self.spec_version and specs != self.pushed
        ):
            call.outcome = "stale"
            raise FailedPrecondition(
                f"stale spec version {request.version}: this node already has version"
                f" {self.spec_version}"
            )
        carry = request.want_agent_states and self.answer_states
        if request.version == self.spec_version:
            call.outcome = "same"
            return daemon_pb2.PushUpdateResponse(
                success=True,
                version=request.version,
                agent_states=self.agent_states() if carry else None,
            )
        own = {a for a in self.agents if a not in self.pushed}
        refused = [
            common_pb2.UpdateError(
                agent_id=i,
                revision=s.revision,
                reason=f"agent {i!r} is defined in this host's daemon.toml; the host's own"
                " agent is kept",
            )
            for i, s in sorted(specs.items())
            if i in own
        ]
        for gone in set(self.pushed) - set(specs):
            self.agents.pop(gone, None)
        self.pushed = {i: s for i, s in specs.items() if i not in own}
        for agent_id, spec in self.pushed.items():
            info = self.agents.get(agent_id)
            if info is None or info.revision != spec.revision:
                info = common_pb2.AgentInfo(id=agent_id, type=spec.type or "process")
                info.revision = spec.revision
                info.start_time = _now_ms()
                if spec.revision in self.bad_revisions:
                    info.status = _S.AGENT_STATUS_FATAL
                    info.last_exit.reason = "exited with code 1"
                else:
                    _set_running(info)
                    info.health = common_pb2.AGENT_HEALTH_UNSPECIFIED
                self.agents[agent_id] = info
        self.update_errors = list(refused)
        self.spec_version = request.version
        self.pushes.append(
            (request.version, tuple(sorted((i, s.revision) for i, s in specs.items())))
        )
        if self.link is not None and not carry:
            # The daemon's report after the push; one that answered with the states
            # does not send the same snapshot again.
            self.link.report_soon(self.report_delay)
        if self.on_push is not None:
            self.on_push()
        # As the daemon with start_secs = 0: RUNNING once applied (FATAL for a bad one).
        states = self.agent_states() if carry else None
        if self.crash_after_answer and self.link is not None:
            for agent_id in self.pushed:
                self.agents[agent_id].status = _S.AGENT_STATUS_FATAL
                self.agents[agent_id].last_exit.reason = "crashed after the answer"
            await self.link.report()
        return daemon_pb2.PushUpdateResponse(
            success=True,
            version=request.version,
            added=sorted(specs),
            refused=refused,
            agent_states=states,
        )

    def agent_states(self) -> manager_pb2.SyncAgentStatesRequest:
        """The SyncAgentStates it would send now: every agent, the spec version and the
        update errors (also what a PushUpdate answer carries)."""
        states = [
            manager_pb2.AgentState(
                agent_id=a.id,
                type=a.type,
                status=a.status,
                pid=a.pid,
                version=a.version,
                restart_count=a.restart_count,
                start_time=a.start_time,
                revision=a.revision,
                health=a.health,
                last_exit=a.last_exit if a.HasField("last_exit") else None,
            )
            for a in self.agents.values()
        ]
        return manager_pb2.SyncAgentStatesRequest(
            node_id=self.node_id,
            states=states,
            spec_version=self.spec_version,
            update_errors=self.update_errors,
        )

    async def ReadAgentLog(
        self, request: daemon_pb2.ReadAgentLogRequest, context: _Context
    ) -> AsyncIterator[daemon_pb2.ReadAgentLogResponse]:
        self._enter("ReadAgentLog", context, request.agent_id)
        self._agent(request.agent_id)
        data = f"{request.agent_id} on {self.node_id}: line 1\nline 2\n".encode()
        start = max(0, len(data) + request.offset) if request.offset < 0 else request.offset
        chunk = data[start:]
        yield daemon_pb2.ReadAgentLogResponse(
            data=chunk, offset=start, next_offset=start + len(chunk)
        )
        if request.follow:
            await asyncio.Event().wait()  # nothing more is ever written

    # --- jobs ---------------------------------------------------------------------------------

    async def StartJob(
        self, request: daemon_pb2.StartJobRequest, context: _Context
    ) -> daemon_pb2.StartJobResponse:
        """As the real daemon (JobEngine.start_job): idempotent per job id; when the
        manager accepts an end in the answer, waits up to `answer_wait` for it and answers
        with it (not reported); otherwise answers RUNNING and reports the end."""
        self._enter("StartJob", context, request.job_id)
        if not request.job_id or not request.steps:
            raise InvalidArgument("a job needs an id and at least one step", field="steps")
        accept = request.accept_end
        job = self.jobs.get(request.job_id)
        if job is not None:
            job.starts += 1
            if not accept and job.reported == "answered":
                job.reported = ""
                self._spawn(self._report_job(job))  # an older manager: report after all
        else:
            argv = tuple(request.steps[0].command.argv)
            job = SimJob(request.job_id, argv, _now_ms())
            self.jobs[request.job_id] = job
            job.holds += accept
            name = Path(argv[0]).name if argv else ""
            if name in ("true", "false"):
                self._end_job(job, 0 if name == "true" else 1)
            elif name == "sleep" and len(argv) == 2:
                self._spawn(self._end_later(job, float(argv[1])))
            if accept:
                try:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(job.ended.wait(), self.answer_wait)
                finally:
                    job.holds -= 1
                if job.state not in _FINAL:
                    return daemon_pb2.StartJobResponse(state=_J.JOB_TARGET_STATE_RUNNING)
        if not accept or job.state not in _FINAL:
            return daemon_pb2.StartJobResponse(state=job.state)
        if not job.reported:
            job.reported = "answered"
            self.last_report_at = time.time()
        return daemon_pb2.StartJobResponse(
            state=job.state,
            end=daemon_pb2.JobEnd(
                state=job.state,
                exit_code=job.exit_code,
                started_at=job.started_at,
                ended_at=job.ended_at,
                steps=[_step_result(job)],
            ),
        )

    async def CancelJob(
        self, request: daemon_pb2.CancelJobRequest, context: _Context
    ) -> daemon_pb2.CancelJobResponse:
        self._enter("CancelJob", context, request.job_id)
        job = self.jobs.get(request.job_id)
        if job is None:
            raise NotFound(f"job {request.job_id!r} is not known on {self.node_id}")
        if job.state not in _FINAL:
            self._end_job(job, -15, _J.JOB_TARGET_STATE_CANCELLED)
        return daemon_pb2.CancelJobResponse(state=job.state)

    async def ReadJobOutput(
        self, request: daemon_pb2.ReadJobOutputRequest, context: _Context
    ) -> AsyncIterator[daemon_pb2.ReadJobOutputResponse]:
        """A simulated job's output is not kept on the node: nothing, then eof once it ended."""
        self._enter("ReadJobOutput", context, request.job_id)
        job = self.jobs.get(request.job_id)
        if job is None:
            raise NotFound(f"job {request.job_id!r} is not known on {self.node_id}")
        end = request.offset
        yield daemon_pb2.ReadJobOutputResponse(offset=end, next_offset=end, eof=job.state in _FINAL)

    def finish_job(self, job_id: str, exit_code: int = 0) -> None:
        """End a job that runs until told (its final state is reported)."""
        job = self.jobs[job_id]
        if job.state not in _FINAL:
            self._end_job(job, exit_code)

    async def _end_later(self, job: SimJob, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if job.state not in _FINAL:
            self._end_job(job, 0)

    def _end_job(
        self,
        job: SimJob,
        exit_code: int,
        state: jobs_pb2.JobTargetState.ValueType = _J.JOB_TARGET_STATE_UNSPECIFIED,
    ) -> None:
        job.exit_code = exit_code
        job.ended_at = _now_ms()
        if not state:
            state = _J.JOB_TARGET_STATE_SUCCESS if exit_code == 0 else _J.JOB_TARGET_STATE_FAILED
        job.state = state
        job.ended.set()
        if not job.holds:  # else the StartJob answer carries the end
            self._spawn(self._report_job(job))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._job_tasks.add(task)
        task.add_done_callback(self._job_tasks.discard)

    async def _report_job(self, job: SimJob) -> None:
        """ReportJobStatus with the final state, retried while the manager is unreachable
        (as the daemon does); the manager's answer is recorded in `job.reported`."""
        if self.link is None:
            return
        step = _step_result(job)
        request = manager_pb2.ReportJobStatusRequest(
            node_id=self.node_id,
            job_id=job.job_id,
            state=job.state,
            exit_code=job.exit_code,
            started_at=job.started_at,
            ended_at=job.ended_at,
            steps=[step],
            output_bytes=job.output_bytes,
        )
        for attempt in range(20):
            try:
                await self.link.stub.ReportJobStatus(request, timeout=30)
                job.reported = "OK"
                break
            except aio.AioRpcError as e:
                job.reported = e.code().name
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    break
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
        self.last_report_at = time.time()

    async def upload_output(self, job_id: str, chunks: list[tuple[int, bytes]]) -> int:
        """Upload this job's output, `chunks` (`output_chunks`, made beforehand as the
        daemon's are in its file), as the daemon does: chunks with offsets, one at a time,
        from the manager's acknowledged offset. Returns the acked offset."""
        assert self.link is not None
        job = self.jobs[job_id]
        acked = 0
        size = sum(len(d) for _, d in chunks)
        for offset, data in chunks:
            if offset < acked:
                continue
            reply = await self.link.stub.UploadJobOutput(
                manager_pb2.UploadJobOutputRequest(
                    node_id=self.node_id, job_id=job_id, offset=offset, data=data
                ),
                timeout=60,
            )
            acked = reply.acked_offset
            if reply.truncated:
                break
        job.output_bytes = size
        return acked


def output_chunks(node_id: str, size: int, chunk: int) -> list[tuple[int, bytes]]:
    """A simulated target's output as (offset, bytes) chunks: numbered 64-byte lines."""
    line = f"{node_id} output line %010d " + "." * 64
    out = bytearray()
    i = 0
    while len(out) < size:
        out += (line % i)[:63].encode() + b"\n"
        i += 1
    data = bytes(out[:size])
    return [(o, data[o : o + chunk]) for o in range(0, size, chunk)]


def _step_result(job: SimJob) -> jobs_pb2.JobStepResult:
    """The job's one step, as the daemon reports it."""
    return jobs_pb2.JobStepResult(
        index=0,
        name="step-1",
        state=job.state,
        exit_code=job.exit_code,
        started_at=job.started_at,
        ended_at=job.ended_at,
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


def _set_running(info: common_pb2.AgentInfo) -> None:
    info.status = _S.AGENT_STATUS_RUNNING
    info.pid = next(_PIDS)


def _set_stopped(info: common_pb2.AgentInfo) -> None:
    info.status = _S.AGENT_STATUS_STOPPED
    info.pid = 0


@dataclass
class SimNode:
    """One running simulated daemon."""

    node_id: str
    """Its node id (the name in its certificate)."""
    address: str
    """127.0.0.1:<port> it serves DaemonService on."""
    tls: TLSConfig
    """Its node certificate (it registers with it)."""
    servicer: SimDaemon
    """What it serves and records."""
    server: aio.Server | None
    """Its gRPC server; None once stopped."""

    async def stop(self) -> None:
        """Stop serving (the manager then finds it down); its port stays known."""
        await self.close_link()
        if self.server is not None:
            await self.server.stop(None)
            self.server = None

    async def register(self, manager_address: str, trust_domain: str) -> None:
        """RegisterNode and SyncAgentStates with the manager, as a daemon does at start;
        later pushes are reported back over the same link."""
        if self.servicer.link is None:
            self.servicer.link = SimLink(self, manager_address, trust_domain)
        await self.servicer.link.register()
        await self.servicer.link.report()

    async def close_link(self) -> None:
        """Stop reporting to the manager."""
        if self.servicer.link is not None:
            await self.servicer.link.close()
            self.servicer.link = None


class SimLink:
    """A simulated daemon's channel to the manager: register, report states."""

    def __init__(self, node: SimNode, manager_address: str, trust_domain: str) -> None:
        self.node = node
        self.channel = aio.secure_channel(
            manager_address,
            channel_credentials(node.tls),
            options=channel_options(f"manager.{trust_domain}"),
        )
        self.stub = manager_pb2_grpc.ManagerServiceStub(self.channel)
        self._tasks: set[asyncio.Task[None]] = set()

    async def register(self) -> None:
        """RegisterNode with what the simulated daemon runs."""
        d = self.node.servicer
        await self.stub.RegisterNode(
            manager_pb2.RegisterNodeRequest(
                node_id=d.node_id,
                hostname=f"{d.node_id}.sim",
                ip="127.0.0.1",
                os="linux",
                arch="x86_64",
                labels=d.labels,
                daemon_version="sim",
                agent_version="sim",
                daemon_address=self.node.address,
                spec_version=d.spec_version,
            ),
            timeout=30,
        )

    async def report(self) -> None:
        """SyncAgentStates: every agent, the spec version and the update errors."""
        await self.stub.SyncAgentStates(self.node.servicer.agent_states(), timeout=30)

    def report_soon(self, delay: float) -> None:
        """Report in the background after `delay` seconds (as a daemon after a push)."""

        async def later() -> None:
            await asyncio.sleep(delay)
            with contextlib.suppress(Exception):  # the manager may be gone: a later push retries
                await self.report()

        task = asyncio.create_task(later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel pending reports and close the channel."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.channel.close(None)


async def start_daemon(node_id: str, tls: TLSConfig, **behaviour: Any) -> SimNode:
    """Serve a SimDaemon for `node_id` on a fresh 127.0.0.1 port with certificate `tls`."""
    servicer = SimDaemon(node_id, **behaviour)
    server = aio.server(interceptors=[ErrorMappingInterceptor()])
    daemon_pb2_grpc.add_DaemonServiceServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(tls))
    await server.start()
    return SimNode(node_id, f"127.0.0.1:{port}", tls, servicer, server)


@dataclass
class SimFleet:
    """Several simulated daemons sharing one CA and one Concurrency counter."""

    ca: CertificateAuthority
    """The fleet CA that issued every node certificate."""
    cert_dir: Path
    """Where node certificates are written (one directory per node)."""
    nodes: list[SimNode] = field(default_factory=list)
    """The daemons, in start order."""
    concurrency: Concurrency = field(default_factory=Concurrency)
    """OperateAgent calls in flight across the whole fleet."""

    @classmethod
    async def start(
        cls,
        ca: CertificateAuthority,
        cert_dir: Path,
        *,
        count: int = 0,
        prefix: str = "sim",
        labels: Mapping[str, str] | None = None,
        **behaviour: Any,
    ) -> SimFleet:
        """A fleet with `count` daemons named <prefix>-<i> (more via `add`)."""
        fleet = cls(ca, cert_dir)
        try:
            for i in range(count):
                await fleet.add(f"{prefix}-{i}", labels=labels, **behaviour)
        except BaseException:
            await fleet.close()
            raise
        return fleet

    async def add(self, node_id: str, **behaviour: Any) -> SimNode:
        """Start one more daemon with its own port and node certificate."""
        tls = self.ca.issue("node", node_id, ips=("127.0.0.1",)).write(
            self.cert_dir / f"sim-{node_id}"
        )
        node = await start_daemon(node_id, tls, concurrency=self.concurrency, **behaviour)
        self.nodes.append(node)
        return node

    def __getitem__(self, node_id: str) -> SimNode:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(node_id)

    async def register_all(self, manager_address: str, *, concurrency: int = 32) -> None:
        """Register every daemon (and sync its agents) with the manager."""
        sem = asyncio.Semaphore(concurrency)

        async def one(node: SimNode) -> None:
            async with sem:
                await node.register(manager_address, self.ca.trust_domain)

        await asyncio.gather(*(one(n) for n in self.nodes))

    async def close(self) -> None:
        """Stop every daemon."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                await node.stop()

    async def __aenter__(self) -> SimFleet:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# --- serve mode: simulated daemons in their own process (for benchmarks) ---
#
#   python -m bench.sim serve  < spec JSON line
#
# stdin, first line: {"op_delay": 0.0, "nodes": [{"node_id", "ca", "cert", "key"}, ...]}
# and, for jobs, "manager": "<host:port>", "trust_domain", "labels": {...}: every
# daemon then registers with that manager (RegisterNode + SyncAgentStates, with
# its own certificate) and reports its jobs' ends there (ReportJobStatus).
# stdout, first line: {"<node_id>": "127.0.0.1:<port>", ...} once all serve
# (and registered).
# Then each "stats" line on stdin prints one JSON line
# {"peak": <most OperateAgent in flight>, "nodes": {"<node_id>": {"operations": n,
# "ports": [client ports]}}, "jobs": {...}}; "delay <seconds>" sets every daemon's
# op_delay (and resets the peak); "jobs <job id>" (or "<prefix>*") answers, for those
# jobs: StartJob calls, jobs, each final report's answer, and the wall
# time of the last report answered; "upload <json>" ({"job_id", "nodes", "size",
# "chunk"}) uploads `size` bytes of output per listed node (all nodes at once, each
# one chunk at a time, as daemons do), answers {"t0", "t1", "acked"}, then ends
# those jobs (reported SUCCESS with output_bytes); EOF on stdin stops every server
# and exits.


SPEC_LIMIT = 64 * 1024 * 1024
"""Longest JSON line read from stdin (a 500-node spec is ~100 KiB; asyncio's default is 64 KiB)."""
NOFILE = 20_000
"""Open-file limit the serve mode asks for: two sockets per simulated daemon, and then some."""


def _raise_nofile() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _job_stats(nodes: list[SimNode], pattern: str) -> dict[str, Any]:
    """Stats of the jobs with this id (or whose id starts with it, given as "prefix*")."""
    prefix = pattern.removesuffix("*")
    jobs = [
        j
        for n in nodes
        for job_id, j in n.servicer.jobs.items()
        if (job_id.startswith(prefix) if pattern.endswith("*") else job_id == pattern)
    ]
    answers: dict[str, int] = {}
    for j in jobs:
        answers[j.reported] = answers.get(j.reported, 0) + 1
    return {
        "jobs": len(jobs),
        "starts": sum(j.starts for j in jobs),
        "ended": sum(j.ended_at > 0 for j in jobs),
        "reports": answers,
        "last_report_at": max((n.servicer.last_report_at for n in nodes), default=0.0),
        "first_started_at": min((j.started_at for j in jobs), default=0),
    }


async def _upload(by_id: dict[str, SimNode], spec: dict[str, Any]) -> dict[str, Any]:
    job_id, size, chunk = spec["job_id"], int(spec["size"]), int(spec["chunk"])
    daemons = [by_id[n].servicer for n in spec["nodes"]]
    # The output exists before the upload (the daemon reads it from its file): making
    # it is not part of the timed upload.
    chunks = [output_chunks(d.node_id, size, chunk) for d in daemons]
    t0 = time.time()
    acked = await asyncio.gather(
        *(d.upload_output(job_id, c) for d, c in zip(daemons, chunks, strict=True))
    )
    t1 = time.time()
    for d in daemons:
        d.finish_job(job_id)
    return {"t0": t0, "t1": t1, "acked": sum(acked)}


async def _serve() -> None:
    _raise_nofile()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=SPEC_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec = json.loads(await reader.readline())
    concurrency = Concurrency()
    nodes: list[SimNode] = []
    try:
        for item in spec["nodes"]:
            tls = TLSConfig(Path(item["ca"]), Path(item["cert"]), Path(item["key"]))
            nodes.append(
                await start_daemon(
                    item["node_id"],
                    tls,
                    concurrency=concurrency,
                    op_delay=float(spec.get("op_delay", 0.0)),
                    labels=spec.get("labels"),
                )
            )
        if spec.get("manager"):
            sem = asyncio.Semaphore(32)

            async def register(node: SimNode) -> None:
                async with sem:
                    await node.register(spec["manager"], spec["trust_domain"])

            await asyncio.gather(*(register(n) for n in nodes))
        by_id = {n.node_id: n for n in nodes}
        # Start-up objects leave the cyclic GC, as in the manager and the driver:
        # one process holding N daemons' servers is a far bigger heap than any
        # real daemon's, and full collections walking it would land in rounds.
        gc.collect()
        gc.freeze()
        _emit({n.node_id: n.address for n in nodes})
        while line := await reader.readline():
            command, _, arg = line.decode().strip().partition(" ")
            if command == "delay":
                for n in nodes:
                    n.servicer.op_delay = float(arg)
                concurrency.peak = 0
                _emit({"op_delay": float(arg)})
            elif command == "stats":
                _emit(
                    {
                        "peak": concurrency.peak,
                        "nodes": {
                            n.node_id: {
                                "operations": len(n.servicer.operations),
                                "ports": sorted(n.servicer.client_ports),
                            }
                            for n in nodes
                        },
                    }
                )
            elif command == "jobs":
                _emit(_job_stats(nodes, arg))
            elif command == "upload":
                _emit(await _upload(by_id, json.loads(arg)))
    finally:
        await asyncio.gather(*(n.stop() for n in nodes))


def _emit(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    if sys.argv[1:] != ["serve"]:
        sys.exit("usage: python -m bench.sim serve  (spec JSON on stdin; see the module)")
    asyncio.run(_serve())
