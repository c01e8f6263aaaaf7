"""Jobs on a real daemon: DaemonService over mTLS, real child processes, real job dirs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from daemon_helpers import client_channel, daemon_config, eventually, short_tmp
from grpc import aio

from daemon.config import DaemonConfig, JobsConfig
from daemon.jobs.engine import ANSWERED, Job, JobEngine
from daemon.jobs.reporter import status_request
from daemon.jobs.store import JobRecord, StepRecord
from daemon.server import DaemonServer
from daemon.supervisor.clock import ManualClock
from fleet.errors import NotFound
from fleet.v1 import daemon_pb2, daemon_pb2_grpc, jobs_pb2

T = jobs_pb2
FINAL = {
    T.JOB_TARGET_STATE_SUCCESS,
    T.JOB_TARGET_STATE_FAILED,
    T.JOB_TARGET_STATE_TIMEOUT,
    T.JOB_TARGET_STATE_CANCELLED,
}


def step(*argv: str, when: int = 0, name: str = "", **kw: Any) -> jobs_pb2.JobStep:
    return jobs_pb2.JobStep(
        name=name, command=jobs_pb2.JobCommand(argv=list(argv), **kw), when=when
    )


def sh(script: str, **kw: Any) -> jobs_pb2.JobStep:
    return step("/bin/sh", "-c", script, **kw)


def start_req(
    job_id: str, *steps: jobs_pb2.JobStep, timeout: float = 0, lock: str = ""
) -> daemon_pb2.StartJobRequest:
    return daemon_pb2.StartJobRequest(
        job_id=job_id, steps=list(steps), timeout_seconds=timeout, lock=lock
    )


@dataclass
class Node:
    """A daemon serving jobs, and a manager/m1 client to it."""

    server: DaemonServer
    cfg: DaemonConfig
    stub: daemon_pb2_grpc.DaemonServiceStub
    channel: aio.Channel
    pki: Any

    async def start(self, req: daemon_pb2.StartJobRequest) -> daemon_pb2.StartJobResponse:
        return await self.stub.StartJob(req)

    async def state(self, job_id: str) -> int:
        """The job's state, by StartJob's idempotent answer (the steps are ignored)."""
        reply = await self.stub.StartJob(start_req(job_id, sh("exit 99")))
        return reply.state

    async def final(self, job_id: str, within: float = 20.0) -> JobRecord:
        await eventually(lambda: self.state(job_id), lambda s: s in FINAL, within=within)
        return self.server.jobs.record(job_id)

    def output(self, job_id: str) -> bytes:
        return self.server.jobs.store.output_path(job_id).read_bytes()

    async def read(self, job_id: str, **kw: Any) -> list[daemon_pb2.ReadJobOutputResponse]:
        return [
            r
            async for r in self.stub.ReadJobOutput(
                daemon_pb2.ReadJobOutputRequest(job_id=job_id, **kw)
            )
        ]


MakeNode = Callable[..., Awaitable[Node]]


@pytest.fixture
async def make_node(pki: Any) -> AsyncIterator[MakeNode]:
    """Start daemons (node/n1) with a given [jobs] table; stopped after the test."""
    nodes: list[Node] = []
    with short_tmp() as root:

        async def make(jobs: JobsConfig | None = None, *, sub: str = "a") -> Node:
            cfg = daemon_config(
                root / sub,
                pki.issue("node", "n1"),
                (),
                jobs=jobs or JobsConfig(grace_seconds=1.0),
            )
            server = DaemonServer(cfg, config_path=Path("/etc/fleet/daemon.toml"))
            await server.start()
            channel = client_channel(
                pki.issue("manager", "m1"), server.port, "n1", pki.trust_domain
            )
            node = Node(server, cfg, daemon_pb2_grpc.DaemonServiceStub(channel), channel, pki)
            nodes.append(node)
            return node

        try:
            yield make
        finally:
            for node in nodes:
                await node.channel.close()
                await node.server.stop(1.0)
                for job in node.server.jobs.jobs():  # leave no step running
                    if job.record.current is not None and job.record.current.pid:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(job.record.current.pid, signal.SIGKILL)


@pytest.fixture
async def node(make_node: MakeNode) -> Node:
    return await make_node()


async def test_a_job_runs_and_its_output_is_on_the_node(node: Node) -> None:
    """A one-step job is RUNNING at once, then SUCCESS with exit 0, its output in the job dir."""
    reply = await node.start(start_req("ok-1", sh("echo out; echo err >&2")))
    assert reply.state == T.JOB_TARGET_STATE_RUNNING
    record = await node.final("ok-1")
    assert record.state == "SUCCESS"
    assert record.exit_code == 0
    assert record.steps[0].state == "SUCCESS"
    assert record.started_at <= record.steps[0].started_at <= record.ended_at
    assert sorted(node.output("ok-1").splitlines()) == [b"err", b"out"]


async def test_exit_code_and_signal_are_recorded(node: Node) -> None:
    """A non-zero exit is FAILED with that code; death by a signal is -N naming it."""
    await node.start(start_req("code", sh("exit 42")))
    await node.start(start_req("sig", sh("kill -USR1 $$")))
    code = await node.final("code")
    assert (code.state, code.exit_code, code.reason) == ("FAILED", 42, "exit code 42")
    sig = await node.final("sig")
    assert sig.state == "FAILED"
    assert sig.exit_code == -signal.SIGUSR1
    assert "SIGUSR1" in sig.reason


async def test_timeout_kills_the_whole_process_group(node: Node) -> None:
    """At the job timeout the step and its grandchild are stopped: TIMEOUT, nothing left."""
    await node.start(
        start_req("slow", sh("sleep 300 & echo $! > grandchild.pid; sleep 300"), timeout=1.0)
    )
    record = await node.final("slow")
    assert record.state == "TIMEOUT"
    assert "job timeout (1s)" in record.reason
    assert record.exit_code == -signal.SIGTERM
    grandchild = int((node.server.jobs.store.dir("slow") / "grandchild.pid").read_text())
    assert not psutil.pid_exists(grandchild) or (
        psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    )


async def test_a_setsid_escapee_of_a_step_is_named_not_stopped(node: Node) -> None:
    """What left the step's group (a double fork: how a process outlives a job) is named."""
    await node.start(
        start_req("escape", sh("setsid sh -c 'sleep 300 & echo $! > escapee.pid'; echo done"))
    )
    record = await node.final("escape")
    escapee = int((node.server.jobs.store.dir("escape") / "escapee.pid").read_text())
    try:
        assert psutil.Process(escapee).status() != psutil.STATUS_ZOMBIE
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(escapee, signal.SIGKILL)
    assert record.state == "SUCCESS"
    assert record.steps[0].reason == (
        f"left 1 process(es) running outside its process group (not stopped): pid {escapee} (sleep)"
    )
    assert record.reason == record.steps[0].reason  # `fleetctl run` shows it


