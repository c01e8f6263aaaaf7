"""A daemon whose state_dir fills up: clear reasons to the manager, nothing lost, recovery.

The state_dir is a small tmpfs (root only; skipped otherwise, a failure under CI),
filled to the last byte with the daemon running, then freed.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from daemon_helpers import (
    agent,
    client_channel,
    daemon_config,
    eventually,
    fill,
    short_tmp,
    small_disk,
)
from grpc import aio
from manager_harness import manager_config, running_manager

from daemon.config import JobsConfig, ManagerLinkConfig
from daemon.manager_link import ManagerLink, NodeInfo
from daemon.server import DaemonServer
from daemon.supervisor.logs import rotate_if_needed
from fleet.agentspec import spec_to_proto
from fleet.v1 import common_pb2, daemon_pb2, daemon_pb2_grpc, jobs_pb2


@dataclass
class FullNode:
    """A daemon whose state_dir is a small tmpfs, and a manager/m1 client to it."""

    server: DaemonServer
    stub: daemon_pb2_grpc.DaemonServiceStub
    state: Path


@pytest.fixture
async def node(pki: Any) -> AsyncIterator[FullNode]:
    """A daemon (node/n1, jobs on) with its state_dir on an 8 MiB tmpfs."""
    with short_tmp() as root, small_disk(root / "state"):
        cfg = daemon_config(
            root,
            pki.issue("node", "n1"),
            (),
            jobs=JobsConfig(grace_seconds=1.0),
            stop_agents_on_exit=True,  # the pushed agent ends with the test
        )
        server = DaemonServer(cfg, config_path=Path("/etc/fleet/daemon.toml"))
        await server.start()
        channel = client_channel(pki.issue("manager", "m1"), server.port, "n1", pki.trust_domain)
        try:
            yield FullNode(server, daemon_pb2_grpc.DaemonServiceStub(channel), root / "state")
        finally:
            await channel.close()
            await server.stop(1.0)


def _job(job_id: str, script: str) -> daemon_pb2.StartJobRequest:
    step = jobs_pb2.JobStep(command=jobs_pb2.JobCommand(argv=["/bin/sh", "-c", script]))
    return daemon_pb2.StartJobRequest(job_id=job_id, steps=[step])


async def test_start_job_on_a_full_state_dir_is_refused_with_the_reason(node: FullNode) -> None:
    """StartJob answers RESOURCE_EXHAUSTED naming the disk, keeps nothing, and runs once freed."""
    filler = fill(node.state)
    with pytest.raises(aio.AioRpcError) as refused:
        await node.stub.StartJob(_job("20261207-000000-000-aaaaaa", "echo hi"))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "No space left on device" in (refused.value.details() or "")
    assert str(node.state) in (refused.value.details() or "")
    assert not (node.state / "jobs" / "20261207-000000-000-aaaaaa").exists()
    filler.unlink()
    reply = await node.stub.StartJob(_job("20261207-000000-000-aaaaaa", "echo hi"))
    assert reply.state != jobs_pb2.JOB_TARGET_STATE_FAILED
    record = await eventually(
        lambda: asyncio.sleep(0, node.server.jobs.record("20261207-000000-000-aaaaaa")),
        lambda r: r.final,
        within=10,
    )
    assert record.state == "SUCCESS"


async def test_a_step_that_ends_on_a_full_disk_keeps_its_exit_code(node: FullNode) -> None:
    """The disk fills while the step runs: its exit code is still recorded, and the reason
    says the disk is full (the step's own complaint could not reach its output)."""
    job_id = "20261207-000000-000-bbbbbb"
    await node.stub.StartJob(_job(job_id, "sleep 1; exit 3"))
    await eventually(
        lambda: asyncio.sleep(0, node.server.jobs.record(job_id).state),
        lambda s: s == "RUNNING",
        within=10,
    )
    filler = fill(node.state)
    try:
        record = await eventually(
            lambda: asyncio.sleep(0, node.server.jobs.record(job_id)),
            lambda r: r.final,
            within=10,
        )
    finally:
        filler.unlink()
    assert record.state == "FAILED"
    assert record.exit_code == 3
    assert "is full" in record.reason


async def test_push_update_on_a_full_state_dir_is_refused_with_the_reason(
    node: FullNode,
) -> None:
    """PushUpdate answers RESOURCE_EXHAUSTED naming update.json, applies nothing, and
    applies once space is freed."""
    pushed = spec_to_proto(agent("pushed", "/bin/sleep", "60"))
    filler = fill(node.state)
    with pytest.raises(aio.AioRpcError) as refused:
        await node.stub.PushUpdate(daemon_pb2.PushUpdateRequest(version=2, agents=[pushed]))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "update.json" in (refused.value.details() or "")
    assert [a.id for a in node.server.supervisor.list()] == []
    filler.unlink()
    await node.stub.PushUpdate(daemon_pb2.PushUpdateRequest(version=2, agents=[pushed]))
    assert [a.id for a in node.server.supervisor.list()] == ["pushed"]


def test_metric_samples_are_kept_while_no_sequence_number_can_be_saved(pki: Any) -> None:
    """A full state_dir: cut_batch makes no batch and loses no sample; once freed, the kept
    samples go out under the next number."""
    n = 0

    def collect() -> list[common_pb2.MetricData]:
        nonlocal n
        n += 1
        return [common_pb2.MetricData(type="cpu", timestamp=n, values={"usage_percent": 1.0})]

    with short_tmp() as root, small_disk(root / "state") as state:
        link = ManagerLink(
            ManagerLinkConfig(addresses=("127.0.0.1:1",), batch_max_samples=100),
            tls=pki.issue("node", "n1"),
            trust_domain="fleet.local",
            node=NodeInfo("n1", "127.0.0.1:7444", {}),
            state_dir=state,
            collect=collect,
            snapshot=list,
        )
        assert [b.sequence for b in link.cut_batch()] == [1]
        filler = fill(state)
        assert link.cut_batch() == []
        assert link.cut_batch() == []
        filler.unlink()
        (batch,) = link.cut_batch()
    assert batch.sequence == 2
    assert sorted(m.timestamp for m in batch.metrics) == [2, 3, 4]


def test_log_rotation_on_a_full_disk_keeps_the_log_and_its_space(pki: Any) -> None:
    """Rotation that cannot copy for want of space keeps the agent's log whole and leaves
    no half copy holding space; once freed it rotates."""
    with short_tmp() as root, small_disk(root / "log", size="2m") as logs:
        path = logs / "web.log"
        body = os.urandom(600 * 1024)
        path.write_bytes(body)
        filler = fill(logs)
        with pytest.raises(OSError, match="No space left"):
            rotate_if_needed(path, 1024, 2)
        assert path.read_bytes() == body
        assert sorted(p.name for p in logs.iterdir()) == ["filler", "web.log"]
        filler.unlink()
        assert rotate_if_needed(path, 1024, 2)
        # The backup keeps the newest 2 x 1 KiB (bounded rotation), saying what it dropped.
        marker, kept = (logs / "web.log.1").read_bytes().split(b"]\n", 1)
        assert marker.startswith(b"[fleet-daemon: ")
        assert b"bytes of this log dropped" in marker
        assert 0 < len(kept) <= 2048
        assert body.endswith(kept)
        assert path.stat().st_size == 0


async def test_a_full_log_filesystem_is_said_once_per_episode_and_reaches_the_manager(
    pki: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An agent writing to a log_dir whose tmpfs fills: the daemon logs once that its
    output is being lost (naming the agent and the path), the manager gets an
    AGENT_STATE_CHANGED event saying so, and once space is back both say so too."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'manager.db'}"
    caplog.set_level(logging.WARNING, logger="daemon.supervisor.supervisor")
    async with running_manager(manager_config(pki, url, tmp_path / "state")) as manager:

        async def said() -> list[str]:
            events = await manager.events.list_after(0, kinds=["AGENT_STATE_CHANGED"])
            return [e.message for e in events if "output" in e.message]

        with short_tmp() as root, small_disk(root / "log", size="2m") as logs:
            talker = agent("talker", "sh", "-c", "while :; do echo line; sleep 0.05; done")
            cfg = daemon_config(
                root,
                pki.issue("node", "n1"),
                (talker,),
                manager=ManagerLinkConfig(
                    addresses=(f"127.0.0.1:{manager.port}",), rpc_timeout_seconds=2.0
                ),
                stop_agents_on_exit=True,
            )
            daemon = DaemonServer(cfg)
            await daemon.start()
            try:
                path = logs / "talker.log"

                async def running() -> list[str]:
                    events = await manager.events.list_after(0, kinds=["AGENT_STATE_CHANGED"])
                    return [e.message for e in events if "-> RUNNING" in e.message]

                # The fill is news of its own, not the start's (30 s: a loaded machine
                # once took longer than 15 s for the first report).
                await eventually(running, bool, within=30)
                filler = fill(logs)
                lost = await eventually(said, lambda m: len(m) == 1)
                assert lost == [
                    f"talker on n1: output being lost: no space left on the filesystem of {path}:"
                    " the agent's output is being lost until space is freed there"
                ]
                await asyncio.sleep(2.5)  # still full: said once, not every check
                assert len(await said()) == 1
                filler.unlink()
                back = await eventually(said, lambda m: len(m) == 2, within=20)
                assert back[1] == (
                    "talker on n1: output logged again (its log's filesystem has space)"
                )
            finally:
                await daemon.stop(1.0)
    lines = [r.getMessage() for r in caplog.records if "talker" in r.getMessage()]
    full = [m for m in lines if "output is being lost" in m]
    again = [m for m in lines if "logged again" in m]
    assert full == [f"agent talker: no space left on the filesystem of {path}: the agent's"
                    " output is being lost until space is freed there"]  # fmt: skip
    assert len(again) == 1
    assert again[0].startswith(
        f"agent talker: space is free again on the filesystem of {path}: its output is"
        " logged again (lost for "
    )
