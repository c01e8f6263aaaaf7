"""Host figures as placement candidates, and what placed instances reserve (pure)."""

from __future__ import annotations

from manager.service.capacity import CPU_CORES, CPU_USAGE, MEMORY_TOTAL, MEMORY_USED, candidates
from manager.service.placement import Resources, reservations
from manager.storage import NodeRecord

GIB = 1 << 30


def record(node_id: str, *, status: str = "online") -> NodeRecord:
    return NodeRecord(
        node_id=node_id,
        hostname=node_id,
        ip="127.0.0.1",
        os="linux",
        arch="x86_64",
        labels={"env": "prod"},
        daemon_version="1",
        agent_version="1",
        daemon_address="127.0.0.1:1",
        status=status,  # type: ignore[arg-type]
        last_seen_ms=5_000,
    )


def test_capacity_is_cores_and_total_memory_and_use_the_window_average() -> None:
    """4 cores at 25% average, 16 GiB with 6 GiB used on average."""
    figures = {
        "a": {
            CPU_CORES: (4.0, 4.0),
            CPU_USAGE: (25.0, 90.0),
            MEMORY_TOTAL: (16.0 * GIB, 16.0 * GIB),
            MEMORY_USED: (6.0 * GIB, 8.0 * GIB),
        }
    }
    (c,) = candidates([record("a")], figures)
    assert c.capacity == Resources(4000, 16 * GIB)
    assert c.used == Resources(1000, 6 * GIB)
    assert c.online
    assert c.labels == {"env": "prod"}


def test_a_node_without_both_capacities_has_none_known() -> None:
    """No figures, or cpu without memory: capacity unknown (placement uses it last)."""
    out = candidates(
        [record("none"), record("cpu-only"), record("off", status="offline")],
        {"cpu-only": {CPU_CORES: (2.0, 2.0), CPU_USAGE: (10.0, 10.0)}},
    )
    assert [c.capacity for c in out] == [None, None, None]
    assert (out[2].online, out[2].offline_since) == (False, 5.0)


def test_reservations_sum_the_other_definitions_requests_per_node() -> None:
    """A node's reservation: the requests of every other definition placed on it."""
    requests = {"web": Resources(500, GIB), "db": Resources(2000, 4 * GIB), "free": Resources()}
    placed = [("n1", "web"), ("n1", "db"), ("n2", "web"), ("n2", "free"), ("n3", "gone")]
    assert reservations(placed, requests, exclude="web") == {"n1": Resources(2000, 4 * GIB)}
    assert reservations(placed, requests, exclude="x") == {
        "n1": Resources(2500, 5 * GIB),
        "n2": Resources(500, GIB),
    }
