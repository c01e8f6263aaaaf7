"""Desired state end to end with real fleet-daemon processes and real agents (issue 13).

One manager per module (an in-process ManagerServer over mTLS on SQLite, on
the real clock, whose sweeper marks a silent node offline within seconds)
and four `fleet-daemon` processes registered with it, whose agents are real
child processes: `sleep`, `false`, and the bundled `fleet-agent run probe`
with the SDK heartbeat health check. Each test uses its own definition name
and deletes it at the end, so the daemons are shared. Results are checked
on both sides: the manager's FleetService, and each daemon's own
DaemonService.ListAgents and the process table.

    n1  env=prod role=web
    n2  env=prod role=web
    n3  env=prod role=web   its daemon.toml defines agent "t-own"
    n4  env=prod role=db
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import pytest_asyncio
from daemon_helpers import client_channel
from fleet_harness import FAST_POOL, operator_stub, selector
from grpc import aio
from manager_harness import manager_config
from module_pki import ModulePki

from daemon.supervisor.spec import AgentSpec, HealthSpec
from fleet.agentspec import spec_to_proto
from fleet.pki import CertificateAuthority
from fleet.tls import TLSConfig
from fleet.v1 import (
    common_pb2,
    daemon_pb2,
    daemon_pb2_grpc,
    desired_pb2,
    fleet_pb2,
    fleet_pb2_grpc,
)
from manager.server import ManagerServer

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
DAEMON = [sys.executable, "-m", "daemon.cli"]
SLEEP = shutil.which("sleep") or "/bin/sleep"
FALSE = shutil.which("false") or "/bin/false"
FLEET_AGENT = str(Path(sys.executable).parent / "fleet-agent")
RUNNING = common_pb2.AGENT_STATUS_RUNNING
HEALTHY = common_pb2.AGENT_HEALTH_HEALTHY
OFFLINE = common_pb2.NODE_STATUS_OFFLINE
ONLINE = common_pb2.NODE_STATUS_ONLINE
NODES = {
    "n1": {"env": "prod", "role": "web"},
    "n2": {"env": "prod", "role": "web"},
    "n3": {"env": "prod", "role": "web"},
    "n4": {"env": "prod", "role": "db"},
}
HOST_AGENT = "t-own"
"""The agent n3's own daemon.toml defines (a definition of that name collides there)."""
WITHIN = 90.0
"""Generous: four daemons, their agents and the manager share two loaded cores."""


# --- the fleet ------------------------------------------------------------------------------------


@dataclass
class Daemon:
    """A `fleet-daemon` process on its own config; restartable (kill -9 keeps its agents)."""

    node_id: str
    root: Path
    port: int
    popen: subprocess.Popen[bytes] | None = None
    stub: daemon_pb2_grpc.DaemonServiceStub | None = None

    @property
    def config(self) -> Path:
        return self.root / "daemon.toml"

    @property
    def socket_path(self) -> str:
        return str(self.root / "run" / "agent.sock")

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

    def kill9(self) -> None:
        assert self.popen is not None
        self.popen.kill()
        self.popen.wait(30)

    def terminate(self) -> None:
        """SIGTERM (stop_agents_on_exit: its agents stop too); SIGKILL if it hangs."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    async def agents(self) -> dict[str, common_pb2.AgentInfo] | None:
        """The daemon's own view, by agent id; None while it does not answer."""
        assert self.stub is not None
        try:
            reply = await self.stub.ListAgents(daemon_pb2.ListAgentsRequest(), timeout=5)
        except aio.AioRpcError:
            return None
        return {a.id: a for a in reply.agents}


