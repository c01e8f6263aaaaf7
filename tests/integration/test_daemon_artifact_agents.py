"""Pushed agents run from their artifacts: a real manager, a real daemon, real agent processes.

The manager (SQLite and PostgreSQL) stores the artifact and rolls the
definition out; the daemon (DaemonServer in-process, its own mTLS link)
downloads, verifies and unpacks it, then starts the agent with
``{artifact}`` replaced by the unpacked directory. A fetch that fails
refuses that agent only, reported to the manager, and the old instance
keeps running; a damaged cache is noticed and fetched again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from artifact_helpers import digest, push, sync_operator, tar_bytes
from daemon_helpers import daemon_config, eventually, short_tmp
from fleet_harness import FAST_POOL, operator_stub, selector
from manager_harness import manager_config
from sqlalchemy import select, update

from daemon.config import ArtifactsConfig, ManagerLinkConfig
from daemon.server import DaemonServer
from daemon.supervisor.supervisor import AgentSnapshot
from fleet.errors import FailedPrecondition, NotFound, Unavailable
from fleet.retry import Backoff
from fleet.v1 import common_pb2, desired_pb2, fleet_pb2, fleet_pb2_grpc
from manager.server import ManagerServer
from manager.storage.schema import artifact_blobs, artifact_chunks

RUN = b'#!/bin/sh\necho "web $WEB_VERSION from $PWD home=$WEB_HOME"\nexec sleep 1000\n'


def build(version: str) -> bytes:
    """A web build: a tar.gz holding bin/run.sh and a file naming its version."""
    return tar_bytes({"bin/run.sh": RUN, "VERSION": version.encode()})


@dataclass
class Env:
    """A manager, node n1's daemon (restartable on its directories), alice's stub."""

    manager: ManagerServer
    stub: fleet_pb2_grpc.FleetServiceStub
    pki: Any
    root: Path
    tls: Any
    daemon: DaemonServer | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.manager.port}"

    @property
    def cache(self) -> Path:
        return self.root / "state" / "artifacts"

    async def start_daemon(self, *, stop_agents: bool = True) -> DaemonServer:
        link = ManagerLinkConfig(
            addresses=(self.address,),
            metrics_interval_seconds=3600,
            sync_coalesce_seconds=0.05,
            rpc_timeout_seconds=5,
        )
        cfg = daemon_config(
            self.root,
            self.tls,
            (),
            manager=link,
            labels={"env": "prod"},
            stop_agents_on_exit=stop_agents,
            artifacts=ArtifactsConfig(wait_seconds=1.0),  # under FAST_POOL's 3 s call_timeout
        )
        self.daemon = DaemonServer(cfg)
        await self.daemon.start()
        await eventually(lambda: self.manager.nodes.get("n1"), lambda n: n is not None)
        return self.daemon

    async def stop_daemon(self) -> None:
        if self.daemon is not None:
            await self.daemon.stop(1.0)
            self.daemon = None

    async def push(self, data: bytes, version: str) -> None:
        with sync_operator(self.pki, self.manager.port) as sync:
            await asyncio.to_thread(push, sync, data, "web", version)

    async def apply(self, version: str, name: str = "web", **update: Any) -> None:
        d = desired_pb2.Definition(
            name=name,
            selector=selector("env=prod"),
            agent=common_pb2.AgentSpec(
                argv=["{artifact}/bin/run.sh"],
                cwd="{artifact}",
                env={"WEB_HOME": "{artifact}", "WEB_VERSION": version},
                version=version,
                autostart=True,
                start_secs=0.2,
                stop_timeout_seconds=2.0,
            ),
            artifact=common_pb2.ArtifactRef(name="web", version=version),
            update=desired_pb2.UpdatePolicy(
                min_healthy_time_seconds=0.0,
                healthy_deadline_seconds=update.pop("healthy_deadline_seconds", 60.0),
                progress_deadline_seconds=120.0,
                **update,
            ),
        )
        await self.stub.ApplyDefinitions(
            fleet_pb2.FleetServiceApplyDefinitionsRequest(definitions=[d])
        )

    async def rollout(self, name: str = "web") -> desired_pb2.Rollout:
        reply = await self.stub.GetRollout(fleet_pb2.FleetServiceGetRolloutRequest(name=name))
        return reply.rollout

    async def rolled(
        self, want: str, name: str = "web", within: float = 30.0
    ) -> desired_pb2.Rollout:
        return await eventually(
            lambda: self.rollout(name), lambda r: state(r) == want, within=within
        )

    async def log(self, wanted: str) -> str:
        """The agent's log once it contains `wanted`."""
        return await eventually(
            lambda: asyncio.to_thread((self.root / "log" / "web.log").read_text),
            lambda text: wanted in text,
        )

    async def web(self, name: str = "web") -> AgentSnapshot:
        assert self.daemon is not None
        return self.daemon.supervisor.get(name)

    async def pushed_api(self) -> AgentSnapshot | None:
        """Agent api, or None until its push arrives."""
        try:
            return await self.web("api")
        except NotFound:
            return None


