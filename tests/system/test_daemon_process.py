"""`fleet-daemon` as a real process: READY, /metrics, SIGHUP reload, SIGTERM + re-adoption."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from daemon_helpers import client_channel, eventually, short_tmp

from fleet.pki import CertificateAuthority
from fleet.tls import TLSConfig
from fleet.v1 import common_pb2, daemon_pb2, daemon_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
DAEMON = [sys.executable, "-m", "daemon.cli"]
RUNNING = common_pb2.AGENT_STATUS_RUNNING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    path: Path, root: Path, tls: TLSConfig, port: int, mport: int, agents: str
) -> None:
    path.write_text(
        f"""
listen = "127.0.0.1:{port}"
state_dir = "{root}/state"
run_dir = "{root}/run"
log_dir = "{root}/log"
metrics_listen = "127.0.0.1:{mport}"
sample_interval_seconds = 0.2
[tls]
ca_file = "{tls.ca_file}"
cert_file = "{tls.cert_file}"
key_file = "{tls.key_file}"
[manager]
addresses = ["127.0.0.1:1"]
{agents}
"""
    )


def agents_toml(**argv: str) -> str:
    return "".join(
        f'[[agents]]\nid = "{aid}"\nargv = {cmd}\nstart_secs = 0.2\nstop_timeout = 2.0\n'
        for aid, cmd in argv.items()
    )


@dataclass
class Proc:
    """A running fleet-daemon and what it needs."""

    root: Path
    config: Path
    port: int
    mport: int
    notify: socket.socket
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "NOTIFY_SOCKET": self.notify.getsockname(), "PYTHONPATH": str(REPO)}
        with open(self.root / "daemon.err", "ab") as err:  # the child keeps its own fd
            self.popen = subprocess.Popen(
                [*DAEMON, "--config", str(self.config)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def wait_ready(self, timeout: float = 30) -> None:
        self.notify.settimeout(timeout)
        while True:
            data = self.notify.recv(4096).decode()
            if "READY=1" in data:
                return

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)


@pytest.fixture
def proc(pki: Any) -> Iterator[Proc]:
    """A configured (not yet started) fleet-daemon with two agents; everything cleaned up after."""
    with short_tmp() as root:
        tls = pki.issue("node", "n1")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(root / "notify"))
        p = Proc(root, root / "daemon.toml", free_port(), free_port(), notify)
        write_config(
            p.config,
            root,
            tls,
            p.port,
            p.mport,
            agents_toml(a='["sleep", "1001"]', b='["sleep", "1002"]'),
        )
        try:
            yield p
        finally:
            if p.popen is not None and p.popen.poll() is None:
                p.popen.kill()
                p.popen.wait()
            # Agents outlive the daemon on purpose; clean them up by their marker args.
            for pr in psutil.process_iter(["cmdline"]):
                cmd = pr.info["cmdline"] or []
                if cmd[:1] == ["sleep"] and cmd[1:2] and cmd[1].startswith("100"):
                    pr.kill()
            notify.close()


@pytest.fixture
async def manager_stub(pki: Any, proc: Proc) -> AsyncIterator[daemon_pb2_grpc.DaemonServiceStub]:
    """A manager/m client for the daemon under test."""
    async with client_channel(pki.issue("manager", "m"), proc.port, "n1", pki.trust_domain) as ch:
        yield daemon_pb2_grpc.DaemonServiceStub(ch)


async def _running(stub: daemon_pb2_grpc.DaemonServiceStub, n: int) -> dict[str, int]:
    async def probe() -> dict[str, int]:
        try:
            reply = await stub.ListAgents(daemon_pb2.ListAgentsRequest(), timeout=5)
        except Exception:
            return {}
        return {a.id: a.pid for a in reply.agents if a.status == RUNNING}

    return await eventually(probe, lambda r: len(r) == n, within=30)


def _sleepers(marker: str) -> list[int]:
    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if (p.info["cmdline"] or [])[:2] == ["sleep", marker]
    ]


async def test_ready_metrics_and_sigterm_leaves_agents_then_readopts(
    proc: Proc, manager_stub: daemon_pb2_grpc.DaemonServiceStub
) -> None:
    """READY=1 is sent; SIGTERM exits 0 leaving agents up; a new daemon re-adopts the same pids."""
    proc.start()
    await asyncio.to_thread(proc.wait_ready)
    first = await _running(manager_stub, 2)
    # The manager's call was authorised from gRPC's auth context and the TLS files were
    # checked in a child: the serving daemon never loaded cryptography (~13 MiB of RSS).
    assert proc.popen is not None
    maps = await asyncio.to_thread(Path(f"/proc/{proc.popen.pid}/maps").read_text)
    assert "cryptography" not in maps

    body = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{proc.mport}/metrics", timeout=10).read()
    )
    assert b'fleet_daemon_agents{state="RUNNING"} 2.0' in body
    assert b'fleet_daemon_manager_link_state{state="connected"} 0.0' in body

    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait) == 0
    assert all(psutil.pid_exists(pid) for pid in first.values()), "agents must survive SIGTERM"

    proc.start()
    await asyncio.to_thread(proc.wait_ready)
    again = await _running(manager_stub, 2)
    assert again == first, "re-adopted with the same pids"
    assert _sleepers("1001") == [first["a"]], "no second copy was started"


async def test_sighup_restarts_changed_agents_only(
    proc: Proc, manager_stub: daemon_pb2_grpc.DaemonServiceStub
) -> None:
    """After editing the file and SIGHUP: changed agent restarted, unchanged kept, new one added."""
    proc.start()
    await asyncio.to_thread(proc.wait_ready)
    before = await _running(manager_stub, 2)
    text = proc.config.read_text()
    text = text.replace('argv = ["sleep", "1002"]', 'argv = ["sleep", "1003"]')
    text += agents_toml(c='["sleep", "1004"]')
    proc.config.write_text(text)
    proc.signal(signal.SIGHUP)
    after = await _running(manager_stub, 3)
    assert after["a"] == before["a"]
    assert after["b"] != before["b"]
    assert not psutil.pid_exists(before["b"]) or psutil.Process(before["b"]).status() == "zombie"
    assert "c" in after

    # A broken file on SIGHUP changes nothing and the daemon keeps running.
    proc.config.write_text(text + "\nnot toml [[[\n")
    proc.signal(signal.SIGHUP)
    await asyncio.sleep(1.0)
    assert proc.popen is not None
    assert proc.popen.poll() is None
    assert await _running(manager_stub, 3) == after
    err = (proc.root / "daemon.err").read_text()
    assert "reload refused, nothing changed" in err


def _run_until_exit(cfg: Path) -> subprocess.CompletedProcess[str]:
    """Run fleet-daemon with `cfg`, expecting it to exit on its own (a refused config)."""
    return subprocess.run(
        [*DAEMON, "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    """A config error prints one line naming the file and key, and exits 2 without a traceback."""
    cfg = tmp_path / "daemon.toml"
    cfg.write_text('listen = "127.0.0.1:1"\nbogus_key = 1\n')
    result = _run_until_exit(cfg)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(cfg) in lines[0]
    assert "bogus_key: unknown key" in lines[0]


def test_certificate_from_another_ca_exits_2_with_one_line(pki: Any, tmp_path: Path) -> None:
    """The TLS check (run in a child process) reports a foreign certificate in one line, exit 2."""
    own = pki.issue("node", "n1")
    foreign = CertificateAuthority.create().issue("node", "n1").write(tmp_path / "foreign")
    tls = TLSConfig(own.ca_file, foreign.cert_file, foreign.key_file)
    cfg = tmp_path / "daemon.toml"
    write_config(cfg, tmp_path, tls, free_port(), free_port(), "")
    result = _run_until_exit(cfg)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{foreign.cert_file}: not signed by the CA in {own.ca_file}" in lines[0]
