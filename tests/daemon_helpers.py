"""Helpers for daemon tests: short dirs for Unix sockets, configs, mTLS clients, a TCP
proxy that can cut a connection, a small disk to fill."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from grpc import aio

from daemon.config import DaemonConfig, ManagerLinkConfig
from daemon.supervisor.spec import AgentSpec
from fleet.pki import Identity
from fleet.tls import TLSConfig, channel_credentials, channel_options

T = TypeVar("T")


@contextmanager
def short_tmp() -> Iterator[Path]:
    """A directory with a short path (Unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="fl-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def small_disk(path: Path, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path`, unmounted after (root only: skips with the
    reason otherwise, and fails under CI, as a missing PostgreSQL does)."""
    if os.geteuid() != 0:
        reason = "mounting a small tmpfs to fill needs root"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"{reason} under CI")
        pytest.skip(reason)
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Take every free byte of `directory`'s filesystem with one file (delete it to free)."""
    filler = directory / "filler"
    with filler.open("wb") as f:
        # Shrinking chunks: whatever runs there keeps writing meanwhile.
        for chunk in (1 << 20, 1 << 12):
            with contextlib.suppress(OSError):
                while True:
                    os.posix_fallocate(f.fileno(), f.seek(0, os.SEEK_END), chunk)
    return filler


def daemon_config(
    root: Path,
    tls: TLSConfig,
    agents: tuple[AgentSpec, ...],
    *,
    manager: ManagerLinkConfig | None = None,
    **kw: Any,
) -> DaemonConfig:
    """A DaemonConfig under `root` listening on 127.0.0.1:0, metrics off by default."""
    settings: dict[str, Any] = {
        "tls": tls,
        "node_id": tls.identity().name,
        "listen": "127.0.0.1:0",
        "advertise": "",
        "state_dir": root / "state",
        "run_dir": root / "run",
        "log_dir": root / "log",
        "metrics_listen": "",
        "sample_interval_seconds": 0.2,
        "manager": manager or ManagerLinkConfig(addresses=("127.0.0.1:1",)),
        "agents": agents,
    }
    settings.update(kw)
    return DaemonConfig(**settings)


def agent(agent_id: str, *argv: str, **kw: Any) -> AgentSpec:
    """An AgentSpec with quick start/stop timings for tests."""
    kw.setdefault("start_secs", 0.2)
    kw.setdefault("stop_timeout", 2.0)
    return AgentSpec(id=agent_id, argv=argv, **kw)


def client_channel(tls: TLSConfig, port: int, node_id: str, trust_domain: str) -> aio.Channel:
    """An mTLS channel to the daemon of `node_id` presenting `tls`'s identity."""
    name = Identity("node", node_id, trust_domain).server_name
    return aio.secure_channel(
        f"127.0.0.1:{port}", channel_credentials(tls), options=channel_options(name)
    )


async def eventually(
    probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], *, within: float = 15.0
) -> T:
    """Call `probe` until `ok(result)` (every 50 ms) and return that result."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s; last value: {value!r}")
        await asyncio.sleep(0.05)


class BlackholeProxy:
    """A loopback TCP proxy that can blackhole traffic (stand-in for a cut cable).

    While cut, bytes in both directions are read and thrown away and new
    connections are accepted but go nowhere: peers see silence, not a reset,
    as with a pulled cable. Mending closes the poisoned connections (their
    TLS streams lost bytes) and forwards new ones again.
    """

    def __init__(self) -> None:
        self.port = 0
        self.target_port = 0
        self.is_cut = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        """Listen on a free 127.0.0.1 port."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def cut(self) -> None:
        """Blackhole from now on."""
        self.is_cut = True

    def mend(self) -> None:
        """Forward again; drop the connections that lived through the cut."""
        self.is_cut = False
        for w in list(self._writers):
            w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                if not self.is_cut:
                    writer.write(data)
                    await writer.drain()
        writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while self.is_cut:  # a connection made during the cut hears nothing
                await asyncio.sleep(0.1)
                if reader.at_eof():
                    return
            try:
                up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                return
            self._writers.add(up_w)
            await asyncio.gather(self._pump(reader, up_w), self._pump(up_r, writer))
            self._writers.discard(up_w)
        finally:
            self._writers.discard(writer)
            writer.close()

    async def close(self) -> None:
        """Stop listening and close every connection."""
        for w in list(self._writers):
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
