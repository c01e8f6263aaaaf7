"""fleetctl metrics against a real manager: types, unknown types, counter rates, chart axes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetctl_live import LiveFleet, live_fleet

from fleet.v1 import common_pb2

M = 60_000
KIB_PER_MINUTE = 60 * 1024  # 1 KiB/s


@pytest.fixture
def fleet(pki: Any, tmp_path: Path) -> Iterator[LiveFleet]:
    """node-1 with eight minutes of host metrics: flat cpu, disk and network counters."""
    with live_fleet(pki, tmp_path) as live:
        live.register("node-1")
        base = (int(time.time() * 1000) // M - 8) * M
        recv = [0, 6000, 12000, 100, 6100, 12100, 18100, 24100]  # reset after the third
        samples = []
        for i in range(8):
            ts = base + i * M + 10_000  # one sample per minute bucket
            samples += [
                common_pb2.MetricData(
                    type="cpu", timestamp=ts, values={"usage_percent": 50.0 + (i % 2) / 10}
                ),
                common_pb2.MetricData(
                    type="network",
                    timestamp=ts,
                    values={"bytes_sent": float(i * KIB_PER_MINUTE), "bytes_recv": recv[i]},
                ),
                common_pb2.MetricData(
                    type="disk",
                    timestamp=ts,
                    values={"read_bytes": float(i * 600), "used_bytes": 7.9e9 + i},
                ),
            ]
        samples.append(
            common_pb2.MetricData(
                type="process", timestamp=base, values={"threads": 3.0}, agent_id="web"
            )
        )
        live.report("node-1", samples)
        yield live


def test_types_lists_what_the_node_reported(fleet: LiveFleet) -> None:
    """metrics types: each type with its value names, who reported it and the newest sample."""
    table = fleet.fleetctl("metrics", "types", "--node", "node-1")
    assert table.exit_code == 0, table.output
    rows = {line.split()[0]: line.split()[1:] for line in table.stdout.splitlines()[1:]}
    assert rows["network"][:2] == ["bytes_recv,bytes_sent", "host"]
    assert rows["process"][:2] == ["threads", "web"]
    data = json.loads(fleet.fleetctl("-o", "json", "metrics", "types", "--node", "node-1").stdout)
    assert [t["type"] for t in data["types"]] == ["cpu", "disk", "network", "process"]
    cpu = data["types"][0]
    assert (cpu["names"], cpu["host"], cpu["agent_ids"]) == (["usage_percent"], True, [])
    assert cpu["newest"].endswith("Z")


def test_an_unknown_type_exits_1_naming_the_known_ones(fleet: LiveFleet) -> None:
    """A type the node never reported is an error naming its types, not 'no data'."""
    result = fleet.fleetctl("metrics", "query", "--node", "node-1", "--type", "cpux")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "fleetctl: error: node-1 has no metric type 'cpux'; it has: cpu, disk, network"
        " (see `fleetctl metrics types --node node-1`)"
    )


def test_a_known_type_without_data_in_range_is_not_an_error(fleet: LiveFleet) -> None:
    """A type the node has, asked for a range without samples: 'No data in this range.', 0."""
    result = fleet.fleetctl(
        "metrics", "query", "--node", "node-1", "--type", "cpu", "--since", "3h", "--until", "2h"
    )
    assert result.exit_code == 0, result.output
    assert "No data in this range." in result.stdout


def test_rate_draws_counters_per_second_and_skips_a_reset(fleet: LiveFleet) -> None:
    """--rate: bytes per second between buckets; the bucket after a reset has no point."""
    args = ["metrics", "query", "--node", "node-1", "--type", "network", "--rate"]
    result = fleet.fleetctl("-o", "json", *args, "--since", "10m", "--step", "1m")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["per_second"] is True
    assert data["aggregate"] == "max"
    series = {s["name"]: [p["value"] for p in s["points"]] for s in data["series"]}
    assert series["bytes_sent"] == [1024.0] * 7
    assert series["bytes_recv"] == [100.0] * 6  # 7 differences, one of them a reset
    table = fleet.fleetctl(*args, "--since", "10m", "--step", "1m")
    assert table.exit_code == 0, table.output
    row = next(line for line in table.stdout.splitlines() if line.startswith("bytes_sent/s"))
    assert row.split()[-4:] == ["0/s..1KiB/s", "1KiB/s", "1KiB/s", "1KiB/s"]
    assert "per-second rate per 1m" in table.stdout


def test_rate_leaves_out_gauges_and_refuses_types_without_counters(fleet: LiveFleet) -> None:
    """disk --rate draws read_bytes and says used_bytes is left out; cpu --rate is exit 2."""
    disk = fleet.fleetctl("metrics", "query", "--node", "node-1", "--type", "disk", "--rate")
    assert disk.exit_code == 0, disk.output
    assert "read_bytes/s" in disk.stdout
    assert "used_bytes" not in disk.stdout
    assert disk.stderr.strip() == "fleetctl: --rate leaves out used_bytes (not counters)"
    cpu = fleet.fleetctl("metrics", "query", "--node", "node-1", "--type", "cpu", "--rate")
    assert cpu.exit_code == 2
    assert "--rate: cpu has no cumulative counters" in cpu.stderr


def test_a_series_that_barely_moves_is_not_drawn_full_height(fleet: LiveFleet) -> None:
    """cpu alternating 50.0/50.1% draws flat at half height, with its 0..100% axis printed."""
    result = fleet.fleetctl(
        "metrics", "query", "--node", "node-1", "--type", "cpu", "--since", "10m"
    )
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if line.startswith("usage_percent"))
    assert {c for c in row if c in "▁▂▃▄▅▆▇█"} == {"▅"}
    assert row.split()[-4:] == ["0%..100%", "50%", "50.1%", "50.1%"]
