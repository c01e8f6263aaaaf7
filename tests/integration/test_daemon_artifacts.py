"""The daemon's artifact cache against a real manager serving DownloadArtifact over mTLS.

Downloads go through the daemon's real ManagerLink (its own channel, the
node's certificate); the manager decides with an injected assignment policy
(`Grants`). Interrupted downloads resume from the partial file, damaged
caches are fetched again, and every refusal says why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import socket
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from artifact_helpers import Grants, digest, push, sync_operator, tar_bytes, zip_bytes
from manager_harness import FakeClock, manager_config
from sqlalchemy import update

from daemon.artifacts import (
    ArtifactCache,
    ArtifactTooLarge,
    ArtifactUnavailable,
    CacheLimits,
    DigestMismatch,
    ManagerRefused,
    UnpackFailed,
    substitute,
)
from daemon.config import ManagerLinkConfig
from daemon.manager_link import ManagerLink, NodeInfo
from fleet.agentspec import AgentSpec
from fleet.artifacts import CHUNK_SIZE, ArtifactRef
from fleet.retry import Backoff
from manager.server import ManagerServer
from manager.storage.schema import artifact_chunks

FAST = Backoff(initial=0.01, maximum=0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Env:
    """A manager (restartable on its port), node n1's link to it, and n1's cache."""

    pki: Any
    tmp: Path
    port: int
    grants: Grants
    manager: ManagerServer | None = None
    link: ManagerLink | None = None
    progress: list[tuple[int, int]] = field(default_factory=list)

    def config(self) -> Any:
        cfg = manager_config(
            self.pki, f"sqlite+aiosqlite:///{self.tmp / 'm.db'}", self.tmp / "state"
        )
        # No /metrics: its shutdown polls for 0.5 s, and a stop must cut the stream at once.
        server = dataclasses.replace(cfg.server, listen=f"127.0.0.1:{self.port}", metrics_listen="")
        return dataclasses.replace(cfg, server=server)

    async def start_manager(self) -> ManagerServer:
        self.manager = ManagerServer(self.config(), clock=FakeClock(), artifact_access=self.grants)
        await self.manager.start()
        return self.manager

    async def stop_manager(self) -> None:
        if self.manager is not None:
            await self.manager.stop(0)
            self.manager = None

    async def push(self, data: bytes, name: str = "web", version: str = "1.0") -> ArtifactRef:
        """Push `data`, assign it to n1, and return the ref a pushed spec would carry."""
        assert self.manager is not None
        with sync_operator(self.pki, self.manager.port) as stub:
            reply = await asyncio.to_thread(push, stub, data, name, version)
        self.grants.allow("n1", reply.artifact.digest)
        return ArtifactRef(name, version, reply.artifact.digest, reply.artifact.size_bytes)

    def cache(self, **limits: Any) -> ArtifactCache:
        """n1's cache under tmp/state/artifacts (a new one is a restarted daemon)."""
        if self.link is None:
            self.link = ManagerLink(
                ManagerLinkConfig(addresses=(f"127.0.0.1:{self.port}",), rpc_timeout_seconds=5),
                tls=self.pki.issue("node", "n1"),
                trust_domain=self.pki.trust_domain,
                node=NodeInfo(node_id="n1", daemon_address="", labels={}),
                state_dir=self.tmp,
                collect=list,
                snapshot=list,
            )
        return ArtifactCache(
            self.tmp / "daemon" / "artifacts",
            self.link.download_artifact,
            CacheLimits(**limits),
            attempts=2,
            backoff=FAST,
        )

    def record(self, done: int, total: int) -> None:
        self.progress.append((done, total))


@asynccontextmanager
async def artifact_env(pki: Any, tmp_path: Path) -> AsyncIterator[Env]:
    env = Env(pki, tmp_path, free_port(), Grants())
    await env.start_manager()
    try:
        yield env
    finally:
        await env.stop_manager()


def noise(size: int, seed: int = 1) -> bytes:
    """Incompressible bytes (so archives of them are as large as they say)."""
    return random.Random(seed).randbytes(size)


