"""Faults on the control channel (ManagerService.Connect).

- The manager killed (-9) under many nodes on streams (bench/connect_sim):
  every node reconnects by itself, and no acknowledged metric batch is lost
  or stored twice.
- The network cut between a real portless daemon and the manager (a netns
  veth pair, as test_network_cut.py): offline after keepalive + grace, back
  online by itself when the link returns.
- The same cut while the daemon runs a job (followed by `fleetctl jobs logs
  -f`) and an agent's log is followed: the log follow ends within keepalive
  + timeout, in words that name the network too; the job follow says the
  node is out of reach and goes on; mended, the job ends SUCCESS with every
  line stored and printed once.
- A real portless daemon killed while a command to it is in flight (a
  followed log): the caller gets a clear error, not a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from daemon_helpers import short_tmp
from faultkit import (
    REPO,
    DaemonProc,
    ManagerProc,
    eventually,
    kill_marked,
    operator_stub,
    ticker_toml,
)
from grpc import aio
from test_network_cut import _cable

from bench.connect_sim import ConnectNode
from daemon.supervisor.policy import STALL_SLACK
from fleet.retry import Backoff
from fleet.v1 import fleet_pb2, jobs_pb2

NODES = int(os.environ.get("FLEET_FAULT_NODES", "200"))
KEEPALIVE, KEEPALIVE_TIMEOUT, GRACE = 1.0, 1.0, 1.0
CONTROL = (
    f"[control]\nkeepalive_time_seconds = {KEEPALIVE}\n"
    f"keepalive_timeout_seconds = {KEEPALIVE_TIMEOUT}\nmin_ping_interval_seconds = 0.5\n"
    f"offline_grace_seconds = {GRACE}\nliveness_refresh_seconds = 0.5\n"
)
LIVENESS = (
    "min_ttl_seconds = 1.0\njitter = 0.0\ngrace_seconds = 1.0\n"
    "failover_grace_seconds = 0.0\nsweep_interval_seconds = 0.2\nflush_interval_seconds = 0.2\n"
)
LINK = (
    "metrics_interval_seconds = 1.0\nrpc_timeout_seconds = 2.0\n"
    f"keepalive_time_seconds = {KEEPALIVE}\nkeepalive_timeout_seconds = {KEEPALIVE_TIMEOUT}\n"
    "control_stream = true\n[manager.reconnect]\ninitial = 0.2\nmaximum = 1.0\n"
)


FLEETCTL = (sys.executable, "-c", "from fleetctl.app import main; main()")


def _fleetctl_env(manager: ManagerProc, operator: Any) -> dict[str, str]:
    """fleetctl's environment: this manager, as `operator`."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "FLEET_MANAGER": manager.address,
        "FLEET_CA": str(operator.ca_file),
        "FLEET_CERT": str(operator.cert_file),
        "FLEET_KEY": str(operator.key_file),
    }


def _portless(daemon: DaemonProc) -> None:
    """No listening address: the daemon is reachable only through its stream."""
    text = daemon.config.read_text()
    daemon.config.write_text(text.replace(f'listen = "127.0.0.1:{daemon.port}"', 'listen = ""'))