def state(r: desired_pb2.Rollout) -> str:
    return desired_pb2.RolloutState.Name(r.state).removeprefix("ROLLOUT_STATE_")


def tree(data: bytes) -> Path:
    """Where the cache unpacks `data` (relative to the cache root)."""
    return Path(digest(data).removeprefix("sha256:"))


class Gate:
    """An `ArtifactAccess` that lets every node download, once the gate is open: a test
    holds a download in flight for as long as it likes (well under rpc_timeout_seconds)."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.open.set()
        self.broken = False
        """While set, every download fails as an unreachable artifact store would."""

    async def may_download(self, node_id: str, digest: str) -> bool:
        await self.open.wait()
        if self.broken:
            raise Unavailable("the artifact store is unreachable (test)")
        return True


@asynccontextmanager
async def artifact_env(
    pki: Any, tmp_path: Path, database_url: str, **options: Any
) -> AsyncIterator[Env]:
    config = manager_config(pki, database_url, tmp_path / "state")
    manager = ManagerServer(dataclasses.replace(config, pool=FAST_POOL), clock=time.time, **options)
    await manager.start()
    async with AsyncExitStack() as stack:
        stack.push_async_callback(manager.stop, 1.0)
        root = stack.enter_context(short_tmp())
        stub = await stack.enter_async_context(operator_stub(pki, manager.port))
        env = Env(manager, stub, pki, root, pki.issue("node", "n1"))
        stack.push_async_callback(env.stop_daemon)
        await env.start_daemon()
        yield env


async def test_the_agent_runs_from_its_unpacked_artifact_and_a_new_version_rolls(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """{artifact} is the unpacked tree in argv, cwd and env; 2.0 rolls, 1.0's tree is kept."""
    v1, v2 = build("1.0"), build("2.0")
    async with artifact_env(pki, tmp_path, database_url) as env:
        await env.push(v1, "1.0")
        await env.apply("1.0")
        await env.rolled("SUCCESSFUL")
        web = await env.web()
        where = env.cache / tree(v1)
        proc = psutil.Process(web.pid)  # run.sh exec'd sleep: same process, cwd and env
        assert proc.cwd() == str(where)
        assert proc.environ()["WEB_HOME"] == str(where)
        assert f"web 1.0 from {where} home={where}" in await env.log("web 1.0")
        assert (where / "VERSION").read_text() == "1.0"
        assert web.revision == 1

        await env.push(v2, "2.0")
        await env.apply("2.0")
        await env.rolled("SUCCESSFUL")
        web2 = await env.web()
        assert (web2.revision, web2.version) == (2, "2.0")
        assert psutil.Process(web2.pid).cwd() == str(env.cache / tree(v2))
        assert web2.pid != web.pid
        # Rollback keeps its artifact: 1.0's tree is still installed.
        assert (where / "VERSION").read_text() == "1.0"
        assert (env.cache / f"{tree(v1)}.json").exists()
        assert f"web 2.0 from {env.cache / tree(v2)}" in await env.log("web 2.0")