async def test_an_archive_is_fetched_verified_unpacked_and_then_reused(
    pki: Any, tmp_path: Path
) -> None:
    """A tar.gz becomes a directory `{artifact}` points at; the next ensure fetches nothing."""
    archive = tar_bytes({"bin/web.sh": b"#!/bin/sh\nexec sleep 1\n", "conf/app.toml": b"x=1"})
    async with artifact_env(pki, tmp_path) as env:
        ref = await env.push(archive)
        cache = env.cache()
        path = await cache.ensure(ref, progress=env.record)
        assert path == tmp_path / "daemon" / "artifacts" / ref.digest.removeprefix("sha256:")
        assert (path / "conf" / "app.toml").read_bytes() == b"x=1"
        assert os.access(path / "bin" / "web.sh", os.X_OK)
        assert env.progress[-1] == (len(archive), len(archive))

        env.progress.clear()
        assert await cache.ensure(ref, progress=env.record) == path
        assert env.progress == []  # checked against its manifest, not fetched again

        spec = AgentSpec(
            id="web",
            argv=("{artifact}/bin/web.sh", "--config", "{artifact}/conf/app.toml"),
            cwd="{artifact}",
            env={"WEB_HOME": "{artifact}", "OTHER": "x"},
        )
        ready = substitute(spec, path)
        assert ready.argv == (f"{path}/bin/web.sh", "--config", f"{path}/conf/app.toml")
        assert (ready.cwd, ready.env) == (str(path), {"WEB_HOME": str(path), "OTHER": "x"})


async def test_a_single_file_is_the_path_itself(pki: Any, tmp_path: Path) -> None:
    """A file that is no archive is placed as <digest>/<name>, executable."""
    program = b"#!/bin/sh\necho hello\n"
    async with artifact_env(pki, tmp_path) as env:
        ref = await env.push(program, "hello", "2")
        path = await env.cache().ensure(ref)
        assert path.name == "hello"
        assert path.read_bytes() == program
        assert stat.S_IMODE(path.stat().st_mode) == 0o755


async def test_a_zip_is_unpacked(pki: Any, tmp_path: Path) -> None:
    """Zip archives work like tar ones."""
    async with artifact_env(pki, tmp_path) as env:
        ref = await env.push(zip_bytes({"plugin/main.py": b"print(1)"}), "plugin", "1")
        path = await env.cache().ensure(ref)
        assert (path / "plugin" / "main.py").read_bytes() == b"print(1)"


async def test_a_download_cut_half_way_resumes_after_a_daemon_restart(
    pki: Any, tmp_path: Path
) -> None:
    """The daemon stops mid-download; the next daemon asks only for the rest."""
    data = noise(5 * CHUNK_SIZE)
    async with artifact_env(pki, tmp_path) as env:
        ref = await env.push(data, "big", "1")
        first = env.cache()
        task = asyncio.current_task()
        assert task is not None

        def stop_half_way(done: int, total: int) -> None:
            if done >= total // 2:
                raise asyncio.CancelledError  # the daemon is stopped here

        with pytest.raises(asyncio.CancelledError):
            await first.ensure(ref, progress=stop_half_way)
        kept = first.downloaded(ref)
        assert 2 * CHUNK_SIZE <= kept < len(data)
        assert first.waiting_message(ref) == (
            f"waiting for artifact big 1 ({kept / CHUNK_SIZE:.1f} MiB of 5.0 MiB)"
        )

        path = await env.cache().ensure(ref, progress=env.record)
        assert env.progress[0][0] == kept + CHUNK_SIZE  # its first piece starts where it stopped
        assert path.read_bytes() == data