async def test_manager_kill9_under_streams_all_reconnect_no_batch_lost_or_doubled(
    pki: Any, tmp_path: Path
) -> None:
    """kill -9 + restart: every node welcomed again within 60 s; acked batches stored once."""
    manager = ManagerProc(
        tmp_path / "m",
        pki.issue("manager", "m1", ips=("127.0.0.1",)),
        liveness=LIVENESS.replace("failover_grace_seconds = 0.0", "failover_grace_seconds = 60"),
        extra=CONTROL.replace(f"offline_grace_seconds = {GRACE}", "offline_grace_seconds = 60"),
    )
    manager.start()
    nodes: list[ConnectNode] = []
    try:
        await manager.wait_serving()
        for i in range(NODES):
            node_id = f"cc-{i:04d}"
            tls = pki.issue("node", node_id)
            nodes.append(
                ConnectNode(
                    node_id,
                    tls,
                    pki.ca.trust_domain,
                    (manager.address,),
                    metrics_interval=max(1.0, NODES / 100),
                    keepalive=(KEEPALIVE, KEEPALIVE_TIMEOUT),
                    reconnect=Backoff(initial=0.5, multiplier=2.0, maximum=8.0),
                )
            )
        for n in nodes:
            n.start()
        await eventually(
            lambda: asyncio.sleep(0, sum(1 for n in nodes if len(n.record.acked) >= 2)),
            lambda c: c == NODES,
            within=120,
            every=0.5,
        )
        acked_before = {n.node_id: set(n.record.acked) for n in nodes}
        t_kill = time.time()
        manager.kill9()
        await asyncio.sleep(3.0)
        manager.start()
        await manager.wait_serving()
        t_serving = time.time()
        await eventually(
            lambda: asyncio.sleep(0, [n for n in nodes if max(n.record.welcomes) < t_kill]),
            lambda waiting: not waiting,
            within=120,
            every=0.2,
        )
        back_in = max(min(t for t in n.record.welcomes if t >= t_kill) for n in nodes) - t_serving
        # A batch cut while it was down is sent (and acknowledged) after.
        await eventually(
            lambda: asyncio.sleep(0, [n for n in nodes if n.unacked]),
            lambda waiting: not waiting,
            within=60,
            every=0.2,
        )
        acked_all = {n.node_id: set(n.record.acked) for n in nodes}
    finally:
        await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)
        manager.stop()
    print(f"\nkill -9 under {NODES} streams: all welcomed again {back_in:.1f}s after serving")
    assert back_in < 60
    dup = await asyncio.to_thread(
        manager.query,
        "SELECT node_id, value, COUNT(*) FROM metric_samples WHERE name = 'batch' "
        "GROUP BY node_id, value HAVING COUNT(*) > 1",
    )
    assert dup == [], f"batches stored twice: {dup[:5]}"
    rows = await asyncio.to_thread(
        manager.query,
        "SELECT node_id, CAST(value AS INTEGER) FROM metric_samples WHERE name = 'batch'",
    )
    stored: dict[str, set[int]] = {}
    for node_id, seq in rows:
        stored.setdefault(node_id, set()).add(seq)
    for node_id, acked in acked_all.items():
        missing = acked - stored.get(node_id, set())
        assert not missing, f"{node_id}: acknowledged but not stored: {sorted(missing)[:10]}"
        assert acked_before[node_id] <= acked
    offline = await asyncio.to_thread(
        manager.query, "SELECT node_id FROM events WHERE kind = 'NODE_OFFLINE'"
    )
    assert offline == [], f"nodes marked offline by the restart: {offline[:5]}"
    assert not manager.crashed()


async def _status(manager: ManagerProc, node: str) -> str:
    rows = await asyncio.to_thread(
        manager.query, "SELECT status FROM nodes WHERE node_id = ?", node
    )
    return str(rows[0][0]) if rows else ""


@contextlib.asynccontextmanager
async def _portless_fleet(
    pki: Any, tmp_path: Path, ping_timeout: float | None = None
) -> AsyncIterator[tuple[Any, ManagerProc, DaemonProc, str]]:
    """A manager and a portless daemon (one ticker agent) on either side of a cable, the
    node online: (cable, manager, daemon, the address the daemon dials). `ping_timeout`:
    both sides' ping_timeout_seconds (else their default, gRPC's 60 s)."""
    control, link = CONTROL, LINK
    if ping_timeout is not None:
        control += f"ping_timeout_seconds = {ping_timeout}\n"
        link = link.replace(
            "[manager.reconnect]", f"ping_timeout_seconds = {ping_timeout}\n[manager.reconnect]"
        )
    marker = f"ccmark-{secrets.token_hex(4)}"
    async with _cable() as cable:
        manager = ManagerProc(
            tmp_path / "m",
            pki.issue("manager", "m1", ips=(cable.manager_host,)),
            listen_host=cable.manager_host,
            liveness=LIVENESS,
            extra=control,
        )
        address = cable.dial(manager.port)
        with short_tmp() as root:
            daemon = DaemonProc(
                root,
                pki.issue("node", "n1"),
                body=f'[manager]\naddresses = ["{address}"]\n{link}'
                + ticker_toml("ticker", marker, 0.5),
            )
            _portless(daemon)
            manager.start()
            try:
                await manager.wait_serving()
                await daemon.wait_ready(daemon.start(cable.prefix))
                await eventually(lambda: _status(manager, "n1"), lambda s: s == "online", within=60)
                yield cable, manager, daemon, address
            finally:
                daemon.stop()
                manager.stop()
                kill_marked(marker)