async def test_a_digest_mismatch_fails_the_node_and_the_old_agent_keeps_running(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """2.0's bytes rot at the manager: the node's update fails naming the mismatch, 1.0 runs on."""
    v1, v2 = build("1.0"), build("2.0")
    async with artifact_env(pki, tmp_path, database_url) as env:
        await env.push(v1, "1.0")
        await env.apply("1.0")
        await env.rolled("SUCCESSFUL")
        before = await env.web()
        await env.push(v2, "2.0")
        async with env.manager.db.engine.begin() as conn:  # same size, other bytes
            blob = select(artifact_blobs.c.id).where(artifact_blobs.c.digest == digest(v2))
            where = artifact_chunks.c.blob_id == blob.scalar_subquery()
            data = (await conn.execute(select(artifact_chunks.c.data).where(where))).scalar_one()
            await conn.execute(update(artifact_chunks).where(where).values(data=data[::-1]))
        await env.apply("2.0", healthy_deadline_seconds=20.0)
        failed = await env.rolled("FAILED")
        assert "digest mismatch" in failed.reason, failed.reason
        nodes = await env.stub.ListNodes(fleet_pb2.FleetServiceListNodesRequest())
        (n1,) = nodes.nodes
        (error,) = n1.update_errors
        assert (error.agent_id, error.revision) == ("web", 2)
        assert error.reason.startswith("artifact web 2.0: ")
        assert "digest mismatch" in error.reason
        after = await env.web()
        assert (after.pid, after.revision, after.status.value) == (before.pid, 1, "RUNNING")
        assert psutil.Process(after.pid).cwd() == str(env.cache / tree(v1))
        assert not (env.cache / tree(v2)).exists()


async def test_a_damaged_cache_is_fetched_again_after_a_daemon_restart(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """A restart re-adopts the agent; a tampered file in its tree is noticed and repaired."""
    v1 = build("1.0")
    async with artifact_env(pki, tmp_path, database_url) as env:
        await env.push(v1, "1.0")
        await env.apply("1.0")
        await env.rolled("SUCCESSFUL")
        first = await env.web()
        await env.stop_daemon()  # agents are stopped with it (stop_agents_on_exit)
        damaged = env.cache / tree(v1) / "bin" / "run.sh"
        damaged.write_bytes(b"#!/bin/sh\necho tampered\n")
        daemon = await env.start_daemon(stop_agents=False)
        assert daemon.supervisor.version > 0  # the pushed set survived the restart
        web = await eventually(env.web, lambda s: s.status.value == "RUNNING" and s.pid > 0)
        assert web.pid != first.pid
        assert damaged.read_bytes() == RUN
        assert psutil.Process(web.pid).cwd() == str(env.cache / tree(v1))

        # A second restart with the agent left running finds the intact copy and re-adopts.
        await env.stop_daemon()
        await env.start_daemon()
        again = await env.web()
        assert (again.pid, again.status.value) == (web.pid, "RUNNING")


async def test_while_the_artifact_downloads_the_old_agent_runs_and_a_new_one_waits(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """The push answers at once; web keeps running 1.0, a new agent shows STARTING "waiting
    for artifact" (and cannot be started by hand); both start when the download ends."""
    gate = Gate()
    v1, v2 = build("1.0"), build("2.0")
    async with artifact_env(pki, tmp_path, database_url, artifact_access=gate) as env:
        await env.push(v1, "1.0")
        await env.apply("1.0")
        await env.rolled("SUCCESSFUL")
        old = await env.web()
        await env.push(v2, "2.0")
        gate.open.clear()  # every download hangs at the manager until the gate opens
        await env.apply("2.0")
        await env.apply("2.0", name="api")
        waiting = await eventually(env.web, lambda s: "waiting for artifact web 2.0" in s.message)
        assert (waiting.pid, waiting.status.value, waiting.revision) == (old.pid, "RUNNING", 1)
        assert "the running instance is kept until then" in waiting.message
        api = await eventually(
            env.pushed_api, lambda s: s is not None and s.status.value == "STARTING"
        )
        assert (api.pid, api.revision) == (0, 1)
        assert api.message.startswith("waiting for artifact web 2.0 (0 B of ")
        assert env.daemon is not None
        with pytest.raises(FailedPrecondition, match="waiting for its artifact"):
            await env.daemon.supervisor.operate("api", "start")
        assert state(await env.rollout()) == "RUNNING"  # waiting, not failed

        gate.open.set()
        await env.rolled("SUCCESSFUL")
        await env.rolled("SUCCESSFUL", name="api")
        web, api = await env.web(), await env.web("api")
        assert (web.revision, web.status.value, api.status.value) == (2, "RUNNING", "RUNNING")
        assert "waiting" not in web.message
        assert "waiting" not in api.message
        assert web.pid != old.pid
        for agent in (web, api):
            assert psutil.Process(agent.pid).cwd() == str(env.cache / tree(v2))


async def test_an_unavailable_artifact_is_refused_then_retried_until_it_arrives(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """The manager cannot serve 2.0: the node reports why and keeps 1.0; a later attempt
    succeeds, the refusal clears and 2.0 runs."""
    gate = Gate()
    v1, v2 = build("1.0"), build("2.0")
    async with artifact_env(pki, tmp_path, database_url, artifact_access=gate) as env:
        assert env.daemon is not None
        env.daemon.supervisor.artifact_retry = Backoff(initial=0.5, maximum=0.5, jitter="none")
        await env.push(v1, "1.0")
        await env.apply("1.0")
        await env.rolled("SUCCESSFUL")
        old = await env.web()
        await env.push(v2, "2.0")
        gate.broken = True
        await env.apply("2.0")

        async def errors() -> list[Any]:
            reply = await env.stub.ListNodes(fleet_pb2.FleetServiceListNodesRequest())
            return list(reply.nodes[0].update_errors)

        # 30 s: once missed 15 s with three test workers and four helpers on two cores.
        (error,) = await eventually(errors, lambda e: len(e) == 1, within=30)
        assert error.reason.startswith("artifact web 2.0: the download broke (")
        assert "the artifact store is unreachable" in error.reason
        assert "the next attempt resumes from there" in error.reason
        kept = await env.web()
        assert (kept.pid, kept.revision, kept.status.value) == (old.pid, 1, "RUNNING")

        gate.broken = False
        await eventually(errors, lambda e: e == [])
        web = await eventually(env.web, lambda s: s.revision == 2 and s.status.value == "RUNNING")
        assert psutil.Process(web.pid).cwd() == str(env.cache / tree(v2))
