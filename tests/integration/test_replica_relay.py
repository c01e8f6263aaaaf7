"""Two manager replicas on one PostgreSQL database, a portless daemon streaming to one of them.

Replica A (ma) and replica B (mb) are real ManagerServers with `[cluster]
advertise_address` set; the daemon is a real `fleet-daemon` process with
`listen = ""` whose control stream is on B. Everything an operator does
through A's FleetService must reach it through B (ReplicaService), A's
sweeper must not take it offline, a followed log cancelled on A must end on
the daemon, and when B stops the daemon's stream moves to A and the next
command works at once. ReplicaService refuses nodes and operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from daemon_helpers import eventually, short_tmp
from grpc import aio
from manager_harness import manager_config

from fleet.errors import DeadlineExceeded
from fleet.tls import TLSConfig, channel_credentials, channel_options
from fleet.v1 import (
    common_pb2,
    daemon_pb2,
    desired_pb2,
    fleet_pb2,
    fleet_pb2_grpc,
    replica_pb2,
    replica_pb2_grpc,
)
from manager.config import ClusterConfig, ManagerConfig, TLSFiles
from manager.server import ManagerServer

REPO = Path(__file__).resolve().parents[2]
NODE = "n1"
TICK = "while :; do echo tick; sleep 0.1; done"
# Small windows so a node wrongly judged silent goes offline within the test:
# offline after ttl + grace = 3 s; the stream's holder refreshes every second.
LIVENESS = {
    "min_ttl_seconds": 1.0,
    "jitter": 0.0,
    "grace_seconds": 2.0,
    "failover_grace_seconds": 0.5,
    "sweep_interval_seconds": 0.2,
}
CLUSTER = {"heartbeat_seconds": 0.5, "stale_after_seconds": 2.0, "reconcile_seconds": 1.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def replica_config(pki: Any, name: str, database_url: str, root: Path) -> ManagerConfig:
    """A replica named `name` (its certificate) on a fixed port it also advertises."""
    port = _free_port()
    base = manager_config(pki, database_url, root / name, liveness=LIVENESS)
    tls: TLSConfig = pki.issue("manager", name, ips=("127.0.0.1",))
    return dataclasses.replace(
        base,
        server=dataclasses.replace(
            base.server, listen=f"127.0.0.1:{port}", shutdown_grace_seconds=1.0
        ),
        tls=TLSFiles(ca_file=tls.ca_file, cert_file=tls.cert_file, key_file=tls.key_file),
        cluster=ClusterConfig(advertise_address=f"127.0.0.1:{port}", **CLUSTER),
    )


def daemon_toml(root: Path, tls: TLSConfig, managers: list[str], metrics_port: int) -> str:
    """A portless daemon (its stream is the only way in) running `tick`."""
    addresses = ", ".join(f'"{a}"' for a in managers)
    return f"""
listen = ""
state_dir = "{root}/state"
run_dir = "{root}/run"
log_dir = "{root}/log"
metrics_listen = "127.0.0.1:{metrics_port}"
sample_interval_seconds = 0.5
stop_agents_on_exit = true
shutdown_grace_seconds = 1.0
[labels]
env = "relay"
[tls]
ca_file = "{tls.ca_file}"
cert_file = "{tls.cert_file}"
key_file = "{tls.key_file}"
[manager]
addresses = [{addresses}]
metrics_interval_seconds = 1.0
sync_interval_seconds = 5.0
[manager.reconnect]
initial = 0.2
maximum = 1.0
[[agents]]
id = "tick"
argv = ["/bin/sh", "-c", "{TICK}"]
start_secs = 0.2
stop_timeout = 2.0
"""


class Daemon:
    """A fleet-daemon process and its /metrics."""

    def __init__(self, root: Path, toml: str, metrics_port: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        (root / "daemon.toml").write_text(toml)
        self.root = root
        self.metrics_port = metrics_port
        self.log = root / "daemon.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daemon.cli", "--config", str(root / "daemon.toml")],
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def commands(self, method: str, code: str) -> float:
        """fleet_daemon_control_commands{method, code} (0 before the first)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return 0.0
        want = f'fleet_daemon_control_commands_total{{code="{code}",method="{method}"}}'
        for line in text.splitlines():
            if line.startswith(want):
                return float(line.rpartition(" ")[2])
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def running_daemon(root: Path, pki: Any, managers: list[str]) -> Iterator[Daemon]:
    """The portless daemon of node n1, stopped (with its agents) afterwards."""
    port = _free_port()
    daemon = Daemon(root, daemon_toml(root, pki.issue("node", NODE), managers, port), port)
    try:
        yield daemon
    except BaseException:
        sys.stderr.write(daemon.log.read_text(errors="replace")[-4000:])
        raise
    finally:
        daemon.stop()