async def test_a_download_cut_by_the_manager_resumes_when_it_returns(
    pki: Any, tmp_path: Path
) -> None:
    """The manager goes away mid-stream: unavailable, bytes kept; after its restart, resumed."""
    data = noise(32 * CHUNK_SIZE, seed=2)  # more than gRPC keeps in flight
    async with artifact_env(pki, tmp_path) as env:
        ref = await env.push(data, "big", "1")
        cache = env.cache()
        stopping: list[asyncio.Task[None]] = []

        def cut_half_way(done: int, total: int) -> None:
            if done >= total // 2 and not stopping:
                stopping.append(asyncio.create_task(env.stop_manager()))

        with pytest.raises(ArtifactUnavailable) as caught:
            await cache.ensure(ref, progress=cut_half_way)
        await stopping[0]
        kept = cache.downloaded(ref)
        assert CHUNK_SIZE <= kept < len(data)
        assert "the next attempt resumes from there" in str(caught.value)
        assert str(caught.value).startswith("artifact big 1: ")

        await env.start_manager()
        path = await cache.ensure(ref, progress=env.record)
        assert env.progress[0][0] == kept + CHUNK_SIZE
        assert path.read_bytes() == data


async def test_a_damaged_cache_is_noticed_and_fetched_again(
    pki: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A changed file, a deleted file, an added file: each is found before use and refetched."""
    archive = tar_bytes({"bin/run": b"#!/bin/sh\n", "data/big": noise(300_000)})
    async with artifact_env(pki, tmp_path) as env:
        ref = await env.push(archive)
        cache = env.cache()
        path = await cache.ensure(ref)
        for damage in (
            lambda: (path / "data" / "big").write_bytes(b"\0" * 300_000),
            lambda: (path / "bin" / "run").unlink(),
            lambda: (path / "bin" / "dropped-in").write_text("surprise"),
        ):
            damage()
            env.progress.clear()
            assert await cache.ensure(ref, progress=env.record) == path
            assert env.progress[-1] == (len(archive), len(archive))  # downloaded again
            assert (path / "bin" / "run").read_bytes() == b"#!/bin/sh\n"
            assert not (path / "bin" / "dropped-in").exists()
        assert "the cached copy is damaged" in caplog.text


async def test_a_digest_mismatch_is_refused_with_the_reason(pki: Any, tmp_path: Path) -> None:
    """Bytes the manager serves that do not hash to the spec's digest are refused, kept nowhere."""
    data = noise(2 * CHUNK_SIZE + 10, seed=3)
    async with artifact_env(pki, tmp_path) as env:
        ref = await env.push(data)
        assert env.manager is not None
        async with env.manager.db.engine.begin() as conn:  # the manager's copy rots
            await conn.execute(
                update(artifact_chunks)
                .where(artifact_chunks.c.idx == 1)
                .values(data=b"\xff" * CHUNK_SIZE)
            )
        cache = env.cache()
        with pytest.raises(DigestMismatch) as caught:
            await cache.ensure(ref)
        message = str(caught.value)
        assert message.startswith("artifact web 1.0: digest mismatch: ")
        assert ref.digest in message
        assert digest(data[:CHUNK_SIZE] + b"\xff" * CHUNK_SIZE + data[-10:]) in message
        assert cache.downloaded(ref) == 0
        assert list((tmp_path / "daemon" / "artifacts").glob("*.json")) == []


async def test_a_damaged_partial_file_is_downloaded_again_from_the_start(
    pki: Any, tmp_path: Path
) -> None:
    """A kept part with wrong bytes fails the digest once; the retry from byte 0 succeeds."""
    data = noise(3 * CHUNK_SIZE, seed=4)
    async with artifact_env(pki, tmp_path) as env:
        ref = await env.push(data)
        part = tmp_path / "daemon" / "artifacts" / "partial" / ref.digest.removeprefix("sha256:")
        part.parent.mkdir(parents=True)
        part.write_bytes(b"\0" * CHUNK_SIZE)  # a power cut left zeros behind
        path = await env.cache().ensure(ref)
        assert path.read_bytes() == data


async def test_a_wrong_size_in_the_spec_is_refused(pki: Any, tmp_path: Path) -> None:
    """The manager's size differs from the spec's: refused naming both."""
    async with artifact_env(pki, tmp_path) as env:
        ref = await env.push(b"twelve bytes")
        wrong = dataclasses.replace(ref, size_bytes=13)
        with pytest.raises(DigestMismatch, match=r"the manager has 12 bytes .* the spec says 13"):
            await env.cache().ensure(wrong)


async def test_what_the_manager_refuses_is_said(pki: Any, tmp_path: Path) -> None:
    """Not assigned to this node: ManagerRefused with the manager's reason."""
    async with artifact_env(pki, tmp_path) as env:
        ref = await env.push(b"not yours")
        env.grants.grants.clear()
        with pytest.raises(ManagerRefused, match="node/n1 may not download") as caught:
            await env.cache().ensure(ref)
        assert not caught.value.transient


async def test_an_unreachable_manager_is_unavailable(pki: Any, tmp_path: Path) -> None:
    """No manager at all: ArtifactUnavailable, transient."""
    async with artifact_env(pki, tmp_path) as env:
        ref = await env.push(b"somewhere")
        await env.stop_manager()
        with pytest.raises(ArtifactUnavailable, match=r"manager 127\.0\.0\.1:") as caught:
            await env.cache().ensure(ref)
        assert caught.value.transient


async def test_over_the_daemons_limits_is_refused(pki: Any, tmp_path: Path) -> None:
    """Too large to download, or an archive too large to unpack: refused, nothing kept."""
    bomb = tar_bytes({"zeros": bytes(3 << 20)})  # tiny compressed, 3 MiB unpacked
    async with artifact_env(pki, tmp_path) as env:
        big = await env.push(b"x" * 2000, "big", "1")
        too_large = r"limit of 1\.2 KiB \(\[artifacts\] max_bytes\)"
        with pytest.raises(ArtifactTooLarge, match=too_large):
            await env.cache(max_bytes=1200).ensure(big)
        ref = await env.push(bomb, "bomb", "1")
        cache = env.cache(max_unpacked_bytes=1 << 20)
        with pytest.raises(UnpackFailed, match="unpacks to more than 1048576 bytes"):
            await cache.ensure(ref)
        assert cache.downloaded(ref) == 0
        assert not (tmp_path / "daemon" / "artifacts" / ref.digest.removeprefix("sha256:")).exists()


async def test_an_escaping_archive_is_refused(pki: Any, tmp_path: Path) -> None:
    """A path escape in an archive: UnpackFailed naming the entry, nothing written outside."""
    async with artifact_env(pki, tmp_path) as env:
        ref = await env.push(tar_bytes({"../../escaped": b"x"}), "evil", "1")
        with pytest.raises(UnpackFailed, match=r"'\.\./\.\./escaped': a path with '\.\.'"):
            await env.cache().ensure(ref)
        assert not await asyncio.to_thread(lambda: list(tmp_path.rglob("escaped")))


async def test_two_agents_needing_one_artifact_download_it_once(pki: Any, tmp_path: Path) -> None:
    """Concurrent ensures of one artifact share one download."""
    data = noise(2 * CHUNK_SIZE, seed=5)
    async with artifact_env(pki, tmp_path) as env:
        ref = await env.push(data)
        cache = env.cache()
        paths = await asyncio.gather(*(cache.ensure(ref, progress=env.record) for _ in range(3)))
        assert len(set(paths)) == 1
        assert [done for done, _ in env.progress] == [CHUNK_SIZE, 2 * CHUNK_SIZE]


async def test_retain_keeps_what_the_pushed_sets_use_and_the_most_recent(
    pki: Any, tmp_path: Path
) -> None:
    """Artifacts of the current and previous sets stay, plus keep_recent others; the rest go."""
    async with artifact_env(pki, tmp_path) as env:
        cache = env.cache(keep_recent=1)
        refs = [await env.push(f"version {i}".encode(), "web", str(i)) for i in range(4)]
        paths = []
        for i, ref in enumerate(refs):
            paths.append(await cache.ensure(ref))
            manifest = cache.root / f"{ref.digest.removeprefix('sha256:')}.json"
            os.utime(manifest, (1000 + i, 1000 + i))  # used in this order
        removed = await cache.retain([refs[0], refs[1]])  # previous and current set
        assert removed == [refs[2].digest]  # refs[3] is the most recent of the others
        assert [p.exists() for p in paths] == [True, True, False, True]
        assert await cache.ensure(refs[3]) == paths[3]
