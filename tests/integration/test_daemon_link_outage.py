"""The manager link without any manager: batches are numbered, bounded, and dropped oldest first."""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

import pytest

from daemon.config import ManagerLinkConfig
from daemon.manager_link import ManagerLink, NodeInfo
from fleet.retry import Backoff
from fleet.v1 import common_pb2


def _link(tmp_path: Path, pki: object, capacity: int, samples: int) -> ManagerLink:
    tls = pki.issue("node", "n1")  # type: ignore[attr-defined]

    def collect() -> list[common_pb2.MetricData]:
        return [
            common_pb2.MetricData(type="cpu", timestamp=i + 1, values={"usage_percent": 1.0})
            for i in range(samples)
        ]

    return ManagerLink(
        ManagerLinkConfig(addresses=("127.0.0.1:1",), buffer_batches=capacity, batch_max_samples=2),
        tls=tls,
        trust_domain="fleet.local",
        node=NodeInfo("n1", "127.0.0.1:7444", {}),
        state_dir=tmp_path,
        collect=collect,
        snapshot=list,
    )


def test_full_buffer_drops_oldest_counts_and_logs(
    tmp_path: Path, pki: object, caplog: pytest.LogCaptureFixture
) -> None:
    """With room for 3 batches, the 4th and 5th push out batches 1 and 2, counted and logged."""
    link = _link(tmp_path, pki, capacity=3, samples=2)
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            link.cut_batch()
    assert link.buffer.sequences() == [3, 4, 5]
    assert link.buffer.dropped_batches == 2
    assert link.buffer.dropped_samples == 4
    assert "dropped batch 2 with 2 samples" in caplog.text


def test_large_collections_are_split_and_custom_metrics_ride_along(
    tmp_path: Path, pki: object
) -> None:
    """5 samples + 1 SDK metric at 2 per batch make 3 numbered batches, in order."""
    link = _link(tmp_path, pki, capacity=10, samples=5)
    link.add_metrics(
        [common_pb2.MetricData(type="jobs", timestamp=9, values={"n": 1.0}, agent_id="a")]
    )
    made = link.cut_batch()
    assert [b.sequence for b in made] == [1, 2, 3]
    assert [len(b.metrics) for b in made] == [2, 2, 2]
    assert made[-1].metrics[-1].agent_id == "a"


def test_sequence_numbers_continue_after_a_restart(tmp_path: Path, pki: object) -> None:
    """A new link on the same state dir (a restarted daemon) never reuses a sequence number."""
    first = _link(tmp_path, pki, capacity=10, samples=1)
    first.cut_batch()
    first.cut_batch()
    second = _link(tmp_path, pki, capacity=10, samples=1)
    assert [b.sequence for b in second.cut_batch()] == [3]


async def test_no_redialing_during_the_reconnect_backoff(tmp_path: Path, pki: object) -> None:
    """After a failed attempt the closed channel stays closed: nothing dials until the backoff
    ends (gRPC's own reconnects, every <= 2 s, would defeat the link's jittered backoff)."""
    dials = 0
    failed = asyncio.Event()

    async def refuse(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal dials
        dials += 1
        writer.close()  # no TLS: the attempt fails

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    link = ManagerLink(
        ManagerLinkConfig(
            addresses=(f"127.0.0.1:{port}",), reconnect=Backoff(initial=600.0, maximum=600.0)
        ),
        tls=pki.issue("node", "n1"),  # type: ignore[attr-defined]
        trust_domain="fleet.local",
        node=NodeInfo("n1", "127.0.0.1:7444", {}),
        state_dir=tmp_path,
        collect=list,
        snapshot=list,
        rng=random.Random(1),  # first delay: uniform(0, 600) = 80 s
        on_state=lambda state, _address: failed.set() if state == "disconnected" else None,
    )
    await link.start()
    try:
        async with asyncio.timeout(30):
            await failed.wait()
        await asyncio.sleep(4.0)  # gRPC would have redialed ~5 times by now
        assert dials == 1
    finally:
        await link.stop()
        server.close()
        await server.wait_closed()