@contextlib.asynccontextmanager
async def operator_stub(pki: Any, address: str) -> AsyncIterator[fleet_pb2_grpc.FleetServiceStub]:
    """FleetService on the replica at `address`, as operator/alice."""
    tls: TLSConfig = pki.issue("operator", "alice")
    channel = aio.secure_channel(
        address, channel_credentials(tls), options=channel_options(f"manager.{pki.trust_domain}")
    )
    try:
        yield fleet_pb2_grpc.FleetServiceStub(channel)
    finally:
        await channel.close()


def relayed(server: ManagerServer, code: str = "OK") -> float:
    """Commands `server` forwarded to another replica that ended with `code`."""
    value = server.metrics.registry.get_sample_value(
        "fleet_manager_relayed_commands_total", {"code": code}
    )
    return value or 0.0


async def live_agents(stub: fleet_pb2_grpc.FleetServiceStub) -> dict[str, Any]:
    reply = await stub.ListAgents(
        fleet_pb2.FleetServiceListAgentsRequest(node_id=NODE, live=True), timeout=10
    )
    assert not reply.errors, reply.errors
    return {a.agent.id: a.agent for a in reply.agents}


async def offline_events(database_url: str) -> list[str]:
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        rows = await conn.fetch("SELECT node_id FROM events WHERE kind = 'NODE_OFFLINE'")
    finally:
        await conn.close()
    return [r["node_id"] for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_commands_on_one_replica_reach_a_portless_daemon_streaming_to_the_other(
    pki: Any, database_url: str
) -> None:
    """Live list, operate, a followed log (cancelled), a desired-state push: all through B."""
    with short_tmp() as root:
        a = ManagerServer(replica_config(pki, "ma", database_url, root))
        b = ManagerServer(replica_config(pki, "mb", database_url, root))
        await a.start()  # first: A leads the sweeper and the desired-state driver
        b_stopped = False
        try:
            await eventually(
                lambda: asyncio.sleep(0, a.convergence.leading and a.sweeper.active_since),
                bool,
                within=30,
            )
            await b.start()
            assert a.directory is not None
            assert b.directory is not None
            addr_a, addr_b = a.config.server.listen, b.config.server.listen
            with running_daemon(root / "d1", pki, [addr_b, addr_a]) as daemon:
                await eventually(
                    lambda: a.directory.route(NODE) if a.directory else asyncio.sleep(0),
                    lambda r: r is not None and r.replica_id == "mb",
                    within=60,
                )
                assert a.control_streams.get(NODE) is None
                async with operator_stub(pki, addr_a) as stub:
                    # Live ListAgents through A: relayed to B, down the stream.
                    agents = await eventually(
                        lambda: live_agents(stub),
                        lambda r: (
                            "tick" in r and r["tick"].status == common_pb2.AGENT_STATUS_RUNNING
                        ),
                        within=30,
                    )
                    first_pid = agents["tick"].pid
                    assert relayed(a) >= 1
                    assert a.pool.peer_stats()["mb"].calls >= 1  # one pooled channel to mb

                    # OperateAgent restart: a new process on the node.
                    reply = await stub.OperateAgent(
                        fleet_pb2.FleetServiceOperateAgentRequest(
                            node_id=NODE,
                            agent_id="tick",
                            operation=common_pb2.AGENT_OPERATION_RESTART,
                        ),
                        timeout=15,
                    )
                    assert reply.agent.agent.restart_count == 1
                    assert reply.agent.agent.pid not in (0, first_pid)

                    # An error passes through with its status and names what was missing.
                    with pytest.raises(aio.AioRpcError) as missing:
                        await stub.OperateAgent(
                            fleet_pb2.FleetServiceOperateAgentRequest(
                                node_id=NODE,
                                agent_id="absent",
                                operation=common_pb2.AGENT_OPERATION_START,
                            ),
                            timeout=15,
                        )
                    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
                    assert "absent" in (missing.value.details() or "")

                    # A followed log through A, cancelled by the caller: it ends on the daemon.
                    cancelled = daemon.commands("ReadAgentLog", "CANCELLED")
                    follow = stub.ReadAgentLog(
                        fleet_pb2.FleetServiceReadAgentLogRequest(
                            node_id=NODE, agent_id="tick", offset=-100, follow=True
                        )
                    )
                    chunks = b""
                    async for chunk in follow:
                        chunks += chunk.data
                        if chunks.count(b"tick") >= 3:
                            break
                    session = b.control_streams.get(NODE)
                    assert session is not None
                    assert session.in_flight == 1
                    follow.cancel()
                    await eventually(
                        lambda: asyncio.sleep(0, daemon.commands("ReadAgentLog", "CANCELLED")),
                        lambda n: n > cancelled,
                        within=15,
                    )
                    assert session.in_flight == 0

                    # A desired-state push from A (the driver) to the node on B.
                    pushes = relayed(a)
                    await stub.ApplyDefinitions(
                        fleet_pb2.FleetServiceApplyDefinitionsRequest(
                            definitions=[
                                desired_pb2.Definition(
                                    name="relayed",
                                    selector=common_pb2.LabelSelector(
                                        match_labels={"env": "relay"}
                                    ),
                                    agent=common_pb2.AgentSpec(
                                        argv=["/bin/sleep", "1001"], autostart=True
                                    ),
                                    update=desired_pb2.UpdatePolicy(min_healthy_time_seconds=0.0),
                                )
                            ]
                        ),
                        timeout=15,
                    )
                    assert a.convergence.leading
                    agents = await eventually(
                        lambda: live_agents(stub),
                        lambda r: (
                            "relayed" in r
                            and r["relayed"].status == common_pb2.AGENT_STATUS_RUNNING
                        ),
                        within=60,
                    )
                    assert relayed(a) > pushes + 1  # the push, besides our listings

                    # A (the sweeper) never takes the node offline: B refreshes its last-seen.
                    await asyncio.sleep(5.0)
                    node = await stub.GetNode(
                        fleet_pb2.FleetServiceGetNodeRequest(node_id=NODE), timeout=10
                    )
                    assert node.node.status == common_pb2.NODE_STATUS_ONLINE
                    assert await offline_events(database_url) == []
                    # GetNode on A asks the directory: the stream is on B. A's list only
                    # knows A's own streams.
                    assert node.node.stream_state == fleet_pb2.CONTROL_STREAM_STATE_ELSEWHERE
                    assert node.node.stream_replica == "mb"
                    listed = await stub.ListNodes(fleet_pb2.FleetServiceListNodesRequest())
                    (row,) = [n for n in listed.nodes if n.node_id == NODE]
                    assert row.stream_state == fleet_pb2.CONTROL_STREAM_STATE_UNSPECIFIED

                    # A follow in flight when B stops: UNAVAILABLE naming the node, no hang.
                    follow = stub.ReadAgentLog(
                        fleet_pb2.FleetServiceReadAgentLogRequest(
                            node_id=NODE, agent_id="tick", offset=-10, follow=True
                        )
                    )
                    await follow.read()
                    stopping = asyncio.create_task(b.stop(1.0))

                    async def drain() -> None:
                        async with asyncio.timeout(15):
                            while True:
                                await follow.read()

                    with pytest.raises(aio.AioRpcError) as cut:
                        await drain()
                    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE, cut.value
                    assert NODE in (cut.value.details() or "")
                    await stopping
                    b_stopped = True

                    # The stream moves to A; the next command is local there, no stale route.
                    await eventually(
                        lambda: asyncio.sleep(0, a.control_streams.get(NODE)),
                        lambda s: s is not None,
                        within=30,
                    )
                    after = relayed(a) + relayed(a, "UNAVAILABLE")
                    agents = await live_agents(stub)
                    assert agents["tick"].status == common_pb2.AGENT_STATUS_RUNNING
                    assert relayed(a) + relayed(a, "UNAVAILABLE") == after  # not relayed
                    node = await stub.GetNode(
                        fleet_pb2.FleetServiceGetNodeRequest(node_id=NODE), timeout=10
                    )
                    assert node.node.stream_state == fleet_pb2.CONTROL_STREAM_STATE_CONNECTED
                    assert node.node.stream_since > 0
                    await a.directory.flush()
                    assert (await a.directory.route(NODE)) is None  # its own record: no route
                    assert await a.directory.reconcile() == (0, 0)
        finally:
            if not b_stopped:
                await b.stop(1.0)
            await a.stop(1.0)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_relayed_follow_ends_at_the_callers_deadline(pki: Any, database_url: str) -> None:
    """A followed log relayed with a 1 s deadline ends DEADLINE_EXCEEDED then, on the node too."""
    with short_tmp() as root:
        a = ManagerServer(replica_config(pki, "ma", database_url, root))
        b = ManagerServer(replica_config(pki, "mb", database_url, root))
        await a.start()
        await b.start()
        try:
            with running_daemon(root / "d1", pki, [b.config.server.listen]) as daemon:
                await eventually(
                    lambda: a.directory.route(NODE) if a.directory else asyncio.sleep(0),
                    lambda r: r is not None,
                    within=60,
                )

                def ended() -> float:
                    return daemon.commands("ReadAgentLog", "DEADLINE_EXCEEDED") + daemon.commands(
                        "ReadAgentLog", "CANCELLED"
                    )

                async def follow() -> int:
                    chunks = 0
                    async for _ in a.pool.read_agent_log(
                        NODE, "", "tick", offset=-10, follow=True, call_timeout=1.0
                    ):
                        chunks += 1
                    return chunks

                before = ended()
                t0 = time.monotonic()
                with pytest.raises(DeadlineExceeded) as late:
                    await follow()
                took = time.monotonic() - t0
                assert 0.9 <= took < 5.0, took
                assert late.value.message.startswith(f"{NODE}: "), late.value.message
                await eventually(lambda: asyncio.sleep(0, ended()), lambda n: n > before)
                session = b.control_streams.get(NODE)
                assert session is not None
                assert session.in_flight == 0
        finally:
            await b.stop(1.0)
            await a.stop(1.0)


async def test_the_relay_service_refuses_nodes_and_operators(pki: Any, tmp_path: Path) -> None:
    """Only manager certificates may relay; a node nobody streams here is UNAVAILABLE."""
    config = manager_config(pki, f"sqlite+aiosqlite:///{tmp_path / 'm.db'}", tmp_path / "m")
    server = ManagerServer(config)
    await server.start()
    try:
        request = replica_pb2.RelayRequest(
            node_id=NODE,
            method="ListAgents",
            request=daemon_pb2.ListAgentsRequest().SerializeToString(),
        )
        outcomes: dict[str, tuple[grpc.StatusCode, str]] = {}
        for role, name in (("node", NODE), ("operator", "alice"), ("manager", "m2")):
            tls: TLSConfig = pki.issue(role, name)
            async with aio.secure_channel(
                f"127.0.0.1:{server.port}",
                channel_credentials(tls),
                options=channel_options(f"manager.{pki.trust_domain}"),
            ) as channel:
                stub = replica_pb2_grpc.ReplicaServiceStub(channel)
                with pytest.raises(aio.AioRpcError) as info:
                    await stub.Relay(request, timeout=10)
                outcomes[role] = (info.value.code(), info.value.details() or "")
                if role == "manager":
                    bad = replica_pb2.RelayStreamRequest(node_id=NODE, method="ListAgents")
                    with pytest.raises(aio.AioRpcError) as wrong:
                        async for _ in stub.RelayStream(bad, timeout=10):
                            pass
                    assert wrong.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert "ReadAgentLog" in (wrong.value.details() or "")
        assert outcomes["node"][0] == grpc.StatusCode.PERMISSION_DENIED
        assert "node/n1" in outcomes["node"][1]
        assert outcomes["operator"][0] == grpc.StatusCode.PERMISSION_DENIED
        assert "operator/alice" in outcomes["operator"][1]
        code, details = outcomes["manager"]
        assert code == grpc.StatusCode.UNAVAILABLE
        assert details == (
            "n1: its control stream is not on manager replica m1 (it closed or moved to "
            "another replica); try again"
        ), details
    finally:
        await server.stop(1.0)
