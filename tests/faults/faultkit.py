"""Helpers for the fault tests: real manager processes, ports, database reads, waiting."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from grpc import aio

from fleet.tls import TLSConfig, channel_credentials, channel_options
from fleet.v1 import fleet_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
"""libfaketime (Debian's `faketime`, installed by `make test-tools`)."""


def require_faketime(cannot: str) -> None:
    """Skip the calling test without libfaketime (`cannot`: what it then cannot do), but
    fail under CI, where `make test` installs it."""
    import pytest

    if FAKETIME.exists():
        return
    reason = (
        f"libfaketime is not installed ({FAKETIME}): run `make test-tools`"
        f" (apt-get install faketime, as root); {cannot}"
    )
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"this test needs libfaketime under CI: {reason}", pytrace=False)
    pytest.skip(reason)


T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def operator_stub(
    operator: TLSConfig, m: ManagerProc, domain: str
) -> AsyncIterator[fleet_pb2_grpc.FleetServiceStub]:
    """A FleetService stub on `m` as `operator` (mTLS, the manager's name in `domain`)."""
    async with aio.secure_channel(
        m.address, channel_credentials(operator), options=channel_options(f"manager.{domain}")
    ) as channel:
        yield fleet_pb2_grpc.FleetServiceStub(channel)


class ManagerProc:
    """`fleet-manager serve` as a child process; restartable on the same port and database."""

    def __init__(
        self,
        root: Path,
        tls: TLSConfig,
        *,
        database_url: str = "",
        listen_host: str = "127.0.0.1",
        liveness: str = "",
        extra: str = "",
        cluster: str | None = None,
    ) -> None:
        """`cluster`: [cluster] keys besides advertise_address, which is set to this
        manager's address (None: no [cluster] table, a single manager)."""
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = free_port(listen_host)
        self.metrics_port = free_port()
        self.address = f"{listen_host}:{self.port}"
        self.log = root / "manager.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        url = database_url or f"sqlite+aiosqlite:///{root / 'state' / 'manager.db'}"
        self.database_url = url
        self.config = root / "manager.toml"
        cluster_table = (
            ""
            if cluster is None
            else f'[cluster]\nadvertise_address = "{self.address}"\n{cluster}\n'
        )
        self.config.write_text(
            f'state_dir = "{root / "state"}"\n'
            f'[server]\nlisten = "{self.address}"\n'
            f'metrics_listen = "127.0.0.1:{self.metrics_port}"\nshutdown_grace_seconds = 2.0\n'
            f'[tls]\nca_file = "{tls.ca_file}"\ncert_file = "{tls.cert_file}"\n'
            f'key_file = "{tls.key_file}"\n'
            f'[database]\nurl = "{url}"\n'
            f"[liveness]\n{liveness}\n"
            '[logging]\nlevel = "info"\n'
            f"{extra}\n{cluster_table}"
        )

    @property
    def db(self) -> Path:
        """The SQLite file (SQLite managers only)."""
        return Path(self.database_url.split(":///", 1)[1])

    def start(
        self, *, pythonpath: Sequence[Path] = (), env: Mapping[str, str] | None = None
    ) -> None:
        """Start the process (appending to its log); `pythonpath` goes before the
        repository on its import path (a test's `sitecustomize` hook), `env` is added."""
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"--- start {self.starts} ---\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "manager.cli", "serve", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    **(env or {}),
                    "PYTHONPATH": os.pathsep.join(map(str, [*pythonpath, REPO])),
                },
            )

    @property
    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen is not None and self.popen.poll() is None

    async def wait_serving(self, limit: float = 60) -> float:
        """Seconds until /metrics answers (it starts after the gRPC server is serving)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            if not self.alive:
                raise AssertionError(f"manager exited: {self.log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.scrape)
                return time.monotonic() - t0
            await asyncio.sleep(0.1)
        raise AssertionError(f"manager did not start: {self.log.read_text()[-3000:]}")

    def scrape(self) -> dict[str, float]:
        """The manager's /metrics as {sample: value}."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def kill9(self) -> None:
        """SIGKILL, as a crash: nothing is flushed or closed."""
        assert self.popen is not None
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(30)

    def stop(self) -> None:
        """SIGTERM (then SIGKILL) if still running (test cleanup)."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def crashed(self) -> bool:
        """Whether the log shows a Python traceback."""
        return "Traceback" in self.log.read_text()

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows from the SQLite database, read-only."""
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()


