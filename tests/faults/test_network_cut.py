"""A network cut between a real fleet-daemon and the manager.

The daemon runs in its own network namespace, joined to the host by a veth
pair; the manager listens on the host end. `ip link set <host end> down` cuts
the link. Without `ip netns` (or without root, or with FLEET_FAULTS_NO_NETNS=1)
a loopback TCP proxy that blackholes traffic stands in for the cable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from daemon_helpers import BlackholeProxy, short_tmp
from faultkit import DaemonProc, ManagerProc, kill_marked, marked, ticker_toml

TTL, GRACE = 1.0, 1.0  # offline after ttl * (1 + jitter 0) + grace = 2 s of silence
LIVENESS = (
    f"min_ttl_seconds = {TTL}\njitter = 0.0\ngrace_seconds = {GRACE}\n"
    "failover_grace_seconds = 0.0\nsweep_interval_seconds = 0.2\nflush_interval_seconds = 0.2\n"
)
# The unary link (heartbeats): test_control_faults.py cuts a control stream.
LINK = (
    "control_stream = false\nheartbeat_interval_seconds = 1.0\nmetrics_interval_seconds = 1.0\n"
    "rpc_timeout_seconds = 2.0\nkeepalive_time_seconds = 1.0\nkeepalive_timeout_seconds = 1.0\n"
    "[manager.reconnect]\ninitial = 0.2\nmaximum = 1.0\n"
)


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)


@dataclass
class Cable:
    """How to reach the manager from the daemon, and how to cut and mend the link."""

    manager_host: str
    """The address the manager listens on."""
    dial: Any
    """Callable(manager port) -> the host:port the daemon dials."""
    prefix: tuple[str, ...]
    """Command prefix that runs the daemon on the far side."""
    cut: Any
    """Callable: take the link down."""
    mend: Any
    """Callable: bring it back."""
    kind: str
    """'netns' or 'proxy'."""


def _netns_usable() -> bool:
    if os.environ.get("FLEET_FAULTS_NO_NETNS") or shutil.which("ip") is None:
        return False
    name = f"flprobe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", name)
    except (subprocess.CalledProcessError, OSError):
        return False
    with contextlib.suppress(subprocess.CalledProcessError):
        _ip("netns", "del", name)
    return True


@contextlib.contextmanager
def _netns_cable() -> Iterator[Cable]:
    """A namespace + veth pair in a random 10.231.x.y/30 (host .1, namespace .2); always removed."""
    tag = secrets.token_hex(3)
    ns, host_if, ns_if = f"flt{tag}", f"flh{tag}", f"fln{tag}"
    # A random /30 in 10.231.0.0/16, so concurrent runs do not share a subnet.
    block = secrets.randbelow(1 << 14) * 4
    host, peer = (
        f"10.231.{block // 256}.{block % 256 + 1}",
        f"10.231.{block // 256}.{block % 256 + 2}",
    )
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns)
        _ip("addr", "add", f"{host}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", f"{peer}/30", "dev", ns_if)
        _ip("-n", ns, "link", "set", ns_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield Cable(
            manager_host=host,
            dial=lambda port: f"{host}:{port}",
            prefix=("ip", "netns", "exec", ns),
            cut=lambda: _ip("link", "set", host_if, "down"),
            mend=lambda: _ip("link", "set", host_if, "up"),
            kind="netns",
        )
    finally:
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            _ip("link", "del", host_if)
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            _ip("netns", "del", ns)


@contextlib.asynccontextmanager
async def _cable() -> AsyncIterator[Cable]:
    if _netns_usable():
        with _netns_cable() as cable:
            yield cable
        return
    proxy = BlackholeProxy()
    await proxy.start()

    def dial(port: int) -> str:
        proxy.target_port = port
        return f"127.0.0.1:{proxy.port}"

    try:
        yield Cable("127.0.0.1", dial, (), proxy.cut, proxy.mend, "proxy")
    finally:
        await proxy.close()


async def _status(manager: ManagerProc) -> str:
    rows = await asyncio.to_thread(manager.query, "SELECT status FROM nodes WHERE node_id = 'n1'")
    return str(rows[0][0]) if rows else ""


async def _wait_status(manager: ManagerProc, want: str, within: float) -> float:
    t0 = time.monotonic()
    while (await _status(manager)) != want:
        assert time.monotonic() - t0 < within, f"node never became {want} within {within}s"
        await asyncio.sleep(0.05)
    return time.time()


async def test_network_cut_marks_offline_after_ttl_grace_and_recovers_alone(
    pki: Any, tmp_path: Any
) -> None:
    """Link down: offline after ttl + grace, agents untouched; link up: online again by itself."""
    marker = f"fltmark-{secrets.token_hex(4)}"
    async with _cable() as cable:
        manager = ManagerProc(
            tmp_path / "m",
            pki.issue("manager", "m1", ips=(cable.manager_host,)),
            listen_host=cable.manager_host,
            liveness=LIVENESS,
        )
        address = cable.dial(manager.port)
        with short_tmp() as root:
            daemon = DaemonProc(
                root,
                pki.issue("node", "n1"),
                body=f'[manager]\naddresses = ["{address}"]\n{LINK}'
                + ticker_toml("ticker", marker, 0.2),
            )
            manager.start()
            try:
                await manager.wait_serving()
                await daemon.wait_ready(daemon.start(cable.prefix))
                await _wait_status(manager, "online", 60)
                await asyncio.sleep(2.0)  # steady heartbeats
                agents = marked(marker)
                assert len(agents) == 1

                t_cut = time.time()
                await asyncio.to_thread(cable.cut)
                t_offline = await _wait_status(manager, "offline", 30)
                detection = t_offline - t_cut
                assert marked(marker) == agents, "the agent keeps running through the cut"
                await asyncio.sleep(2.0)
                assert await _status(manager) == "offline"

                t_mend = time.time()
                await asyncio.to_thread(cable.mend)
                t_online = await _wait_status(manager, "online", 60)
                recovery = t_online - t_mend
                assert marked(marker) == agents
                assert daemon.popen is not None
                assert daemon.popen.poll() is None
                events = await asyncio.to_thread(
                    manager.query,
                    "SELECT kind FROM events WHERE node_id = 'n1' AND kind IN "
                    "('NODE_OFFLINE', 'NODE_ONLINE') AND ts_ms >= ? ORDER BY id",
                    int(t_cut * 1000) - 1000,
                )
                assert [k for (k,) in events] == ["NODE_OFFLINE", "NODE_ONLINE"]
                assert not manager.crashed()
            finally:
                daemon.stop()
                manager.stop()
                kill_marked(marker)
    bound = TTL + GRACE
    print(
        f"\nnetwork cut ({cable.kind}): offline {detection:.2f}s after the cut "
        f"(ttl + grace = {bound:.1f}s, last heartbeat up to {TTL:.1f}s before the cut, "
        f"sweep every 0.2s); back online {recovery:.2f}s after the link returned"
    )
    # Offline no earlier than grace after the cut (the last beat may be a ttl old),
    # and no later than ttl + grace plus the sweep/flush intervals and some load slack.
    assert GRACE - 0.1 <= detection <= bound + 2.0
    assert recovery < 15.0