@dataclass
class Fleet:
    """The module's manager, daemons and an operator's stub."""

    manager: ManagerServer
    daemons: dict[str, Daemon]
    stub: fleet_pb2_grpc.FleetServiceStub
    names: list[str] = field(default_factory=list)
    """Definitions the tests applied (deleted after each test)."""

    async def apply(self, definition: desired_pb2.Definition, message: str = "") -> Any:
        self.names.append(definition.name)
        reply = await self.stub.ApplyDefinitions(
            fleet_pb2.FleetServiceApplyDefinitionsRequest(
                definitions=[definition], message=message
            ),
            timeout=30,
        )
        (change,) = reply.changes
        return change

    async def rollout(self, name: str) -> desired_pb2.Rollout:
        reply = await self.stub.GetRollout(
            fleet_pb2.FleetServiceGetRolloutRequest(name=name), timeout=10
        )
        return reply.rollout

    async def node(self, node_id: str) -> fleet_pb2.Node:
        reply = await self.stub.GetNode(
            fleet_pb2.FleetServiceGetNodeRequest(node_id=node_id), timeout=10
        )
        return reply.node

    async def running(self, name: str) -> dict[str, tuple[int, int]]:
        """node -> (revision, pid) of agent `name` RUNNING there, from each daemon itself."""
        out = {}
        for node_id, daemon in self.daemons.items():
            agents = await daemon.agents()
            info = (agents or {}).get(name)
            if info is not None and info.status == RUNNING and info.pid:
                out[node_id] = (info.revision, info.pid)
        return out

    async def events(self, name: str, *kinds: int) -> list[fleet_pb2.Event]:
        """The stored events of these kinds about definition `name`, oldest first."""
        request = fleet_pb2.FleetServiceWatchEventsRequest(kinds=list(kinds))
        return [
            m.event
            async for m in self.stub.WatchEvents(request, timeout=30)
            if m.event.attributes.get("name") == name
        ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _daemon_toml(d: Daemon, tls: TLSConfig, manager_port: int, labels: dict[str, str]) -> str:
    own = (
        f'[[agents]]\nid = "{HOST_AGENT}"\nargv = ["{SLEEP}", "1078"]\n'
        "start_secs = 0.2\nstop_timeout = 2.0\n"
        if d.node_id == "n3"
        else ""
    )
    label_lines = "".join(f'{k} = "{v}"\n' for k, v in labels.items())
    return f"""
listen = "127.0.0.1:{d.port}"
state_dir = "{d.root}/state"
run_dir = "{d.root}/run"
log_dir = "{d.root}/log"
metrics_listen = ""
sample_interval_seconds = 2.0
agent_heartbeat_interval_seconds = 0.5
stop_agents_on_exit = true
shutdown_grace_seconds = 5.0
[tls]
ca_file = "{tls.ca_file}"
cert_file = "{tls.cert_file}"
key_file = "{tls.key_file}"
[manager]
addresses = ["127.0.0.1:{manager_port}"]
metrics_interval_seconds = 5.0
# State changes sync at once; a periodic sync must not hide a stale view.
sync_interval_seconds = 300.0
rpc_timeout_seconds = 10.0
reconnect = {{ initial = 0.2, maximum = 1.0 }}
[labels]
{label_lines}
{own}"""


def _stray_agents(daemons: dict[str, Daemon]) -> list[psutil.Process]:
    """Agents of our daemons still alive (a kill -9 leaves them running on purpose)."""
    sockets = {d.socket_path for d in daemons.values()}
    out = []
    for p in psutil.process_iter(["environ"]):
        with contextlib.suppress(psutil.Error):
            if (p.info["environ"] or {}).get("FLEET_DAEMON_SOCKET") in sockets:
                out.append(p)
    return out


@contextlib.contextmanager
def _short_dirs() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: not under pytest's tmp_path.
    path = Path(tempfile.mkdtemp(prefix="fl-ds-", dir="/tmp"))
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
        # A daemon silent for ttl (1 s) + grace (3 s) is offline, checked twice a second.
        liveness={
            "min_ttl_seconds": 1.0,
            "jitter": 0.0,
            "grace_seconds": 3.0,
            "failover_grace_seconds": 0.0,
            "sweep_interval_seconds": 0.5,
        },
    )
    manager = ManagerServer(dataclasses.replace(config, pool=FAST_POOL), clock=time.time)
    await manager.start()
    with _short_dirs() as root, contextlib.ExitStack() as stack:
        daemons: dict[str, Daemon] = {}
        channels: list[aio.Channel] = []
        try:
            client = pki.issue("manager", "m-test")
            for node_id, labels in NODES.items():
                d = Daemon(node_id, root / node_id, _free_port())
                d.root.mkdir()
                d.config.write_text(
                    _daemon_toml(d, pki.issue("node", node_id), manager.port, labels)
                )
                channel = client_channel(client, d.port, node_id, pki.trust_domain)
                channels.append(channel)
                d.stub = daemon_pb2_grpc.DaemonServiceStub(channel)
                daemons[node_id] = d
                stack.callback(d.terminate)
                d.start()
            async with operator_stub(pki, manager.port) as stub:
                fleet = Fleet(manager, daemons, stub)

                async def online() -> set[str]:
                    reply = await stub.ListNodes(fleet_pb2.FleetServiceListNodesRequest())
                    return {n.node_id for n in reply.nodes if n.status == ONLINE}

                await until(online, lambda up: up == set(NODES), within=WITHIN)
                yield fleet
        finally:
            for d in daemons.values():
                await asyncio.to_thread(d.terminate)
            for p in _stray_agents(daemons):
                with contextlib.suppress(psutil.Error):
                    p.kill()
            for channel in channels:
                await channel.close(None)
            await manager.stop(2.0)