async def eventually(
    probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], *, within: float, every: float = 0.1
) -> T:
    """Call `probe` until `ok(result)`; AssertionError with the last value after `within` s."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s; last value: {value!r}")
        await asyncio.sleep(every)


class DaemonProc:
    """`fleet-daemon` as a child process with a NOTIFY_SOCKET to see READY=1."""

    def __init__(
        self, root: Path, tls: TLSConfig, *, body: str, manager: str = "127.0.0.1:1"
    ) -> None:
        self.root = root
        self.port = free_port()
        self.config = root / "daemon.toml"
        self.log = root / "daemon.err"
        self.notify_path = root / "notify"
        self.popen: subprocess.Popen[bytes] | None = None
        manager_table = "" if "[manager]" in body else f'[manager]\naddresses = ["{manager}"]\n'
        self.config.write_text(
            f'listen = "127.0.0.1:{self.port}"\n'
            f'state_dir = "{root}/state"\nrun_dir = "{root}/run"\nlog_dir = "{root}/log"\n'
            'metrics_listen = ""\nsample_interval_seconds = 0.5\n'
            f'[tls]\nca_file = "{tls.ca_file}"\ncert_file = "{tls.cert_file}"\n'
            f'key_file = "{tls.key_file}"\n{manager_table}{body}\n'
        )

    def start(
        self, prefix: Sequence[str] = (), *, env: Mapping[str, str] | None = None
    ) -> socket.socket:
        """Start it (optionally under `prefix`, e.g. ip netns exec; `env` added to its
        environment, e.g. libfaketime's); returns the notify socket."""
        with contextlib.suppress(FileNotFoundError):
            self.notify_path.unlink()
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(self.notify_path))
        env = {
            **os.environ,
            **(env or {}),
            "NOTIFY_SOCKET": str(self.notify_path),
            "PYTHONPATH": str(REPO),
        }
        with self.log.open("ab") as err:
            self.popen = subprocess.Popen(
                [*prefix, sys.executable, "-m", "daemon.cli", "--config", str(self.config)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        return notify

    async def wait_ready(self, notify: socket.socket, limit: float = 60) -> None:
        """Wait for READY=1 (closes the notify socket)."""
        notify.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(limit):
                while "READY=1" not in (await loop.sock_recv(notify, 4096)).decode():
                    pass
        except TimeoutError:
            raise AssertionError(f"daemon not ready: {self.log.read_text()[-3000:]}") from None
        finally:
            notify.close()

    def kill9(self) -> None:
        """SIGKILL the daemon process only (agents are in their own process groups)."""
        assert self.popen is not None
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(30)

    def stop(self) -> None:
        """SIGKILL if still running (test cleanup; agents are cleaned up by marker)."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def marked(marker: str, *, roots: bool = True) -> list[int]:
    """Pids of processes with `marker` as an argv element.

    With `roots`, only those whose parent does not carry it: a shell's
    short-lived subshells (``$(...)``) share its argv but are not a second copy.
    """
    import psutil

    found: dict[int, int] = {}
    for p in psutil.process_iter(["cmdline", "ppid"]):
        with contextlib.suppress(psutil.Error):
            if marker in (p.info["cmdline"] or []):
                found[p.pid] = p.info["ppid"]
    return sorted(pid for pid, ppid in found.items() if not roots or ppid not in found)


def kill_marked(marker: str) -> None:
    """SIGKILL every process carrying `marker` (agents outlive their daemon on purpose)."""
    for pid in marked(marker, roots=False):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def ticker_toml(agent_id: str, marker: str, period: float) -> str:
    """An [[agents]] entry printing 'started' once, then 'tick <epoch s>' every `period`."""
    script = f"echo started $$; while true; do echo tick $(date +%s.%N); sleep {period}; done"
    return (
        f'[[agents]]\nid = "{agent_id}"\nargv = ["/bin/sh", "-c", "{script}", "{marker}"]\n'
        "start_secs = 0.2\nstop_timeout = 2.0\n"
    )
