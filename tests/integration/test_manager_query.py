"""The metric query the operator API exposes, and the rollup/prune lifecycle, on both databases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from manager_harness import FakeClock, manager_config, node_stub, registration, running_manager

from fleet.errors import InvalidArgument
from fleet.v1 import common_pb2, manager_pb2

MINUTE = 60_000


async def test_query_reads_raw_then_rollups_after_raw_retention(
    pki: Any, database_url: str, tmp_path: Path
) -> None:
    """Minute buckets give min/avg/max; after raw samples are pruned, rollups still answer."""
    clock = FakeClock(now=1_800_000_000.0)  # on a minute boundary
    t0 = clock.ms() - 3 * MINUTE
    config = manager_config(
        pki, database_url, tmp_path / "s", metrics={"raw_retention_hours": 0.1}
    )  # 6 minutes
    async with running_manager(config, clock) as server:
        async with node_stub(pki, "web-1", server.port) as stub:
            await stub.RegisterNode(registration("web-1"))
            samples = [
                (t0, 1.0),
                (t0 + 30_000, 3.0),
                (t0 + MINUTE, 5.0),
                (t0 + 2 * MINUTE, 7.0),
                (t0 + 2 * MINUTE + 1, 9.0),
            ]
            await stub.ReportMetrics(
                manager_pb2.ReportMetricsRequest(
                    node_id="web-1",
                    sequence=1,
                    metrics=[
                        common_pb2.MetricData(type="cpu", timestamp=ts, values={"load": v})
                        for ts, v in samples
                    ],
                )
            )
        query = server.metric_service.query
        span = {"node_id": "web-1", "type": "cpu", "start_ms": t0, "end_ms": t0 + 3 * MINUTE}
        assert await query(**span, step_s=60, aggregate="avg") == {
            "load": [(t0, 2.0), (t0 + MINUTE, 5.0), (t0 + 2 * MINUTE, 8.0)]
        }
        clock.advance(10 * 60)  # raw retention (6 min) has passed for every sample
        buckets, deleted = await server.lifecycle.run_once()
        assert buckets >= 3
        assert deleted >= 5
        assert await query(**span, step_s=10, aggregate="max") == {}  # raw is gone
        assert await query(**span, step_s=60, aggregate="max") == {
            "load": [(t0, 3.0), (t0 + MINUTE, 5.0), (t0 + 2 * MINUTE, 9.0)]
        }
        assert await query(**span, step_s=180, aggregate="min") == {"load": [(t0, 1.0)]}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"node_id": "Bad_Node"}, "node_id"),
        ({"type": "CPU"}, "type"),
        ({"name": "Bad Name"}, "name"),
        ({"agent_id": "bad agent"}, "agent_id"),
        ({"start_ms": 1000, "end_ms": 1000}, "end"),
        ({"step_s": 0}, "step_seconds"),
        ({"step_s": 1, "start_ms": 0, "end_ms": 10**12}, "step_seconds"),
        ({"aggregate": "median"}, "aggregate"),
    ],
)
async def test_query_rejects_bad_arguments_naming_the_field(
    pki: Any, database_url: str, tmp_path: Path, overrides: dict[str, Any], field: str
) -> None:
    """A bad query argument is InvalidArgument naming it."""
    config = manager_config(pki, database_url, tmp_path / "s")
    async with running_manager(config, FakeClock()) as server:
        args: dict[str, Any] = {
            "node_id": "web-1",
            "type": "cpu",
            "start_ms": 0,
            "end_ms": 60_000,
            "step_s": 60,
            "aggregate": "avg",
        }
        with pytest.raises(InvalidArgument) as info:
            await server.metric_service.query(**{**args, **overrides})
        assert info.value.field == field