async def test_network_cut_offline_after_keepalive_and_grace_then_back(
    pki: Any, tmp_path: Path
) -> None:
    """A portless daemon behind a cut link: offline after keepalive + timeout + grace; the
    link mended, online again by itself on a new stream."""
    async with _portless_fleet(pki, tmp_path) as (cable, manager, daemon, _):
        await asyncio.sleep(3.0)  # steady: no heartbeat calls keep it online now
        assert await _status(manager, "n1") == "online"
        t_cut = time.time()
        await asyncio.to_thread(cable.cut)
        await eventually(lambda: _status(manager, "n1"), lambda s: s == "offline", within=30)
        detection = time.time() - t_cut
        t_mend = time.time()
        await asyncio.to_thread(cable.mend)
        await eventually(lambda: _status(manager, "n1"), lambda s: s == "online", within=60)
        recovery = time.time() - t_mend
        assert daemon.popen is not None
        assert daemon.popen.poll() is None
        assert not manager.crashed()
    bound = KEEPALIVE + KEEPALIVE_TIMEOUT + GRACE
    print(
        f"\ncontrol stream cut ({cable.kind}): offline {detection:.2f}s after the cut "
        f"(keepalive + timeout + grace = {bound:.1f}s); online {recovery:.2f}s after the mend"
    )
    assert GRACE - 0.1 <= detection <= bound + 3.0
    assert recovery < 15.0


async def test_a_cut_link_is_logged_in_our_words_on_both_sides(pki: Any, tmp_path: Path) -> None:
    """The stream ends on a keepalive timeout (cable cut): the daemon's log says the
    manager is unreachable, its keepalive timed out, and that it reconnects with backoff;
    the manager's says the node's keepalive timed out. Neither passes gRPC's "Internal
    error from Core" (or any "from Core") through."""
    async with _portless_fleet(pki, tmp_path) as (cable, manager, daemon, address):
        await asyncio.to_thread(cable.cut)
        await eventually(lambda: _status(manager, "n1"), lambda s: s == "offline", within=30)
        await eventually(
            lambda: asyncio.to_thread(daemon.log.read_text),
            lambda text: "reconnecting with backoff" in text,
            within=30,
        )
        await asyncio.to_thread(cable.mend)
        await eventually(lambda: _status(manager, "n1"), lambda s: s == "online", within=60)
        daemon_log, manager_log = daemon.log.read_text(), manager.log.read_text()
    assert "from Core" not in daemon_log
    assert "from Core" not in manager_log
    assert re.search(
        rf"manager {re.escape(address)}: unreachable, its keepalive ping unanswered for 1 s"
        r" \(network cut, or the manager host down\); reconnecting with backoff,"
        r" next try in [0-9.]+s",
        daemon_log,
    ), daemon_log
    assert (
        "n1: control stream closed: the daemon stopped or its process died, or the network"
        " to it failed"
    ) in manager_log, manager_log