@pytest_asyncio.fixture(loop_scope="module")
async def env(fleet: Fleet) -> AsyncIterator[Fleet]:
    """The shared fleet; the definitions a test applied are deleted (their agents removed)
    and every daemon is running again afterwards."""
    yield fleet
    for d in fleet.daemons.values():
        if d.popen is None or d.popen.poll() is not None:
            d.start()
    for name in set(fleet.names):
        with contextlib.suppress(aio.AioRpcError):
            await fleet.stub.DeleteDefinition(
                fleet_pb2.FleetServiceDeleteDefinitionRequest(name=name), timeout=30
            )
    names = set(fleet.names)
    fleet.names.clear()

    async def leftovers() -> set[str]:
        """Pushed agents of those definitions still on a daemon ("?": a daemon not answering)."""
        found = set()
        for d in fleet.daemons.values():
            agents = await d.agents()
            if agents is None:
                found.add(f"{d.node_id}?")
                continue
            found |= {f"{d.node_id}/{a}" for a, i in agents.items() if a in names and i.revision}
        return found

    await until(leftovers, lambda left: not left, within=WITHIN)


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


def state(r: desired_pb2.Rollout) -> str:
    return desired_pb2.RolloutState.Name(r.state).removeprefix("ROLLOUT_STATE_")


def phase(n: desired_pb2.RolloutNode) -> str:
    return desired_pb2.RolloutNodePhase.Name(n.phase).removeprefix("ROLLOUT_NODE_PHASE_")


def ended(r: desired_pb2.Rollout) -> bool:
    return r.ended_at > 0


def sleeper(version: str = "1", seconds: str = "1000") -> AgentSpec:
    """A plain agent: healthy while RUNNING (no health check)."""
    return AgentSpec(
        id="x", argv=(SLEEP, seconds), version=version, start_secs=0.5, stop_timeout=2.0
    )


def probe(version: str = "1") -> AgentSpec:
    """`fleet-agent run probe` with the SDK heartbeat check: healthy once it heartbeats."""
    return AgentSpec(
        id="x",
        argv=(FLEET_AGENT, "run", "probe"),
        version=version,
        env={"PYTHONPATH": str(REPO)},
        start_secs=0.5,
        stop_timeout=5.0,
        health=HealthSpec(kind="heartbeat", timeout=10.0),
        config='{"targets": [], "interval_seconds": 5}',
    )


def definition(name: str, sel: str, agent: AgentSpec, **update: Any) -> desired_pb2.Definition:
    update.setdefault("min_healthy_time_seconds", 0.0)
    update.setdefault("healthy_deadline_seconds", 60.0)
    update.setdefault("progress_deadline_seconds", 120.0)
    spec = spec_to_proto(dataclasses.replace(agent, id=name))
    return desired_pb2.Definition(
        name=name,
        selector=selector(sel),
        agent=spec,
        update=desired_pb2.UpdatePolicy(**update),
    )


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- the acceptance behaviours -----------------------------------------------------------------


