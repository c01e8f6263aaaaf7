"""The metric query the operator API exposes, and the rollup/prune lifecycle, on both databases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from fleet_harness import operator_stub
from manager_harness import (
    FakeClock,
    manager_config,
    node_stub,
    registration,
    rpc_error,
    running_manager,
)

from fleet.errors import InvalidArgument, Resource, from_rpc_error
from fleet.v1 import common_pb2, fleet_pb2, manager_pb2

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


async def test_list_metric_types_and_queries_of_types_never_reported(
    pki: Any, database_url: str, tmp_path: Path
) -> None:
    """ListMetricTypes names what a node reported; an unknown type is NOT_FOUND naming them."""
    clock = FakeClock(now=1_800_000_000.0)
    now = clock.ms()
    async with running_manager(manager_config(pki, database_url, tmp_path / "s"), clock) as server:
        async with node_stub(pki, "web-1", server.port) as stub:
            await stub.RegisterNode(registration("web-1"))
            metric = common_pb2.MetricData
            await stub.ReportMetrics(
                manager_pb2.ReportMetricsRequest(
                    node_id="web-1",
                    sequence=1,
                    metrics=[
                        metric(type="cpu", timestamp=now - 1000, values={"usage_percent": 5.0}),
                        metric(type="disk", timestamp=now, values={"read_bytes": 1.0}),
                        metric(type="cpu", timestamp=now - 2000, values={"usage_percent": 1.0},
                               agent_id="web"),
                    ],
                )
            )  # fmt: skip
        async with operator_stub(pki, server.port) as ops:
            reply = await ops.ListMetricTypes(
                fleet_pb2.FleetServiceListMetricTypesRequest(node_id="web-1")
            )
            got = [(t.type, list(t.names), t.host, list(t.agent_ids)) for t in reply.types]
            assert got == [
                ("cpu", ["usage_percent"], True, ["web"]),
                ("disk", ["read_bytes"], True, []),
            ]
            assert [t.newest_timestamp for t in reply.types] == [now - 1000, now]

            def query(metric_type: str, **kw: Any) -> Any:
                return ops.QueryMetrics(
                    fleet_pb2.FleetServiceQueryMetricsRequest(
                        node_id="web-1", type=metric_type, **kw
                    )
                )

            err = await rpc_error(query("cpux"))
            assert err.code() == grpc.StatusCode.NOT_FOUND
            assert err.details() == "web-1 has no metric type 'cpux'; it has: cpu, disk"
            assert from_rpc_error(err).resource == Resource("metric-type", "cpux", node="web-1")
            # A type it has, in a range without data: an empty answer, not an error.
            empty = await query("cpu", start_time=now - 7200_000, end_time=now - 3600_000)
            assert list(empty.series) == []
            err = await rpc_error(
                ops.ListMetricTypes(fleet_pb2.FleetServiceListMetricTypesRequest(node_id="nx"))
            )
            assert err.code() == grpc.StatusCode.NOT_FOUND
