"""Jobs end to end with real fleet-daemon processes running real commands (issue 14).

One manager per module (an in-process ManagerServer over mTLS on SQLite, on
the real clock, whose sweeper marks a silent node offline within seconds)
and four `fleet-daemon` processes registered with it; every job's command
is a real process group on the host. Each test runs its own jobs, so the
daemons are shared; a test that stops a daemon gets it back afterwards.
Results are read the way an operator reads them (FleetService: GetJob,
ReadJobOutput, GetNode) and checked against the process table.

    n1  env=prod role=web   [jobs] max_concurrent = 4
    n2  env=prod role=web   [jobs] max_concurrent = 4
    n3  env=prod role=web   [jobs] max_concurrent = 4   (stopped by the offline tests)
    n4  env=prod role=db    [jobs] enabled = false
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import pytest_asyncio
from fleet_harness import FAST_POOL, operator_stub, selector
from manager_harness import manager_config
from module_pki import ModulePki

from fleet.pki import CertificateAuthority
from fleet.tls import TLSConfig
from fleet.v1 import common_pb2, fleet_pb2, fleet_pb2_grpc, jobs_pb2
from manager.server import ManagerServer

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
DAEMON = [sys.executable, "-m", "daemon.cli"]
SH = shutil.which("sh") or "/bin/sh"
SLEEP = shutil.which("sleep") or "/bin/sleep"
TRUE = shutil.which("true") or "/bin/true"
FALSE = shutil.which("false") or "/bin/false"
ONLINE = common_pb2.NODE_STATUS_ONLINE
OFFLINE = common_pb2.NODE_STATUS_OFFLINE
NODES = {
    "n1": {"env": "prod", "role": "web"},
    "n2": {"env": "prod", "role": "web"},
    "n3": {"env": "prod", "role": "web"},
    "n4": {"env": "prod", "role": "db"},
}
DISABLED = "n4"
"""The host whose daemon.toml says `[jobs] enabled = false`."""
WITHIN = 60.0
"""Generous: four daemons, their jobs and the manager share two loaded cores."""
J = jobs_pb2.JobTargetState
ENDED = {
    jobs_pb2.JOB_STATE_SUCCESS,
    jobs_pb2.JOB_STATE_FAILED,
    jobs_pb2.JOB_STATE_PARTIAL,
    jobs_pb2.JOB_STATE_CANCELLED,
}


# --- the fleet ------------------------------------------------------------------------------------


@dataclass
class Daemon:
    """A `fleet-daemon` process on its own config; restartable."""

    node_id: str
    root: Path
    port: int
    popen: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        return self.root / "daemon.toml"

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("NOTIFY_SOCKET", None)
        with open(self.root / "daemon.err", "ab") as err:
            self.popen = subprocess.Popen(
                [*DAEMON, "--config", str(self.config)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def terminate(self) -> None:
        """SIGTERM; SIGKILL if it hangs."""
        if not self.running:
            return
        assert self.popen is not None
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


@dataclass
class Fleet:
    """The module's manager, daemons and an operator's stub."""

    manager: ManagerServer
    daemons: dict[str, Daemon]
    stub: fleet_pb2_grpc.FleetServiceStub

    async def run(self, *argv: str, **spec: Any) -> str:
        """RunJob of `argv` (or `steps=[...]`) on `nodes=[...]` or `sel="..."`; its id."""
        nodes = spec.pop("nodes", None)
        sel = spec.pop("sel", None)
        job_steps = spec.pop("steps", None) or [step(*argv, **spec.pop("command", {}))]
        js = jobs_pb2.JobSpec(steps=job_steps, **spec)
        if nodes is not None:
            js.node_ids.extend(nodes)
        else:
            js.selector.CopyFrom(selector(sel))
        reply = await self.stub.RunJob(fleet_pb2.FleetServiceRunJobRequest(spec=js), timeout=30)
        assert reply.job.id
        return reply.job.id

    async def job(self, job_id: str) -> jobs_pb2.Job:
        reply = await self.stub.GetJob(fleet_pb2.FleetServiceGetJobRequest(job_id=job_id))
        return reply.job

    async def ended(self, job_id: str, within: float = WITHIN) -> jobs_pb2.Job:
        """The job once it ended (ended_at set, a final state)."""
        return await until(
            lambda: self.job(job_id),
            lambda j: j.ended_at > 0 and j.state in ENDED,
            within=within,
        )

    async def target(
        self, job_id: str, node_id: str, ok: Callable[[jobs_pb2.JobTarget], bool]
    ) -> jobs_pb2.JobTarget:
        """Wait until that target satisfies `ok`."""

        async def probe() -> jobs_pb2.JobTarget:
            return targets(await self.job(job_id))[node_id]

        return await until(probe, ok)

    async def output(self, job_id: str, node_id: str) -> str:
        """The target's output as stored by the manager."""
        request = fleet_pb2.FleetServiceReadJobOutputRequest(job_id=job_id, node_id=node_id)
        data = b"".join([m.data async for m in self.stub.ReadJobOutput(request, timeout=30)])
        return data.decode(errors="replace")

    async def node(self, node_id: str) -> fleet_pb2.Node:
        reply = await self.stub.GetNode(fleet_pb2.FleetServiceGetNodeRequest(node_id=node_id))
        return reply.node

    async def statuses(self) -> dict[str, int]:
        reply = await self.stub.ListNodes(fleet_pb2.FleetServiceListNodesRequest())
        return {n.node_id: n.status for n in reply.nodes}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _daemon_toml(d: Daemon, tls: TLSConfig, manager_port: int, labels: dict[str, str]) -> str:
    jobs = (
        "enabled = false\n"
        if d.node_id == DISABLED
        else "max_concurrent = 4\ngrace_seconds = 1.0\n"
    )
    label_lines = "".join(f'{k} = "{v}"\n' for k, v in labels.items())
    return f"""
listen = "127.0.0.1:{d.port}"
state_dir = "{d.root}/state"
run_dir = "{d.root}/run"
log_dir = "{d.root}/log"
metrics_listen = ""
sample_interval_seconds = 2.0
stop_agents_on_exit = true
shutdown_grace_seconds = 5.0
[tls]
ca_file = "{tls.ca_file}"
cert_file = "{tls.cert_file}"
key_file = "{tls.key_file}"
[manager]
addresses = ["127.0.0.1:{manager_port}"]
metrics_interval_seconds = 5.0
rpc_timeout_seconds = 10.0
reconnect = {{ initial = 0.2, maximum = 1.0 }}
[jobs]
{jobs}
[labels]
{label_lines}
"""