async def test_apply_runs_the_agent_on_every_matching_node(env: Fleet) -> None:
    """role=web: n1-n3 run revision 1 as a live process, n4 runs nothing, no drift;
    deleted, the processes are gone."""
    change = await env.apply(definition("t-apply", "role=web", sleeper()), "first")
    assert (change.revision, change.changed) == (1, True)
    done = await until(lambda: env.rollout("t-apply"), ended)
    assert state(done) == "SUCCESSFUL", done.reason
    assert done.done == 3
    running = await until(lambda: env.running("t-apply"), lambda r: len(r) == 3)
    assert {n: rev for n, (rev, _) in running.items()} == {"n1": 1, "n2": 1, "n3": 1}
    for _, pid in running.values():
        assert psutil.Process(pid).cmdline() == [SLEEP, "1000"]
    assert "t-apply" not in (await env.daemons["n4"].agents() or {})

    async def drifting() -> dict[str, str]:
        reply = await env.stub.ListNodes(fleet_pb2.FleetServiceListNodesRequest())
        return {n.node_id: n.drift_reason for n in reply.nodes if n.drift}

    await until(drifting, lambda d: d == {})

    await env.stub.DeleteDefinition(fleet_pb2.FleetServiceDeleteDefinitionRequest(name="t-apply"))
    await until(lambda: env.running("t-apply"), lambda r: r == {})
    for _, pid in running.values():
        await until(lambda pid=pid: asyncio.sleep(0, alive(pid)), lambda up: not up)


async def test_a_label_change_adds_and_removes_the_agent(env: Fleet) -> None:
    """An operator label brings n4 into the selector: its daemon starts the agent;
    the label removed, the daemon stops it."""
    await env.apply(definition("t-label", "pool=blue", sleeper()))
    done = await until(lambda: env.rollout("t-label"), ended)
    assert state(done) == "SUCCESSFUL"  # no node matched yet
    await env.stub.UpdateNodeLabels(
        fleet_pb2.FleetServiceUpdateNodeLabelsRequest(node_id="n4", set={"pool": "blue"})
    )
    running = await until(lambda: env.running("t-label"), lambda r: "n4" in r)
    assert set(running) == {"n4"}
    revision, pid = running["n4"]
    assert revision == 1
    await env.stub.UpdateNodeLabels(
        fleet_pb2.FleetServiceUpdateNodeLabelsRequest(node_id="n4", remove=["pool"])
    )
    await until(lambda: env.daemons["n4"].agents(), lambda a: a is not None and "t-label" not in a)
    await until(lambda: asyncio.sleep(0, alive(pid)), lambda up: not up)
    assert not (await env.node("n4")).drift


async def test_a_new_revision_rolls_out_in_batches_behind_health(env: Fleet) -> None:
    """Revision 2 of a heartbeat-checked probe on 4 nodes, 2 at a time, min_healthy_time 3 s:
    two batches, and the second batch's processes start only after the first batch's have
    been up and healthy that long."""
    policy = {"max_parallel": "2", "min_healthy_time_seconds": 3.0}
    await env.apply(definition("t-batch", "env=prod", probe("1"), **policy))
    first = await until(lambda: env.rollout("t-batch"), ended, within=120)
    assert state(first) == "SUCCESSFUL", first.reason
    before = await until(lambda: env.running("t-batch"), lambda r: len(r) == 4)

    await env.apply(definition("t-batch", "env=prod", probe("2"), **policy), "2")
    done = await until(lambda: env.rollout("t-batch"), ended, within=120)
    assert state(done) == "SUCCESSFUL", done.reason
    batches: dict[int, list[str]] = {}
    for n in done.nodes:
        batches.setdefault(n.batch, []).append(n.node_id)
    assert sorted(map(sorted, batches.values())) == [["n1", "n2"], ["n3", "n4"]]

    infos = {}
    for node_id, d in env.daemons.items():
        agents = await d.agents()
        assert agents is not None
        info = agents["t-batch"]
        assert (info.revision, info.status, info.health) == (2, RUNNING, HEALTHY), info
        assert info.pid != before[node_id][1], "revision 2 is a new process"
        assert not alive(before[node_id][1])
        infos[node_id] = info
    one, two = (sorted(batches)[0], sorted(batches)[1])
    first_up = max(infos[n].start_time for n in batches[one])
    second_up = min(infos[n].start_time for n in batches[two])
    assert second_up >= first_up + 3000, "batch 2 waited for batch 1's min_healthy_time"
    kinds = [
        e.attributes.get("batch")
        for e in await env.events("t-batch", fleet_pb2.EVENT_KIND_ROLLOUT_BATCH)
        if e.attributes.get("revision") == "2"
    ]
    assert kinds == ["1", "2"]