async def test_a_step_ignoring_sigterm_is_killed_after_grace(node: Node) -> None:
    """A step timeout stops only that step; one that ignores SIGTERM is SIGKILLed after grace."""
    await node.start(
        start_req(
            "stubborn",
            # Long enough for sh to set its trap first, even on a loaded machine.
            sh("trap '' TERM; sleep 300", timeout_seconds=2.0),
            step("echo", "after", when=T.STEP_WHEN_ON_FAILURE),
        )
    )
    record = await node.final("stubborn")
    assert record.state == "TIMEOUT"
    assert record.steps[0].state == "TIMEOUT"
    assert record.steps[0].exit_code == -signal.SIGKILL
    assert "step timeout (2s)" in record.steps[0].reason
    assert "killed after 1s grace" in record.steps[0].reason
    assert record.steps[1].state == "SUCCESS"  # on_failure ran after the timed-out step
    assert node.output("stubborn") == b"after\n"


async def test_cancel_running_and_queued(make_node: MakeNode) -> None:
    """Cancel stops a running job's group (CANCELLED) and ends a queued one at once."""
    node = await make_node(JobsConfig(max_concurrent=1, grace_seconds=1.0))
    assert (await node.start(start_req("run", sh("sleep 300")))).state == T.JOB_TARGET_STATE_RUNNING
    queued = await node.start(start_req("wait", sh("echo never")))
    assert queued.state == T.JOB_TARGET_STATE_QUEUED
    reply = await node.stub.CancelJob(daemon_pb2.CancelJobRequest(job_id="wait"))
    assert reply.state == T.JOB_TARGET_STATE_CANCELLED
    await node.stub.CancelJob(daemon_pb2.CancelJobRequest(job_id="run"))
    record = await node.final("run")
    assert record.state == "CANCELLED"
    assert record.exit_code == -signal.SIGTERM
    waited = node.server.jobs.record("wait")
    assert waited.steps[0].state == "SKIPPED"
    assert node.output("wait") == b""
    again = await node.stub.CancelJob(daemon_pb2.CancelJobRequest(job_id="run"))
    assert again.state == T.JOB_TARGET_STATE_CANCELLED  # idempotent
    with pytest.raises(grpc.RpcError) as info:
        await node.stub.CancelJob(daemon_pb2.CancelJobRequest(job_id="ghost"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_max_concurrent_and_locks_queue_jobs(make_node: MakeNode) -> None:
    """Two run at once; a third waits for a slot; jobs sharing a lock never overlap."""
    node = await make_node(JobsConfig(max_concurrent=2, grace_seconds=1.0))
    marks = node.cfg.state_dir / "marks"
    marks.mkdir(parents=True)
    # Each waits for `go`, written once all four StartJobs were answered: under any load
    # none ends before the last one arrives. Then 0.5 s each, for overlaps to show.
    go = marks / "go"
    body = (
        f"echo start $FLEET_JOB_ID $(date +%s.%N) >> {marks}/log;"
        f" while [ ! -e {go} ]; do sleep 0.05; done; sleep 0.5;"
        f" echo end $FLEET_JOB_ID $(date +%s.%N) >> {marks}/log"
    )
    states = [
        (await node.start(start_req(f"apt-{i}", sh(body), lock="apt"))).state for i in range(2)
    ]
    free = await node.start(start_req("free", sh(body)))
    third = await node.start(start_req("third", sh(body)))
    assert states == [T.JOB_TARGET_STATE_RUNNING, T.JOB_TARGET_STATE_QUEUED]
    assert free.state == T.JOB_TARGET_STATE_RUNNING  # not held up by apt-1 waiting for its lock
    assert third.state == T.JOB_TARGET_STATE_QUEUED
    go.touch()
    for job_id in ("apt-0", "apt-1", "free", "third"):
        assert (await node.final(job_id)).state == "SUCCESS"
    events = [line.split() for line in (marks / "log").read_text().splitlines()]
    spans: dict[str, list[float]] = {}
    for _what, job_id, at in events:
        spans.setdefault(job_id, []).append(float(at))
    assert spans["apt-0"][1] <= spans["apt-1"][0]  # the lock held them apart
    running = 0
    peak = 0
    for what, _, _ in sorted(events, key=lambda e: float(e[2])):
        running += 1 if what == "start" else -1
        peak = max(peak, running)
    assert peak == 2


async def test_jobs_disabled_refuses_naming_the_setting(make_node: MakeNode) -> None:
    """With [jobs] enabled = false a job is FAILED with a reason naming the setting and file."""
    node = await make_node(JobsConfig(enabled=False))
    reply = await node.start(start_req("no", sh("echo hi")))
    assert reply.state == T.JOB_TARGET_STATE_FAILED
    assert "[jobs] enabled = false" in reply.reason
    assert "/etc/fleet/daemon.toml" in reply.reason
    assert not node.server.jobs.store.dir("no").exists()
    assert node.server.link.node.jobs_disabled


async def test_unknown_user_fails_the_step(node: Node) -> None:
    """A user this node does not have: the step is FAILED with a reason naming the user."""
    await node.start(start_req("who", step("true", user="no-such-user-x")))
    record = await node.final("who")
    assert record.state == "FAILED"
    assert record.reason == "user 'no-such-user-x' does not exist on this node"


async def test_a_missing_working_directory_fails_the_step_naming_it(
    node: Node, tmp_path: Path
) -> None:
    """A cwd this node does not have: FAILED (127) naming the directory, not the wrapper."""
    missing = str(tmp_path / "no-such-dir")
    await node.start(start_req("where", step("pwd", cwd=missing)))
    record = await node.final("where")
    assert record.state == "FAILED"
    assert record.reason == f"working directory {missing!r} does not exist on this node"
    assert record.exit_code == 127


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs a root daemon")
async def test_a_working_directory_the_user_may_not_enter_fails_naming_it(
    node: Node, tmp_path: Path
) -> None:
    """--user nobody --cwd a 0700 root dir: FAILED naming the directory, the step never runs."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    await node.start(start_req("locked", step("/bin/pwd", user="nobody", cwd=str(private))))
    record = await node.final("locked")
    assert record.state == "FAILED"
    assert record.exit_code == 127
    # The first directory on the way it may not enter: pytest's own dirs are 0700 too.
    assert record.reason.startswith(
        f"working directory {str(private)!r}: user 'nobody' may not enter '/tmp/"
    )
    assert record.reason.endswith(" (mode 0700, owner uid 0)")
    assert node.output("locked") == b""


async def test_script_runs_under_its_interpreter_as_the_user(node: Node) -> None:
    """A script body runs with the interpreter's argv plus its path, as the requested user."""
    script = jobs_pb2.JobCommand(
        script='echo "$1-$(id -un)"; echo "cwd=$(pwd)"', interpreter=["/bin/sh", "-e"]
    )
    as_user = jobs_pb2.JobCommand(
        script="id -un", interpreter=["/bin/sh"], user="nobody", env={"X": "1"}
    )
    await node.start(
        daemon_pb2.StartJobRequest(
            job_id="script",
            steps=[jobs_pb2.JobStep(command=script), jobs_pb2.JobStep(command=as_user)],
        )
    )
    record = await node.final("script")
    assert record.state == "SUCCESS", record
    out = node.output("script").decode().splitlines()
    assert out[0] == "-root"
    assert out[1] == f"cwd={node.server.jobs.store.dir('script')}"
    assert out[2] == "nobody"


async def test_steps_follow_when(node: Node) -> None:
    """on_success steps stop after a failure; on_failure and always steps run; the
    target is FAILED with the failing step's exit code."""
    await node.start(
        start_req(
            "steps",
            sh("echo one", name="one"),
            sh("echo two; exit 5", name="two"),
            sh("echo three", name="three"),
            sh("echo rollback", when=T.STEP_WHEN_ON_FAILURE),
            sh("echo cleanup", when=T.STEP_WHEN_ALWAYS),
        )
    )
    record = await node.final("steps")
    assert [s.state for s in record.steps] == ["SUCCESS", "FAILED", "SKIPPED", "SUCCESS", "SUCCESS"]
    assert (record.state, record.exit_code) == ("FAILED", 5)
    assert [s.name for s in record.steps][:3] == ["one", "two", "three"]
    assert record.steps[3].name == "step-4"
    assert node.output("steps") == b"one\ntwo\nrollback\ncleanup\n"
    await node.start(start_req("fine", sh("true"), sh("echo no", when=T.STEP_WHEN_ON_FAILURE)))
    fine = await node.final("fine")
    assert fine.state == "SUCCESS"
    assert fine.steps[1].state == "SKIPPED"
    assert "no earlier step failed" in fine.steps[1].reason


async def test_start_job_is_idempotent(node: Node) -> None:
    """The same job id again is not started twice; the answer is where the job is."""
    req = start_req("once", sh("echo ran >> count; echo ran"))
    first = await node.start(req)
    again = await node.start(req)
    assert first.state == T.JOB_TARGET_STATE_RUNNING
    assert again.state in (T.JOB_TARGET_STATE_RUNNING, T.JOB_TARGET_STATE_SUCCESS)
    await node.final("once")
    assert (await node.start(req)).state == T.JOB_TARGET_STATE_SUCCESS
    assert node.output("once") == b"ran\n"


async def test_an_ended_job_is_answered_with_its_end_again_and_not_reported(
    make_node: MakeNode,
) -> None:
    """accept_end: a fast job's answer carries its end and output, and the job counts as
    acknowledged; a retried StartJob (the first answer lost) gets the same end. (A wait
    of 5 s: on a loaded host the step may take longer than the default 0.2 s.)"""
    node = await make_node(JobsConfig(grace_seconds=1.0, answer_wait_seconds=5.0))
    req = start_req("quick", sh("echo hi; echo err >&2; exit 2"))
    req.accept_end = True
    first = await node.start(req)
    assert first.state == T.JOB_TARGET_STATE_FAILED
    assert first.HasField("end")
    assert (first.end.state, first.end.exit_code, first.end.output) == (
        T.JOB_TARGET_STATE_FAILED,
        2,
        b"hi\nerr\n",
    )
    assert [s.exit_code for s in first.end.steps] == [2]
    assert first.end.ended_at >= first.end.started_at > 0
    record = node.server.jobs.record("quick")
    assert record.settled
    assert record.extra[ANSWERED] == record.version
    assert not node.server.jobs.jobs(), "settled: nothing left for the reporter"
    again = await node.start(req)
    assert again == first
    # Without accept_end (the manager without this behaviour): a plain answer, and
    # the end only answered so far is reported after all.
    req.accept_end = False
    plain = await node.start(req)
    assert plain.state == T.JOB_TARGET_STATE_FAILED
    assert not plain.HasField("end")
    (job,) = node.server.jobs.jobs()
    assert not job.record.settled
    assert ANSWERED not in job.record.extra
    assert status_request("n1", job, 7).state == T.JOB_TARGET_STATE_FAILED


async def test_a_job_longer_than_the_wait_is_answered_running_without_an_end(
    make_node: MakeNode,
) -> None:
    """accept_end and a command longer than answer_wait_seconds: RUNNING after about the
    wait. A fast one with more output than an answer carries: its state, no end (its
    output is uploaded and its end reported)."""
    # A 1 s wait: the fast one below must end within it on a loaded machine too (0.3 s
    # was too short for `head` under a full test run beside benchmarks).
    node = await make_node(JobsConfig(grace_seconds=1.0, answer_wait_seconds=1.0))
    req = start_req("slow", sh("sleep 5; echo done"))
    req.accept_end = True
    t0 = time.monotonic()
    reply = await node.start(req)
    # Answered after the wait, well before the end (a loaded machine adds to the wait).
    assert 0.95 <= time.monotonic() - t0 < 3.0
    assert reply.state == T.JOB_TARGET_STATE_RUNNING
    assert not reply.HasField("end")
    (job,) = node.server.jobs.jobs()
    assert not job.holds, "the reporter may report it now"
    big = start_req("big", sh("head -c 70000 /dev/zero"))
    big.accept_end = True
    reply = await node.start(big)
    assert reply.state == T.JOB_TARGET_STATE_SUCCESS
    assert not reply.HasField("end"), "over 64 KiB: uploaded, then reported"
    assert not node.server.jobs.record("big").settled


async def test_bad_requests_are_refused_naming_the_field(node: Node) -> None:
    """Bad StartJob requests are INVALID_ARGUMENT naming the field, and leave nothing behind."""
    cases = {
        "job_id": start_req("", sh("true")),
        "job_id ": start_req("../x", sh("true")),
        "steps": start_req("j"),
        "steps[0].command.argv": start_req("j", step()),
        "steps[0].command.interpreter": daemon_pb2.StartJobRequest(
            job_id="j", steps=[jobs_pb2.JobStep(command=jobs_pb2.JobCommand(script="echo"))]
        ),
        "timeout_seconds": start_req("j", sh("true"), timeout=-1),
        "steps[0].command.timeout_seconds": start_req(
            "j", sh("true", timeout_seconds=float("inf"))
        ),
    }
    for field, req in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            await node.start(req)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field.strip() in (info.value.details() or "")
    assert node.server.jobs.store.job_ids() == []


async def test_only_managers_may_call_the_job_rpcs(node: Node) -> None:
    """node/* and operator/* certificates get PERMISSION_DENIED, and no job starts."""
    for role in ("node", "operator"):
        tls = node.pki.issue(role, "intruder")
        async with client_channel(tls, node.server.port, "n1", node.pki.trust_domain) as ch:
            stub = daemon_pb2_grpc.DaemonServiceStub(ch)
            for call in (
                stub.StartJob(start_req("evil", sh("touch /tmp/evil"))),
                stub.CancelJob(daemon_pb2.CancelJobRequest(job_id="evil")),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.RpcError) as info:
                async for _ in stub.ReadJobOutput(daemon_pb2.ReadJobOutputRequest(job_id="evil")):
                    pass
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert node.server.jobs.store.job_ids() == []


async def test_read_job_output_follows_until_the_job_ends(node: Node) -> None:
    """A following reader gets every byte as it is written, then eof once the job ended."""
    await node.start(start_req("talk", sh("for i in 1 2 3; do echo line $i; sleep 0.2; done")))
    got = b""
    last = None
    async for reply in node.stub.ReadJobOutput(
        daemon_pb2.ReadJobOutputRequest(job_id="talk", follow=True, max_bytes=4)
    ):
        assert reply.offset == len(got)
        assert len(reply.data) <= 4
        got += reply.data
        last = reply
    assert last is not None
    assert last.eof
    assert got == b"line 1\nline 2\nline 3\n"
    tail = await node.read("talk", offset=7)
    assert b"".join(r.data for r in tail) == b"line 2\nline 3\n"
    assert tail[-1].eof
    with pytest.raises(grpc.RpcError) as info:
        await node.read("ghost")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_restarted_daemon_readopts_the_running_step(make_node: MakeNode) -> None:
    """The daemon is torn down and a new one started on the same dirs while a step runs:
    the step is re-adopted, its exit code recorded once, the output continuous, and the
    next step runs."""
    first = await make_node()
    await first.start(
        start_req(
            "long",
            sh("echo before; sleep 1.5; echo after; exit 7"),
            sh("echo next", when=T.STEP_WHEN_ALWAYS),
        )
    )
    await eventually(lambda: asyncio.sleep(0, first.output("long")), lambda out: out == b"before\n")
    pid = first.server.jobs.record("long").current.pid  # type: ignore[union-attr]
    await first.channel.close()
    await first.server.stop(1.0)
    assert psutil.pid_exists(pid)  # the step outlived its daemon
    second = await make_node()
    record = await second.final("long")
    assert record.steps[0].state == "FAILED"
    assert record.steps[0].exit_code == 7
    assert record.steps[1].state == "SUCCESS"
    assert (record.state, record.exit_code) == ("FAILED", 7)
    assert second.output("long") == b"before\nafter\nnext\n"


async def test_a_step_that_ended_while_the_daemon_was_down(make_node: MakeNode) -> None:
    """A step that exited while no daemon ran is recorded from its status file."""
    first = await make_node()
    await first.start(start_req("gone", sh("sleep 0.5; exit 3")))
    await eventually(
        lambda: asyncio.sleep(0, first.server.jobs.record("gone").current),
        lambda c: c is not None and c.pid > 0,
    )
    await first.channel.close()
    await first.server.stop(1.0)
    status = first.server.jobs.store.status_path("gone", 0)
    await eventually(lambda: asyncio.sleep(0, status.read_bytes()), bool)
    second = await make_node()
    record = await second.final("gone")
    assert (record.state, record.exit_code) == ("FAILED", 3)


async def test_big_output_is_never_held_in_memory(node: Node) -> None:
    """64 MiB of output goes straight to the file; reading it back stays bounded in memory."""
    size = 64 * 1024 * 1024
    me = psutil.Process()
    before = me.memory_info().rss
    await node.start(start_req("big", step("head", "-c", str(size), "/dev/zero")))
    await node.final("big")
    total = 0
    async for reply in node.stub.ReadJobOutput(
        daemon_pb2.ReadJobOutputRequest(job_id="big", max_bytes=1024 * 1024)
    ):
        assert reply.offset == total
        total += len(reply.data)
    assert total == size
    assert me.memory_info().rss - before < 32 * 1024 * 1024


async def test_retention_removes_only_old_settled_job_dirs(tmp_path: Path) -> None:
    """Past keep_days a finished job whose final state the manager acknowledged is deleted;
    one the manager has not acknowledged is kept, and so is a recent one."""
    clock = ManualClock(time.time())
    engine = JobEngine(JobsConfig(keep_days=1.0), root=tmp_path / "jobs", clock=clock)
    await engine.start()
    try:
        for job_id in ("acked", "unacked", "recent"):
            await engine.submit(start_req(job_id, step("true")))
        for job_id in ("acked", "unacked", "recent"):
            await eventually(lambda j=job_id: asyncio.sleep(0, engine.record(j)), _final)
        await eventually(  # each job's driver task has returned
            lambda: asyncio.sleep(0, engine.jobs()), lambda jobs: all(j.task is None for j in jobs)
        )
        engine.acknowledge("acked", engine.record("acked").version)
        recent = engine.record("recent")
        recent.ended_at = clock.now() + 2 * 86400  # it will have ended just now
        engine.store.save(recent)
        engine.acknowledge("recent", recent.version)
        assert await engine.sweep() == []  # nothing is old yet
        # Two days on, the hourly retention loop wakes and sweeps (a second sweep
        # called here would race it for the same directory).
        clock.advance(2 * 86400)
        await eventually(
            lambda: asyncio.to_thread(engine.store.job_ids),
            lambda ids: ids == ["recent", "unacked"],
        )
        assert await engine.sweep() == []  # what is kept stays kept
        with pytest.raises(NotFound):
            engine.record("acked")
    finally:
        await engine.stop()


def _final(record: JobRecord) -> bool:
    return record.final


def test_status_request_carries_the_record() -> None:
    """ReportJobStatus holds the target's and each step's state, codes and times in ms."""
    record = JobRecord(
        job_id="j",
        lock="",
        timeout=10,
        created_at=1.0,
        steps=[StepRecord("a", "on_success", "FAILED", 3, 2.0, 3.5, "exit code 3")],
        state="FAILED",
        started_at=2.0,
        ended_at=3.5,
        exit_code=3,
        reason="exit code 3",
    )
    req = status_request("n1", Job(start_req("j", step("x")), record, 1), 42)
    assert (req.node_id, req.job_id, req.state) == ("n1", "j", T.JOB_TARGET_STATE_FAILED)
    assert (req.exit_code, req.started_at, req.ended_at, req.output_bytes) == (3, 2000, 3500, 42)
    assert req.steps[0].state == T.JOB_TARGET_STATE_FAILED
    assert (req.steps[0].name, req.steps[0].exit_code, req.steps[0].reason) == (
        "a",
        3,
        "exit code 3",
    )
