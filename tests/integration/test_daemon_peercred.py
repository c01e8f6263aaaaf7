"""The agent socket's front door identifies the connecting process (SO_PEERCRED)."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from daemon.peercred import PeerCredProxy, PeerInfo


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (Unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="fl-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class _Recorder(health_pb2_grpc.HealthServicer):
    def __init__(self, proxy: PeerCredProxy) -> None:
        self.proxy = proxy
        self.seen: list[PeerInfo | None] = []

    async def Check(self, request: Any, context: Any) -> health_pb2.HealthCheckResponse:
        self.seen.append(self.proxy.lookup(context.peer()))
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
async def served(short_dir: Path) -> AsyncIterator[tuple[PeerCredProxy, _Recorder]]:
    """A PeerCredProxy in front of a real gRPC server that records who called."""
    private = short_dir / "private"
    private.mkdir(mode=0o700)
    proxy = PeerCredProxy(short_dir / "agent.sock", private / "grpc.sock")
    recorder = _Recorder(proxy)
    server = aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(recorder, server)
    server.add_insecure_port(f"unix:{proxy.upstream_path}")
    await server.start()
    await proxy.start()
    yield proxy, recorder
    await proxy.stop()
    await server.stop(None)


_CLIENT = """
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel("unix:" + sys.argv[1]) as ch:
    health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
print("ok")
"""


async def _run_client(path: Path) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _CLIENT, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


async def test_a_child_process_is_identified_by_its_pid(
    served: tuple[PeerCredProxy, _Recorder],
) -> None:
    """A call from another process through the public socket maps to that process's pid and uid."""
    proxy, recorder = served
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CLIENT, str(proxy.public_path), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert out.strip() == b"ok"
    assert len(recorder.seen) == 1
    info = recorder.seen[0]
    assert info is not None
    assert info.pid == proc.pid
    assert info.uid == os.getuid()
    assert info.create_time > 0
    assert not info.still_same_process()  # it exited: its pid is no longer trusted


async def test_public_socket_is_group_writable_only(
    served: tuple[PeerCredProxy, _Recorder],
) -> None:
    """The agent socket has mode 0660 (owner and group may connect, others may not)."""
    proxy, _ = served
    mode = os.stat(proxy.public_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660


async def test_a_direct_connection_to_grpc_is_not_identified(
    served: tuple[PeerCredProxy, _Recorder],
) -> None:
    """A caller that bypasses the proxy (if it could reach the private socket) gets no identity."""
    proxy, recorder = served
    await _run_client(proxy.upstream_path)
    assert recorder.seen == [None]
    assert proxy.connections == 0