async def test_an_unhealthy_canary_stops_the_rollout_and_auto_revert_restores(
    env: Fleet,
) -> None:
    """Revision 2 exits at once (`false`) on its canary: the rollout fails there, reverts,
    and the canary runs revision 1 again; the other nodes never stopped their process."""
    await env.apply(definition("t-canary", "env=prod", probe("1")))
    first = await until(lambda: env.rollout("t-canary"), ended, within=120)
    assert state(first) == "SUCCESSFUL", first.reason
    before = await until(lambda: env.running("t-canary"), lambda r: len(r) == 4)

    bad = AgentSpec(
        id="x",
        argv=(FALSE,),
        version="2",
        start_secs=1.0,
        max_retries=1,
        stop_timeout=2.0,
    )
    await env.apply(
        definition(
            "t-canary", "env=prod", bad, canary="1", auto_revert=True, healthy_deadline_seconds=30.0
        )
    )
    done = await until(lambda: env.rollout("t-canary"), ended, within=120)
    assert state(done) == "REVERTED", done.reason
    assert done.reverted_from == 2
    assert "revision 2 failed on n1" in done.reason, done.reason

    after = await until(
        lambda: env.running("t-canary"),
        lambda r: len(r) == 4 and all(rev == 1 for rev, _ in r.values()),
    )
    assert after["n1"][1] != before["n1"][1], "the canary was moved, and moved back"
    for node_id in ("n2", "n3", "n4"):
        assert after[node_id] == before[node_id], f"{node_id} was never touched"
    await until(
        lambda: env.daemons["n1"].agents(),
        lambda a: a is not None and a["t-canary"].health == HEALTHY,
    )
    kinds = [
        fleet_pb2.EventKind.Name(e.kind)
        for e in await env.events(
            "t-canary",
            fleet_pb2.EVENT_KIND_ROLLOUT_FAILED,
            fleet_pb2.EVENT_KIND_ROLLOUT_REVERTING,
            fleet_pb2.EVENT_KIND_ROLLOUT_REVERTED,
        )
    ]
    assert kinds == [
        "EVENT_KIND_ROLLOUT_FAILED",
        "EVENT_KIND_ROLLOUT_REVERTING",
        "EVENT_KIND_ROLLOUT_REVERTED",
    ]
    listed = await env.stub.ListDefinitions(fleet_pb2.FleetServiceListDefinitionsRequest())
    status = next(d for d in listed.definitions if d.current.definition.name == "t-canary")
    # The bad revision stays the definition's current one; the nodes run the stable one.
    assert (status.current.revision, status.stable_revision) == (2, 1)


async def test_a_stuck_rollout_fails_at_its_deadline_loudly(env: Fleet) -> None:
    """An agent that runs but never heartbeats is never healthy: the rollout is FAILED by its
    deadline (not left RUNNING), with an event, and counted on /metrics."""
    stuck = AgentSpec(
        id="x",
        argv=(SLEEP, "1000"),
        start_secs=0.5,
        stop_timeout=2.0,
        health=HealthSpec(kind="heartbeat", timeout=600.0),
    )
    failed_before = await asyncio.to_thread(
        _metric, env.manager, "fleet_manager_rollouts_failed_total"
    )
    await env.apply(
        definition(
            "t-stuck",
            "role=db",
            stuck,
            healthy_deadline_seconds=4.0,
            progress_deadline_seconds=4.0,
        )
    )
    started = time.monotonic()
    done = await until(lambda: env.rollout("t-stuck"), ended)
    assert state(done) == "FAILED", done.reason
    assert time.monotonic() - started < 60
    assert "failed on n4" in done.reason, done.reason
    assert "not healthy within 4s" in done.reason, done.reason
    # The node keeps what it was given (no auto_revert), and its daemon says why it is not done.
    agents = await env.daemons["n4"].agents()
    assert agents is not None
    assert agents["t-stuck"].status == RUNNING
    assert agents["t-stuck"].health != HEALTHY
    (event,) = await env.events("t-stuck", fleet_pb2.EVENT_KIND_ROLLOUT_FAILED)
    assert "not healthy within 4s" in event.message
    assert (
        await asyncio.to_thread(_metric, env.manager, "fleet_manager_rollouts_failed_total")
        == failed_before + 1
    )


