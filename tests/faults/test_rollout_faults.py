"""A rollout survives its driver: manager kill -9, and a PostgreSQL replica failover.

A real `fleet-manager` process (two on PostgreSQL) drives a rollout to 30
simulated daemons (bench/fleetsim.py with DaemonService ports: the real
ManagerLink reports what each push made them run). The driver is killed
with SIGKILL mid-rollout; the same manager restarted on the
same database (or the other replica) must finish the rollout from the
stored state. The kill lands as the third batch's pushes arrive, before the
manager recorded them delivered: it must push that set again (the daemon
answers "already running it") and not move a node twice. What the daemons received decides:

- every node applied the new revision exactly once (no node updated twice);
- at no time were more than max_parallel nodes in flight: a node counts as
  done only min_healthy_time after it started the revision, so no window
  of that length may hold more than max_parallel applied pushes, and the
  stored batches are 1..6 with 5 nodes each (no batch skipped);
- with two replicas, every push came from the replica holding the
  desired-state lock: all of the victim's pushes before all of the
  survivor's, and `fleet_desired_leader` never 1 on both at once. The
  driver is either killed, or keeps running while PostgreSQL terminates
  the connection that holds its lock (it must stop driving).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from faultkit import ManagerProc, eventually, operator_stub

from bench.fleetsim import FleetSim, SimSettings
from bench.sim import PushCall
from fleet.retry import Backoff
from fleet.v1 import common_pb2, desired_pb2, fleet_pb2, fleet_pb2_grpc
from manager.service.convergence import DESIRED_LOCK
from manager.storage.db import advisory_key

NODES = 30
MAX_PARALLEL = 5
BATCHES = NODES // MAX_PARALLEL
# Long enough that the kill lands between batches on a loaded machine, short enough
# that six batches take ~15 s.
MIN_HEALTHY = 2.0
LIVENESS = (
    "min_ttl_seconds = 2.0\njitter = 0.1\ngrace_seconds = 2.0\n"
    "failover_grace_seconds = 15.0\nsweep_interval_seconds = 0.2\n"
)
NAME = "app"  # the simulated daemons run "web" and "worker" of their own


def _definition(version: str, **update: Any) -> desired_pb2.Definition:
    update.setdefault("healthy_deadline_seconds", 60.0)
    update.setdefault("progress_deadline_seconds", 120.0)
    return desired_pb2.Definition(
        name=NAME,
        selector=common_pb2.LabelSelector(match_labels={"sim": "yes"}),
        agent=common_pb2.AgentSpec(argv=["/usr/bin/app"], version=version),
        update=desired_pb2.UpdatePolicy(**update),
    )


async def _apply(stub: fleet_pb2_grpc.FleetServiceStub, d: desired_pb2.Definition) -> None:
    await stub.ApplyDefinitions(
        fleet_pb2.FleetServiceApplyDefinitionsRequest(definitions=[d]), timeout=30
    )


async def _rollout(stub: fleet_pb2_grpc.FleetServiceStub) -> desired_pb2.Rollout:
    reply = await stub.GetRollout(fleet_pb2.FleetServiceGetRolloutRequest(name=NAME), timeout=10)
    return reply.rollout


def _state(r: desired_pb2.Rollout) -> str:
    return desired_pb2.RolloutState.Name(r.state).removeprefix("ROLLOUT_STATE_")


def _calls(fleet: FleetSim) -> dict[str, list[PushCall]]:
    """node -> the PushUpdate calls its daemon received."""
    out = {}
    for node_id, link in fleet.nodes.items():
        assert link.daemon is not None
        out[node_id] = list(link.daemon.servicer.received)
    return out


def _applied(fleet: FleetSim, revision: int) -> dict[str, list[PushCall]]:
    """node -> the applied pushes that carried `revision` of the definition."""
    return {
        n: [c for c in calls if c.outcome == "applied" and dict(c.agents).get(NAME) == revision]
        for n, calls in _calls(fleet).items()
    }


def _busiest_window(times: Sequence[float], window: float) -> int:
    """The most of `times` inside any half-open window of `window` seconds."""
    ts = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(ts):
        while ts[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


async def _settle_first_revision(stub: fleet_pb2_grpc.FleetServiceStub, fleet: FleetSim) -> None:
    """Revision 1 everywhere at once (not under test), so revision 2 is the rollout."""
    await _apply(stub, _definition("1.0", max_parallel="100%", min_healthy_time_seconds=0.0))
    await eventually(lambda: _rollout(stub), lambda r: _state(r) == "SUCCESSFUL", within=60)
    # A node the manager saw offline a moment does not hold a rollout up; it gets it later.
    await eventually(
        lambda: asyncio.sleep(0, _applied(fleet, 1)),
        lambda applied: all(applied.values()),
        within=60,
    )
    counts = {n: [(c.at, c.caller, c.version) for c in p] for n, p in _applied(fleet, 1).items()}
    assert all(len(p) == 1 for p in counts.values()), {
        n: p for n, p in counts.items() if len(p) != 1
    }


def _check_rollout(done: desired_pb2.Rollout, fleet: FleetSim) -> dict[str, PushCall]:
    """The assertions every test makes once revision 2 succeeded; node -> its v2 push."""
    assert _state(done) == "SUCCESSFUL", done
    assert done.target_revision == 2
    applied = _applied(fleet, 2)
    twice = {n: [c.version for c in p] for n, p in applied.items() if len(p) != 1}
    assert not twice, f"nodes that did not apply revision 2 exactly once: {twice}"
    for node_id, link in fleet.nodes.items():
        assert link.daemon is not None
        revs = [dict(agents).get(NAME) for _, agents in link.daemon.servicer.pushes]
        assert revs == [1, 2], f"{node_id} applied {revs}"
    first = {n: p[0] for n, p in applied.items()}
    # Stored batches: 1..6, five nodes each, every node in exactly one.
    batches: dict[int, list[str]] = {}
    for n in done.nodes:
        assert n.phase == desired_pb2.ROLLOUT_NODE_PHASE_DONE, n
        batches.setdefault(n.batch, []).append(n.node_id)
    assert sorted(batches) == list(range(1, BATCHES + 1)), sorted(batches)
    assert all(len(ns) == MAX_PARALLEL for ns in batches.values()), batches
    assert sorted(n for ns in batches.values() for n in ns) == sorted(fleet.nodes)
    # In flight, as the daemons saw it: batch b+1 only after batch b was healthy for
    # min_healthy_time. (0.9: start times are whole milliseconds.)
    busiest = _busiest_window([c.at for c in first.values()], MIN_HEALTHY * 0.9)
    assert busiest <= MAX_PARALLEL, f"{busiest} nodes moved within min_healthy_time"
    for b in range(1, BATCHES):
        assert max(first[n].at for n in batches[b]) < min(first[n].at for n in batches[b + 1]), (
            f"batch {b + 1} started before batch {b} was pushed"
        )
    return first


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_manager_killed_mid_rollout_resumes_it_from_the_database(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """kill -9 as the third of six batches is pushed; restarted on the same database it
    finishes."""
    manager = ManagerProc(
        tmp_path / "m",
        pki.issue("manager", "m1", ips=("127.0.0.1",)),
        database_url=database_url if database_url.startswith("postgresql") else "",
        liveness=LIVENESS,
    )
    operator = pki.issue("operator", "alice")
    settings = SimSettings(
        addresses=(manager.address,),
        metrics_interval=2.0,
        rpc_timeout=5.0,
        reconnect=Backoff(initial=0.2, maximum=1.0),
        daemon_ports=True,
    )
    manager.start()
    try:
        await manager.wait_serving()
        async with FleetSim(pki.ca, settings, seed=13) as fleet:
            await fleet.start(NODES)
            await fleet.wait_connected(60)
            async with operator_stub(operator, manager, pki.trust_domain) as stub:
                await _settle_first_revision(stub, fleet)
                await _apply(
                    stub,
                    _definition(
                        "2.0",
                        max_parallel=str(MAX_PARALLEL),
                        min_healthy_time_seconds=MIN_HEALTHY,
                    ),
                )
                # The third batch is being pushed: the kill lands between pushes that
                # arrived and the manager recording them delivered.
                moved = await eventually(
                    lambda: asyncio.sleep(0, sum(map(len, _applied(fleet, 2).values()))),
                    lambda n: n > 2 * MAX_PARALLEL,
                    within=60,
                    every=0.02,
                )
            t_kill = time.time()
            manager.kill9()
            manager.start()
            await manager.wait_serving()
            t_back = time.time()
            async with operator_stub(operator, manager, pki.trust_domain) as stub:
                done = await eventually(
                    lambda: _rollout(stub),
                    lambda r: _state(r) in ("SUCCESSFUL", "FAILED", "REVERTED"),
                    within=90,
                    every=0.2,
                )
            first = _check_rollout(done, fleet)
            # Before t_back only the killed process can have pushed (a push it sent just
            # before the kill may be served here just after it).
            moved = sum(1 for c in first.values() if c.at < t_back)
            after = NODES - moved
            assert 0 < moved < NODES, f"the kill must land mid-rollout ({moved} moved before)"
            again = sum(c.outcome == "same" for cs in _calls(fleet).values() for c in cs)
        assert manager.alive
        assert not manager.crashed()
        print(
            f"\nmanager kill -9 mid-rollout ({database_url.split('+')[0]}): {moved}/{NODES} "
            f"moved before, down {t_back - t_kill:.1f}s, the restarted manager moved the other "
            f"{after}; {again} sets pushed again and answered 'already running'; "
            f"{BATCHES} batches of {MAX_PARALLEL}, each node updated once"
        )
    finally:
        manager.stop()


def _leader(m: ManagerProc) -> float:
    try:
        return m.scrape().get("fleet_desired_leader", -1.0)
    except OSError:
        return -1.0


async def _drop_lock_connection(database_url: str) -> None:
    """Terminate the PostgreSQL backend holding the desired-state lock (a lost connection:
    the replica lives on, its lock is gone)."""
    key = advisory_key(DESIRED_LOCK) & 0xFFFF_FFFF_FFFF_FFFF
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        pids = await conn.fetch(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid = $1 AND objid = $2 AND objsubid = 1"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            key >> 32,
            key & 0xFFFF_FFFF,
        )
        assert len(pids) == 1, pids
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pids[0]["pid"])
    finally:
        await conn.close()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("fault", ["kill9", "lock-lost"])
async def test_replica_driving_a_rollout_lost_the_other_finishes_it(
    pki: Any, tmp_path: Path, database_url: str, fault: str
) -> None:
    """Two replicas; the one holding the desired-state lock is killed mid-rollout (kill9),
    or stays up but PostgreSQL drops its lock connection (lock-lost)."""
    replicas = [
        ManagerProc(
            tmp_path / name,
            pki.issue("manager", name, ips=("127.0.0.1",)),
            database_url=database_url,
            liveness=LIVENESS,
        )
        for name in ("ma", "mb")
    ]
    operator = pki.issue("operator", "alice")
    for m in replicas:
        m.start()
    samples: list[tuple[float, float, float]] = []
    stop_sampling = asyncio.Event()

    async def sample() -> None:
        # Both gauges, again and again: never 1 on both.
        while not stop_sampling.is_set():
            a, b = await asyncio.gather(*(asyncio.to_thread(_leader, m) for m in replicas))
            samples.append((time.time(), a, b))
            await asyncio.sleep(0.05)

    sampler: asyncio.Task[None] | None = None
    try:
        for m in replicas:
            await m.wait_serving()
        await eventually(
            lambda: asyncio.to_thread(lambda: sorted(_leader(m) for m in replicas)),
            lambda v: v == [0.0, 1.0],
            within=30,
            every=0.2,
        )
        sampler = asyncio.create_task(sample())
        victim, survivor = sorted(replicas, key=_leader, reverse=True)
        # Daemons report to the victim first (the driver sees reports at once), then
        # fail over to the survivor as a daemon does.
        settings = SimSettings(
            addresses=(victim.address, survivor.address),
            metrics_interval=2.0,
            rpc_timeout=3.0,
            reconnect=Backoff(initial=0.2, maximum=1.0),
            daemon_ports=True,
        )
        async with FleetSim(pki.ca, settings, seed=17) as fleet:
            await fleet.start(NODES)
            await fleet.wait_connected(60)
            # Operators apply through the replica that is not driving: any replica may.
            async with operator_stub(operator, survivor, pki.trust_domain) as stub:
                await _settle_first_revision(stub, fleet)
                await _apply(
                    stub,
                    _definition(
                        "2.0",
                        max_parallel=str(MAX_PARALLEL),
                        min_healthy_time_seconds=MIN_HEALTHY,
                    ),
                )
                await eventually(
                    lambda: asyncio.sleep(0, sum(map(len, _applied(fleet, 2).values()))),
                    lambda n: n > 2 * MAX_PARALLEL,
                    within=60,
                    every=0.02,
                )
                t_kill = time.time()
                if fault == "kill9":
                    victim.kill9()
                else:
                    await _drop_lock_connection(database_url)
                done = await eventually(
                    lambda: _rollout(stub),
                    lambda r: _state(r) in ("SUCCESSFUL", "FAILED", "REVERTED"),
                    within=90,
                    every=0.2,
                )
            finished_in = time.time() - t_kill
            first = _check_rollout(done, fleet)
            calls = [c for cs in _calls(fleet).values() for c in cs]
        stop_sampling.set()
        await sampler
        victim_id, survivor_id = (f"manager/{m.root.name}" for m in (victim, survivor))
        callers = {c.caller for c in calls}
        assert callers == {victim_id, survivor_id}, callers
        last_victim = max(c.at for c in calls if c.caller == victim_id)
        first_survivor = min(c.at for c in calls if c.caller == survivor_id)
        assert last_victim < first_survivor, "both replicas pushed at the same time"
        assert first_survivor > t_kill, "the survivor pushed while the victim drove"
        moved = sum(1 for c in first.values() if c.caller == victim_id)
        took_over = sum(1 for c in first.values() if c.caller == survivor_id)
        assert 0 < moved < NODES, f"the kill must land mid-rollout ({moved} moved before)"
        assert moved + took_over == NODES
        again = sum(c.outcome == "same" for c in calls)
        both = [s for s in samples if s[1] == 1.0 and s[2] == 1.0]
        assert not both, f"both replicas held the desired-state lock: {both[:3]}"
        lead_at = min(t for t, *v in samples if t > t_kill and v[replicas.index(survivor)] == 1.0)
        # Three batches of min_healthy_time are left: ~9 s. Daemons still reporting to
        # the other replica (lock-lost) must not make each batch wait for the driver's
        # 10 s safety pass.
        assert finished_in < 25, f"the rollout took {finished_in:.0f}s after the fault"
        survivors = replicas if fault == "lock-lost" else [survivor]
        assert all(m.alive for m in survivors)
        assert not any(m.crashed() for m in survivors)
        print(
            f"\nreplica driving a rollout, {fault}: {moved}/{NODES} moved by {victim_id}, "
            f"{survivor_id} led {lead_at - t_kill:.1f}s after the fault, finished "
            f"{finished_in:.1f}s after it, and moved the other "
            f"{took_over} ({again} sets pushed again, answered 'already running'); "
            f"{len(samples)} samples of fleet_desired_leader, never both 1"
        )
    finally:
        stop_sampling.set()
        if sampler is not None:
            with contextlib.suppress(BaseException):
                await sampler
        for m in replicas:
            m.stop()