async def test_a_daemon_that_was_stopped_does_not_blame_the_network(
    pki: Any, tmp_path: Path
) -> None:
    """The daemon process stopped (SIGSTOP) long enough for the manager's keepalive to give
    up on its stream (`ping_timeout_seconds` set: its kernel still acknowledges TCP, so
    only the unanswered ping tells): offline within keepalive + ping timeout + grace; once
    it runs again, its log says it was not running and for how long, and that this ended
    the stream, not "network cut"."""
    async with _portless_fleet(pki, tmp_path, ping_timeout=KEEPALIVE_TIMEOUT) as (
        _,
        manager,
        daemon,
        address,
    ):
        assert daemon.popen is not None
        daemon.popen.send_signal(signal.SIGSTOP)
        t_stop = time.time()
        try:
            await eventually(lambda: _status(manager, "n1"), lambda s: s == "offline", within=30)
            # Its kernel still acknowledges TCP: only the unanswered ping tells.
            detection = time.time() - t_stop
            await asyncio.sleep(STALL_SLACK + 1.0)  # stopped for longer than scheduling explains
        finally:
            daemon.popen.send_signal(signal.SIGCONT)
        await eventually(lambda: _status(manager, "n1"), lambda s: s == "online", within=60)
        daemon_log = await asyncio.to_thread(daemon.log.read_text)
    assert detection <= KEEPALIVE + KEEPALIVE_TIMEOUT + GRACE + 3.0, detection
    assert re.search(
        r"this daemon was not running for \d+\.\d s \(stopped by a signal, swapped out or its"
        r" VM paused\)",
        daemon_log,
    ), daemon_log
    assert re.search(
        rf"manager {re.escape(address)}: the control stream ended after this daemon was not"
        r" running for \d+\.\d s .*; reconnecting with backoff",
        daemon_log,
    ), daemon_log
    assert "network cut" not in daemon_log


async def test_a_stopped_manager_is_left_within_keepalive(pki: Any, tmp_path: Path) -> None:
    """The manager process stopped (its host's kernel still acknowledging TCP): with
    `ping_timeout_seconds` set, the daemon gives up on its stream within keepalive time +
    that (gRPC's default would wait 60 s), and says so; the manager running again, the
    node is back online."""
    async with _portless_fleet(pki, tmp_path, ping_timeout=KEEPALIVE_TIMEOUT) as (
        _,
        manager,
        daemon,
        address,
    ):
        assert manager.popen is not None
        manager.popen.send_signal(signal.SIGSTOP)
        t_stop = time.time()
        try:
            await eventually(
                lambda: asyncio.to_thread(daemon.log.read_text),
                lambda text: "reconnecting with backoff" in text,
                within=30,
            )
            detection = time.time() - t_stop
        finally:
            manager.popen.send_signal(signal.SIGCONT)
        await eventually(lambda: _status(manager, "n1"), lambda s: s == "online", within=60)
        daemon_log = await asyncio.to_thread(daemon.log.read_text)
    assert detection <= KEEPALIVE + KEEPALIVE_TIMEOUT + 3.0, detection
    assert f"manager {address}: unreachable, its keepalive ping unanswered" in daemon_log


UNREACHED = "the manager cannot reach the node of 1 started"
"""What a job follow says (stderr) of a started target whose node is out of reach."""


async def _lines(stream: asyncio.StreamReader, into: list[bytes]) -> None:
    async for line in stream:
        into.append(line)


async def _said(lines: list[bytes], what: str) -> int:
    return sum(what in line.decode() for line in lines)