async def test_an_offline_node_is_pending_and_converges_when_it_returns(env: Fleet) -> None:
    """n2's daemon killed (-9): a new revision rolls out without waiting for it, listing it
    offline; the daemon back, n2 gets the new revision."""
    await env.apply(definition("t-offline", "env=prod", sleeper("1"), max_parallel="50%"))
    first = await until(lambda: env.rollout("t-offline"), ended)
    assert state(first) == "SUCCESSFUL", first.reason
    before = await until(lambda: env.running("t-offline"), lambda r: len(r) == 4)

    n2 = env.daemons["n2"]
    await asyncio.to_thread(n2.kill9)
    await until(lambda: env.node("n2"), lambda n: n.status == OFFLINE)
    await env.apply(definition("t-offline", "env=prod", sleeper("2"), max_parallel="50%"))
    done = await until(lambda: env.rollout("t-offline"), ended)
    assert state(done) == "SUCCESSFUL", done.reason
    assert "offline node(s) will converge when they return: n2" in done.reason
    (pending,) = [n for n in done.nodes if n.node_id == "n2"]
    assert phase(pending) == "PENDING"
    assert done.offline == 1
    moved = await env.running("t-offline")
    assert {n: rev for n, (rev, _) in moved.items()} == {"n1": 2, "n3": 2, "n4": 2}
    # Its agent outlived the daemon (kill -9), still on revision 1.
    assert alive(before["n2"][1])

    n2.start()
    back = await until(
        lambda: env.running("t-offline"), lambda r: r.get("n2", (0, 0))[0] == 2, within=120
    )
    assert back["n2"][1] != before["n2"][1]
    await until(lambda: asyncio.sleep(0, alive(before["n2"][1])), lambda up: not up)
    await until(lambda: env.node("n2"), lambda n: n.status == ONLINE and not n.drift)


async def test_a_host_agent_of_the_same_name_is_refused_for_that_node(env: Fleet) -> None:
    """n3's daemon.toml defines t-own: pushed in one batch, it runs on n1, n2 and n4, is
    refused on n3 with the reason (which fails the rollout there), and n3's own agent keeps
    running untouched."""
    own = await until(
        lambda: env.daemons["n3"].agents(), lambda a: a is not None and HOST_AGENT in a
    )
    host_pid = own[HOST_AGENT].pid
    assert own[HOST_AGENT].revision == 0
    await env.apply(definition(HOST_AGENT, "env=prod", sleeper("1", "1079"), max_parallel="100%"))
    running = await until(lambda: env.running(HOST_AGENT), lambda r: len(r) == 4)
    assert {n: rev for n, (rev, _) in running.items()} == {"n1": 1, "n2": 1, "n3": 0, "n4": 1}
    assert running["n3"][1] == host_pid
    assert psutil.Process(host_pid).cmdline() == [SLEEP, "1078"]
    n3 = await until(lambda: env.node("n3"), lambda n: bool(n.update_errors))
    assert n3.update_errors[0].agent_id == HOST_AGENT
    assert "daemon.toml" in n3.update_errors[0].reason
    assert n3.drift
    assert HOST_AGENT in n3.drift_reason
    # A refusal is a node that cannot run the revision: the rollout fails, naming it.
    done = await until(lambda: env.rollout(HOST_AGENT), ended)
    assert state(done) == "FAILED", done.reason
    assert "failed on n3" in done.reason, done.reason
    assert "daemon.toml" in done.reason, done.reason
    # Deleted, the pushed copies go; the host's own stays, and n3 is in sync again.
    await env.stub.DeleteDefinition(fleet_pb2.FleetServiceDeleteDefinitionRequest(name=HOST_AGENT))
    await until(lambda: env.running(HOST_AGENT), lambda r: set(r) == {"n3"})
    assert (await env.running(HOST_AGENT))["n3"] == (0, host_pid)
    # The push that removed it says so: the refusal is gone at once, not at the daemon's
    # next periodic sync (5 minutes here).
    await until(lambda: env.node("n3"), lambda n: not n.drift and not n.update_errors, within=30)
    request = fleet_pb2.FleetServiceWatchEventsRequest(
        kinds=[fleet_pb2.EVENT_KIND_NODE_UPDATE_ERROR], node_id="n3"
    )
    said = [m.event.message async for m in env.stub.WatchEvents(request, timeout=30)]
    assert len(said) == 2, said
    assert said[0].startswith(f"n3 cannot run what it was pushed: {HOST_AGENT}: ")
    assert said[1] == "n3 runs everything it was pushed again"


def _metric(manager: ManagerServer, name: str) -> float:
    """A sample's value summed over its labels from the manager's /metrics (0 if absent)."""
    url = f"http://127.0.0.1:{manager.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )
