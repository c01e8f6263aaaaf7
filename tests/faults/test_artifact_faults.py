"""kill -9 the manager in the middle of an artifact download, and of an upload.

The manager is a real process (the same ManagerServer as `fleet-manager
serve`, started by a small script because the node's assignment must be
injected until the desired-state tables exist: every node may download).
A download cut by the crash resumes from the daemon's partial file once the
manager is back; an upload cut by the crash never becomes visible, and the
janitor removes the chunks it staged.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from faultkit import REPO, ManagerProc, eventually

sys.path.insert(0, str(REPO / "tests" / "integration"))
from artifact_helpers import push, push_requests, sync_operator  # path above

from daemon.artifacts import ArtifactCache, ArtifactUnavailable
from daemon.config import ManagerLinkConfig
from daemon.manager_link import ManagerLink, NodeInfo
from fleet.artifacts import CHUNK_SIZE, ArtifactRef
from fleet.retry import Backoff
from fleet.v1 import fleet_pb2

SERVE = """
import asyncio, sys
from fleet.config import load_config
from fleet.service import run_until_signalled
from manager.config import ENV_PREFIX, ManagerConfig
from manager.server import ManagerServer

class EveryNode:
    async def may_download(self, node_id, digest):
        return True

async def main():
    config = load_config(ManagerConfig, sys.argv[1], env_prefix=ENV_PREFIX)
    server = ManagerServer(config, artifact_access=EveryNode())
    await run_until_signalled(server.start, server.stop, grace=1.0)

asyncio.run(main())
"""


class ArtifactManager(ManagerProc):
    """The manager process, serving downloads to every node."""

    def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"--- start {self.starts} ---\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                [sys.executable, "-c", SERVE, str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )


@pytest.fixture
def manager(pki: Any, tmp_path: Path) -> Iterator[ArtifactManager]:
    """A started manager whose abandoned uploads expire after 1 s."""
    proc = ArtifactManager(
        tmp_path / "m",
        pki.issue("manager", "m1", ips=("127.0.0.1",)),
        extra="[artifacts]\nstale_upload_seconds = 1.0\ncleanup_interval_seconds = 0.5\n",
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def cache(pki: Any, tmp_path: Path, address: str) -> ArtifactCache:
    link = ManagerLink(
        ManagerLinkConfig(addresses=(address,), rpc_timeout_seconds=5),
        tls=pki.issue("node", "n1"),
        trust_domain=pki.trust_domain,
        node=NodeInfo(node_id="n1", daemon_address="", labels={}),
        state_dir=tmp_path,
        collect=list,
        snapshot=list,
    )
    return ArtifactCache(
        tmp_path / "daemon" / "artifacts",
        link.download_artifact,
        attempts=2,
        backoff=Backoff(initial=0.05, maximum=0.1),
    )


async def test_a_download_cut_by_a_manager_crash_resumes(
    pki: Any, tmp_path: Path, manager: ArtifactManager
) -> None:
    """kill -9 at a third of the download: unavailable, bytes kept; after restart, only the rest."""
    data = random.Random(9).randbytes(32 * CHUNK_SIZE)
    await manager.wait_serving()
    with sync_operator(pki, manager.port) as stub:
        reply = await asyncio.to_thread(push, stub, data, "agent", "3.1")
    ref = ArtifactRef("agent", "3.1", reply.artifact.digest, len(data))
    daemon = cache(pki, tmp_path, manager.address)

    def crash_at_a_third(done: int, total: int) -> None:
        if done >= total // 3 and manager.alive:
            manager.kill9()

    with pytest.raises(ArtifactUnavailable, match="the next attempt resumes from there"):
        await daemon.ensure(ref, progress=crash_at_a_third)
    kept = daemon.downloaded(ref)
    print(f"\nmanager killed after {kept / CHUNK_SIZE:.0f} of 32 MiB reached the daemon")
    assert len(data) // 3 <= kept < len(data)

    manager.start()
    await manager.wait_serving()
    offsets: list[int] = []
    path = await daemon.ensure(ref, progress=lambda done, _: offsets.append(done))
    assert offsets[0] == kept + CHUNK_SIZE
    assert await asyncio.to_thread(path.read_bytes) == data
    assert not manager.crashed()


async def test_an_upload_cut_by_a_manager_crash_leaves_nothing(
    pki: Any, tmp_path: Path, manager: ArtifactManager
) -> None:
    """kill -9 mid-upload: after restart no artifact is visible and the staged chunks expire."""
    data = random.Random(10).randbytes(16 * CHUNK_SIZE)
    await manager.wait_serving()

    def crashing() -> Iterator[fleet_pb2.FleetServicePushArtifactRequest]:
        for i, request in enumerate(push_requests(data, "agent", "4")):
            if i == 8:
                # Kill once something is staged (on a busy machine the first chunks may
                # still be on their way): the point is what a restart does with it.
                deadline = time.monotonic() + 20
                while manager.query("SELECT count(*) FROM artifact_chunks")[0][0] == 0:
                    assert time.monotonic() < deadline, "no chunk was staged within 20 s"
                    time.sleep(0.02)
                os.kill(manager.popen.pid, signal.SIGKILL)  # type: ignore[union-attr]
            yield request

    def upload() -> None:
        with sync_operator(pki, manager.port) as stub:
            stub.PushArtifact(crashing(), timeout=30)

    with pytest.raises(grpc.RpcError) as cut:
        await asyncio.to_thread(upload)
    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    manager.popen.wait(30)  # type: ignore[union-attr]
    staged = manager.query("SELECT count(*) FROM artifact_chunks")[0][0]
    print(f"\n{staged} chunk(s) staged when the manager died")
    assert staged >= 1

    manager.start()
    await manager.wait_serving()
    assert manager.query("SELECT count(*) FROM artifacts")[0][0] == 0

    async def left() -> int:
        return int(manager.query("SELECT count(*) FROM artifact_chunks")[0][0])

    await eventually(left, lambda n: n == 0, within=30)
    assert manager.query("SELECT count(*) FROM artifact_blobs")[0][0] == 0