async def test_network_cut_mid_job_output_once_and_followers_told_why(
    pki: Any, tmp_path: Path
) -> None:
    """A portless daemon runs a job printing a line every 50 ms, followed by `fleetctl jobs
    logs -f`, while its agent's log is followed too; the cable is cut for at least 5 s
    (past keepalive + timeout + grace) and until the job follow has said the node is out
    of reach. The agent-log follow ends UNAVAILABLE in words that leave the network open
    (not only a dead daemon); the job follow goes on. Mended, the job ends SUCCESS with
    every line stored once, in order, and printed once by the follow; NODE_OFFLINE then
    NODE_ONLINE."""
    marker = f"ccmark-{secrets.token_hex(4)}"
    stop = tmp_path / "stop"  # the job ends once this exists: after the cut, however slow
    script = f'i=0; while [ ! -e {stop} ]; do echo "line $i"; i=$((i+1)); sleep 0.05; done'
    async with _cable() as cable:
        manager = ManagerProc(
            tmp_path / "m",
            pki.issue("manager", "m1", ips=(cable.manager_host,)),
            listen_host=cable.manager_host,
            liveness=LIVENESS,
            extra=CONTROL,
        )
        address = cable.dial(manager.port)
        operator = pki.issue("operator", "alice")
        env = _fleetctl_env(manager, operator)
        with short_tmp() as root:
            daemon = DaemonProc(
                root,
                pki.issue("node", "n1"),
                body=f'[manager]\naddresses = ["{address}"]\n{LINK}'
                + ticker_toml("ticker", marker, 0.2),
            )
            _portless(daemon)
            manager.start()
            job_follow: asyncio.subprocess.Process | None = None
            try:
                await manager.wait_serving()
                await daemon.wait_ready(daemon.start(cable.prefix))
                await eventually(lambda: _status(manager, "n1"), lambda s: s == "online", within=60)
                async with operator_stub(operator, manager, pki.trust_domain) as stub:
                    spec = jobs_pb2.JobSpec(
                        steps=[
                            jobs_pb2.JobStep(
                                command=jobs_pb2.JobCommand(argv=["/bin/sh", "-c", script, marker])
                            )
                        ],
                        node_ids=["n1"],
                    )
                    run = await stub.RunJob(fleet_pb2.FleetServiceRunJobRequest(spec=spec))
                    job_id = run.job.id
                    job_follow = await asyncio.create_subprocess_exec(
                        *FLEETCTL,
                        "jobs",
                        "logs",
                        job_id,
                        "-f",
                        env=env,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.PIPE,
                    )
                    assert job_follow.stdout is not None
                    assert job_follow.stderr is not None
                    said: list[bytes] = []  # the follow's stderr, read as it comes
                    reading = asyncio.create_task(_lines(job_follow.stderr, said))
                    async with asyncio.timeout(60):  # fleetctl's start takes seconds when loaded
                        first = await job_follow.stdout.readline()
                    assert first.startswith(b"n1 | line "), first
                    follow = stub.ReadAgentLog(
                        fleet_pb2.FleetServiceReadAgentLogRequest(
                            node_id="n1", agent_id="ticker", follow=True
                        )
                    )
                    assert b"tick" in (await follow.read()).data  # followed through the stream
                    t_cut = time.time()
                    await asyncio.to_thread(cable.cut)
                    with contextlib.suppress(grpc.RpcError):
                        async with asyncio.timeout(KEEPALIVE + KEEPALIVE_TIMEOUT + 8):
                            while await follow.read() != aio.EOF:
                                pass
                    follow_ended = time.time() - t_cut
                    assert follow.done(), "the follow still hangs"
                    code, details = await follow.code(), await follow.details()
                    assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
                    # A cut cable and a dead daemon end the stream alike: say both.
                    assert "the network to it failed" in details, details
                    await eventually(
                        lambda: _status(manager, "n1"), lambda s: s == "offline", within=30
                    )
                    await asyncio.sleep(max(0.0, t_cut + 5.0 - time.time()))
                    # The follow asks every 3 s about a node gone quiet: the cable stays cut
                    # until it has said so, however slow the machine.
                    await eventually(
                        lambda: _said(said, UNREACHED), lambda n: n > 0, within=30, every=0.2
                    )
                    await asyncio.to_thread(cable.mend)
                    await eventually(
                        lambda: _status(manager, "n1"), lambda s: s == "online", within=30
                    )
                    stop.touch()
                    job = await eventually(
                        lambda: stub.GetJob(fleet_pb2.FleetServiceGetJobRequest(job_id=job_id)),
                        lambda r: r.job.ended_at > 0,
                        within=60,
                        every=0.2,
                    )
                    (target,) = job.job.targets
                    assert target.state == jobs_pb2.JOB_TARGET_STATE_SUCCESS, target
                    request = fleet_pb2.FleetServiceReadJobOutputRequest(
                        job_id=job_id, node_id="n1"
                    )
                    out = b"".join([m.data async for m in stub.ReadJobOutput(request)]).decode()
                    rest = await asyncio.wait_for(job_follow.stdout.read(), 30)
                    await asyncio.wait_for(job_follow.wait(), 30)
                    await asyncio.wait_for(reading, 30)
                    err = b"".join(said)
                lines = out.splitlines()
                assert len(lines) > 20, out
                assert lines == [f"line {i}" for i in range(len(lines))], out
                printed = (first + rest).decode().splitlines()
                assert printed == [f"n1 | {line}" for line in lines], printed
                assert job_follow.returncode == 0, err
                # Said once, while the node was out of reach (lost stream or offline).
                told = err.decode().count(UNREACHED)
                assert told == 1, err
                assert b"n1 (" in err, err
                assert b"what runs there goes on" in err, err
                events = await asyncio.to_thread(
                    manager.query,
                    "SELECT kind FROM events WHERE node_id = 'n1' AND kind IN "
                    "('NODE_OFFLINE', 'NODE_ONLINE') AND ts_ms >= ? ORDER BY id",
                    int(t_cut * 1000),
                )
                assert [k for (k,) in events] == ["NODE_OFFLINE", "NODE_ONLINE"]
                assert not manager.crashed()
            finally:
                if job_follow is not None and job_follow.returncode is None:
                    job_follow.kill()
                    await job_follow.communicate()
                stop.touch()
                daemon.stop()
                manager.stop()
                kill_marked(marker)
    print(
        f"\ncut mid-job ({cable.kind}): the agent-log follow ended {follow_ended:.1f}s after the "
        f"cut ({details!r}); {len(lines)} lines stored and followed once in order, SUCCESS; "
        f"the job follow said: {err.decode().strip()!r}"
    )
    assert follow_ended < KEEPALIVE + KEEPALIVE_TIMEOUT + 4.0