@contextlib.contextmanager
def _short_dirs() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: not under pytest's tmp_path.
    path = Path(tempfile.mkdtemp(prefix="fl-jobs-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fleet]:
    """The manager and four registered daemons, shared by the module's tests."""
    pki = ModulePki(CertificateAuthority.create(), tmp_path_factory.mktemp("pki"))
    state = tmp_path_factory.mktemp("manager")
    config = manager_config(
        pki,
        f"sqlite+aiosqlite:///{state / 'manager.db'}",
        state / "state",
        # A daemon silent for ttl (1 s) + grace (2 s) is offline, checked twice a second.
        liveness={
            "min_ttl_seconds": 1.0,
            "jitter": 0.0,
            "grace_seconds": 2.0,
            "failover_grace_seconds": 0.0,
            "sweep_interval_seconds": 0.5,
        },
    )
    manager = ManagerServer(dataclasses.replace(config, pool=FAST_POOL), clock=time.time)
    await manager.start()
    with _short_dirs() as root:
        daemons: dict[str, Daemon] = {}
        try:
            for node_id, labels in NODES.items():
                d = Daemon(node_id, root / node_id, _free_port())
                d.root.mkdir()
                d.config.write_text(
                    _daemon_toml(d, pki.issue("node", node_id), manager.port, labels)
                )
                daemons[node_id] = d
                d.start()
            async with operator_stub(pki, manager.port) as stub:
                fleet = Fleet(manager, daemons, stub)
                await until(fleet.statuses, lambda s: _all_online(s))
                yield fleet
        finally:
            for d in daemons.values():
                await asyncio.to_thread(d.terminate)
            # Jobs outlive their daemon on purpose (re-adopted on its restart).
            for p in _stray_jobs(root):
                with contextlib.suppress(psutil.Error):
                    p.kill()
            await manager.stop(2.0)


def _stray_jobs(root: Path) -> list[psutil.Process]:
    """Job processes of our daemons still alive (their cwd is a job dir under `root`)."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.cwd().startswith(str(root)):
                found.append(p)
    return found


def _all_online(statuses: dict[str, int]) -> bool:
    return all(statuses.get(n) == ONLINE for n in NODES)


@pytest_asyncio.fixture(loop_scope="module")
async def env(fleet: Fleet) -> AsyncIterator[Fleet]:
    """The shared fleet; every daemon is running and online again afterwards."""
    yield fleet
    for d in fleet.daemons.values():
        if not d.running:
            d.start()
    await until(fleet.statuses, _all_online)


# --- helpers ------------------------------------------------------------------------------------


async def until(probe: Callable[[], Any], ok: Callable[[T], bool], within: float = WITHIN) -> T:
    """Await `probe()` until `ok(value)`, polling; the last value fails the test otherwise."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if ok(value):
            return value  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {within}s; last: {value!r}")
        await asyncio.sleep(0.2)


def step(*argv: str, name: str = "", when: int = 0, **command: Any) -> jobs_pb2.JobStep:
    """One step running argv (or command=dict(script=..., interpreter=[...]))."""
    return jobs_pb2.JobStep(name=name, command=jobs_pb2.JobCommand(argv=argv, **command), when=when)


def targets(job: jobs_pb2.Job) -> dict[str, jobs_pb2.JobTarget]:
    return {t.node_id: t for t in job.targets}


def name(s: int) -> str:
    return J.Name(s).removeprefix("JOB_TARGET_STATE_")  # type: ignore[arg-type]


def states(job: jobs_pb2.Job) -> dict[str, str]:
    """node -> its target's state name."""
    return {t.node_id: name(t.state) for t in job.targets}


def job_state(job: jobs_pb2.Job) -> str:
    return jobs_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")


def marked(marker: str) -> list[psutil.Process]:
    """Live processes with `marker` among their argv (a step's and its wrapper's)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if marker in (p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def overlap(a: jobs_pb2.JobTarget, b: jobs_pb2.JobTarget) -> bool:
    """Whether the two targets' run times (daemon clock, ms) overlap."""
    return a.started_at < b.ended_at and b.started_at < a.ended_at


# --- the acceptance behaviours -----------------------------------------------------------------


async def test_a_command_succeeds_everywhere_with_its_output_stored(env: Fleet) -> None:
    """role=web: n1-n3 run the command; each target SUCCESS exit 0 with its stdout and
    stderr stored; the job SUCCESS; n4 (role=db) is no target."""
    job_id = await env.run(SH, "-c", "echo out-$((6 * 7)); echo err-output >&2", sel="role=web")
    job = await env.ended(job_id)
    assert job_state(job) == "SUCCESS", job
    assert states(job) == {"n1": "SUCCESS", "n2": "SUCCESS", "n3": "SUCCESS"}
    for node_id, t in targets(job).items():
        assert t.exit_code == 0
        assert 0 < t.started_at <= t.ended_at
        out = await env.output(job_id, node_id)
        assert "out-42\n" in out
        assert "err-output\n" in out
        assert t.output_stored_bytes == t.output_bytes == len(out.encode())
        assert not t.output_truncated
    assert job.actor == "operator/alice"


async def test_a_failing_command_is_failed_with_its_exit_code(env: Fleet) -> None:
    """exit 3 on n1: the target FAILED with exit code 3, the job FAILED."""
    job = await env.ended(await env.run(SH, "-c", "exit 3", nodes=["n1"]))
    (t,) = job.targets
    assert (name(t.state), t.exit_code) == ("FAILED", 3)
    assert job_state(job) == "FAILED"


async def test_a_timeout_stops_the_whole_process_group(env: Fleet) -> None:
    """A script (run by its interpreter) starting a grandchild, timeout 2 s: TIMEOUT, and
    neither the script's process nor the grandchild survives."""
    script = f"{SLEEP} 1001.25 &\necho grandchild $!\n{SLEEP} 1001.5\n"
    t0 = time.monotonic()
    job_id = await env.run(
        nodes=["n1"],
        steps=[step(script=script, interpreter=[SH])],
        timeout_seconds=2.0,
    )
    job = await env.ended(job_id)
    (t,) = job.targets
    assert name(t.state) == "TIMEOUT", t
    assert time.monotonic() - t0 < 30
    found = re.search(r"grandchild (\d+)", await env.output(job_id, "n1"))
    assert found, "the script ran and printed its grandchild's pid"
    await until(lambda: asyncio.sleep(0, alive(int(found[1]))), lambda up: not up, within=10)
    assert not marked("1001.25")
    assert not marked("1001.5")


async def test_cancel_stops_a_running_job(env: Fleet) -> None:
    """CancelJob of a running `sleep`: CANCELLED, the process gone, the job CANCELLED."""
    job_id = await env.run(SLEEP, "1002.5", nodes=["n1"])
    await env.target(job_id, "n1", lambda t: t.state == J.JOB_TARGET_STATE_RUNNING)
    await until(lambda: asyncio.sleep(0, marked("1002.5")), lambda p: len(p) > 0)
    await env.stub.CancelJob(fleet_pb2.FleetServiceCancelJobRequest(job_id=job_id))
    job = await env.ended(job_id, within=30)
    assert states(job) == {"n1": "CANCELLED"}
    assert job_state(job) == "CANCELLED"
    await until(lambda: asyncio.sleep(0, marked("1002.5")), lambda p: not p, within=10)


async def test_cancel_of_queued_targets_never_runs_them(env: Fleet) -> None:
    """A job queued on n2 behind its lock, and one waiting for the window on the manager:
    cancelled, neither ever starts; the running ones are stopped."""
    holder = await env.run(SLEEP, "1003.5", nodes=["n2"], lock="q")
    await env.target(holder, "n2", lambda t: t.state == J.JOB_TARGET_STATE_RUNNING)
    queued = await env.run(SH, "-c", "echo ran > /dev/null; sleep 1003.75", nodes=["n2"], lock="q")
    await env.target(queued, "n2", lambda t: t.state == J.JOB_TARGET_STATE_QUEUED)
    windowed = await env.run(SLEEP, "1003.25", nodes=["n1", "n3"], max_concurrency="1")

    async def windowed_states() -> list[str]:
        return sorted(states(await env.job(windowed)).values())

    await until(windowed_states, lambda s: s == ["PENDING", "RUNNING"])
    for job_id in (queued, windowed, holder):
        await env.stub.CancelJob(fleet_pb2.FleetServiceCancelJobRequest(job_id=job_id))
    q = await env.ended(queued, within=30)
    (t,) = q.targets
    assert name(t.state) == "CANCELLED"
    assert t.started_at == 0, "the queued target never started"
    w = await env.ended(windowed, within=30)
    assert sorted(states(w).values()) == ["CANCELLED", "CANCELLED"]
    never = [t for t in w.targets if t.started_at == 0]
    assert len(never) == 1, "the target waiting for the window was never sent"
    assert states(await env.ended(holder, within=30)) == {"n2": "CANCELLED"}
    for marker in ("1003.25", "1003.5", "1003.75"):
        await until(lambda m=marker: asyncio.sleep(0, marked(m)), lambda p: not p, within=10)


async def test_max_errors_skips_the_targets_not_launched(env: Fleet) -> None:
    """`false` on n1-n3 one at a time with max_errors 1: one FAILED, the other two SKIPPED
    with the reason, never launched."""
    job = await env.ended(await env.run(FALSE, sel="role=web", max_concurrency="1", max_errors=1))
    by_state = sorted(states(job).values())
    assert by_state == ["FAILED", "SKIPPED", "SKIPPED"], states(job)
    for t in job.targets:
        if t.state == J.JOB_TARGET_STATE_SKIPPED:
            assert "max_errors" in t.reason, t.reason
            assert t.started_at == 0
    assert job_state(job) == "FAILED"


async def test_a_failed_canary_stage_skips_the_rest(env: Fleet) -> None:
    """canary 1 with `false`: the canary target FAILED (stage 0), the others SKIPPED
    (stage 1) naming the canary, never launched."""
    job = await env.ended(await env.run(FALSE, sel="role=web", canary=1))
    stage0 = [t for t in job.targets if t.stage == 0]
    stage1 = [t for t in job.targets if t.stage == 1]
    assert [name(t.state) for t in stage0] == ["FAILED"]
    assert sorted(name(t.state) for t in stage1) == ["SKIPPED", "SKIPPED"]
    for t in stage1:
        assert "canary" in t.reason, t.reason
        assert stage0[0].node_id in t.reason, t.reason
        assert t.started_at == 0


async def test_a_successful_canary_stage_runs_before_the_rest(env: Fleet) -> None:
    """canary 1: every target SUCCESS, and the rest started only after the canary ended."""
    job = await env.ended(await env.run(SLEEP, "0.5", sel="role=web", canary=1))
    assert job_state(job) == "SUCCESS", states(job)
    (canary,) = [t for t in job.targets if t.stage == 0]
    rest = [t for t in job.targets if t.stage == 1]
    assert len(rest) == 2
    assert all(t.started_at >= canary.ended_at for t in rest), (canary, rest)


async def _stop_and_wait_offline(env: Fleet, node_id: str) -> None:
    await asyncio.to_thread(env.daemons[node_id].terminate)
    await until(env.statuses, lambda s: s.get(node_id) == OFFLINE)


async def test_an_offline_node_is_undeliverable_and_does_not_count_as_an_error(
    env: Fleet,
) -> None:
    """n3 offline; a job on n3, n1, n2 one at a time with max_errors 1 and a 2 s delivery
    timeout (each target takes 2.5 s): n3 UNDELIVERABLE saying it does not count, and the
    targets launched after that still run."""
    await _stop_and_wait_offline(env, "n3")
    job_id = await env.run(
        SLEEP,
        "2.5",
        nodes=["n3", "n1", "n2"],
        max_concurrency="1",
        max_errors=1,
        delivery_timeout_seconds=2.0,
    )
    job = await env.ended(job_id)
    t = targets(job)
    assert states(job) == {"n1": "SUCCESS", "n2": "SUCCESS", "n3": "UNDELIVERABLE"}, job
    assert "max_errors" in t["n3"].reason, t["n3"].reason
    assert t["n3"].started_at == 0
    # The undeliverable verdict came while the first target ran, before the second one.
    assert max(t["n1"].started_at, t["n2"].started_at) > job.created_at + 2000
    assert job_state(job) == "PARTIAL"


async def test_an_offline_node_that_comes_back_in_time_runs_the_job(env: Fleet) -> None:
    """n3 offline when the job starts (delivery timeout 60 s): PENDING; its daemon back,
    the job runs there."""
    await _stop_and_wait_offline(env, "n3")
    job_id = await env.run(SH, "-c", "echo back-in-time", nodes=["n3"], delivery_timeout_seconds=60)
    await asyncio.sleep(1.5)
    pending = await env.job(job_id)
    assert states(pending) == {"n3": "PENDING"}
    env.daemons["n3"].start()
    job = await env.ended(job_id)
    assert states(job) == {"n3": "SUCCESS"}
    assert "back-in-time" in await env.output(job_id, "n3")


async def test_jobs_holding_the_same_lock_never_overlap_on_a_node(env: Fleet) -> None:
    """Two jobs with lock "apt" on n1 at once run one after the other; two without a lock
    (the control: n1 runs up to 4 jobs at once) overlap."""

    async def pair(**spec: Any) -> tuple[jobs_pb2.JobTarget, jobs_pb2.JobTarget]:
        ids = await asyncio.gather(*(env.run(SLEEP, "1.5", nodes=["n1"], **spec) for _ in "ab"))
        a, b = [await env.ended(i) for i in ids]
        assert states(a) == states(b) == {"n1": "SUCCESS"}
        return a.targets[0], b.targets[0]

    locked = await pair(lock="apt")
    assert not overlap(*locked), locked
    free = await pair()
    assert overlap(*free), free


async def test_a_host_with_jobs_disabled_refuses_with_the_reason(env: Fleet) -> None:
    """n4's daemon.toml turns jobs off: its target FAILED saying so, nothing ran; the node
    shows jobs_disabled (n1 does not)."""
    job_id = await env.run(SH, "-c", "echo must-not-run", nodes=[DISABLED, "n1"])
    job = await env.ended(job_id)
    t = targets(job)
    assert name(t[DISABLED].state) == "FAILED"
    assert "enabled" in t[DISABLED].reason, t[DISABLED].reason
    assert "must-not-run" not in await env.output(job_id, DISABLED)
    assert name(t["n1"].state) == "SUCCESS"
    assert job_state(job) == "PARTIAL"
    assert (await env.node(DISABLED)).jobs_disabled
    assert not (await env.node("n1")).jobs_disabled


async def test_steps_run_by_their_when(env: Fleet) -> None:
    """Steps false / on_failure / on_success / always: the failure handler and `always` run,
    the on_success step is skipped; the target FAILED with the failing step's exit code."""
    steps = [
        step(FALSE, name="break"),
        step(SH, "-c", "echo on-failure-ran", name="repair", when=jobs_pb2.STEP_WHEN_ON_FAILURE),
        step(SH, "-c", "echo must-not-run", name="deploy", when=jobs_pb2.STEP_WHEN_ON_SUCCESS),
        step(SH, "-c", "echo always-ran", name="report", when=jobs_pb2.STEP_WHEN_ALWAYS),
    ]
    job_id = await env.run(nodes=["n1"], steps=steps)
    job = await env.ended(job_id)
    (t,) = job.targets
    assert (name(t.state), t.exit_code) == ("FAILED", 1)
    got = [(s.name, name(s.state)) for s in sorted(t.steps, key=lambda s: s.index)]
    assert got == [
        ("break", "FAILED"),
        ("repair", "SUCCESS"),
        ("deploy", "SKIPPED"),
        ("report", "SUCCESS"),
    ]
    out = await env.output(job_id, "n1")
    assert "on-failure-ran" in out
    assert "always-ran" in out
    assert "must-not-run" not in out

    ok_steps = [
        step(TRUE, name="a"),
        step(SH, "-c", "echo repair", name="b", when=jobs_pb2.STEP_WHEN_ON_FAILURE),
        step(SH, "-c", "echo second", name="c"),
    ]
    ok = await env.ended(await env.run(nodes=["n1"], steps=ok_steps))
    (t,) = ok.targets
    assert name(t.state) == "SUCCESS"
    got = [(s.name, name(s.state)) for s in sorted(t.steps, key=lambda s: s.index)]
    assert got == [("a", "SUCCESS"), ("b", "SKIPPED"), ("c", "SUCCESS")]


async def test_an_unknown_user_fails_the_target_with_the_reason(env: Fleet) -> None:
    """user = a name the host does not have: FAILED naming the user; nothing ran."""
    job_id = await env.run(
        SH, "-c", "echo must-not-run", nodes=["n1"], command={"user": "fleet-no-such-user"}
    )
    job = await env.ended(job_id)
    (t,) = job.targets
    assert name(t.state) == "FAILED"
    assert "fleet-no-such-user" in t.reason or any(
        "fleet-no-such-user" in s.reason for s in t.steps
    ), t
    assert "must-not-run" not in await env.output(job_id, "n1")