async def test_daemon_killed_with_a_command_in_flight_fails_the_caller_clearly(
    pki: Any, tmp_path: Path
) -> None:
    """`fleetctl agents logs -f` to a portless daemon, which is then killed -9: fleetctl ends
    with an error naming the node's unavailability within seconds, not a hang; the daemon
    restarted, the same command works again."""
    marker = f"ccmark-{secrets.token_hex(4)}"
    manager = ManagerProc(
        tmp_path / "m",
        pki.issue("manager", "m1", ips=("127.0.0.1",)),
        liveness=LIVENESS,
        extra=CONTROL,
    )
    operator = pki.issue("operator", "alice")
    env = _fleetctl_env(manager, operator)
    argv = list(FLEETCTL)
    with short_tmp() as root:
        daemon = DaemonProc(
            root,
            pki.issue("node", "n1"),
            body=f'[manager]\naddresses = ["{manager.address}"]\n{LINK}'
            + ticker_toml("ticker", marker, 0.2),
        )
        _portless(daemon)
        manager.start()
        follow: asyncio.subprocess.Process | None = None
        try:
            await manager.wait_serving()
            await daemon.wait_ready(daemon.start())
            await eventually(lambda: _status(manager, "n1"), lambda s: s == "online", within=60)
            follow = await asyncio.create_subprocess_exec(
                *argv,
                "agents",
                "logs",
                "-f",
                "n1/ticker",
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            # Kill once the follow shows a tick: fleetctl's own start takes seconds on a
            # loaded machine, so a fixed pause could kill the daemon before the call began.
            assert follow.stdout is not None
            first = b""
            async with asyncio.timeout(60):
                while b"tick" not in first:
                    line = await follow.stdout.readline()
                    assert line, (first, await follow.communicate())
                    first += line
            t_kill = time.monotonic()
            daemon.kill9()
            out, err = await asyncio.wait_for(follow.communicate(), 30)
            ended_in = time.monotonic() - t_kill
            assert b"tick" in first + out, "the log was followed through the stream before the kill"
            assert follow.returncode != 0
            assert err.strip(), "the caller is told why"
            # The manager cannot tell a kill from a stop or a cut cable: the words leave all open.
            assert b"the daemon stopped or its process died, or the network to it failed" in err

            print(f"\nfollow ended {ended_in:.1f}s after the daemon died: {err.decode()[-300:]}")
            assert ended_in < KEEPALIVE + KEEPALIVE_TIMEOUT + 10

            await daemon.wait_ready(daemon.start())
            again = await eventually(
                lambda: asyncio.to_thread(
                    subprocess.run,
                    [*argv, "agents", "logs", "n1/ticker"],
                    env=env,
                    capture_output=True,
                    timeout=60,
                ),
                lambda r: r.returncode == 0,
                within=60,
                every=1.0,
            )
            assert b"tick" in again.stdout
            assert not manager.crashed()
        finally:
            if follow is not None and follow.returncode is None:
                follow.kill()
                await follow.communicate()
            daemon.stop()
            manager.stop()
            kill_marked(marker)
