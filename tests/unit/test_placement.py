"""Placement by count (`manager.service.placement`): pure, on plain values and `now`."""

from __future__ import annotations

import pytest

from manager.service.placement import Candidate, PlacementRequest, Resources, place

GIB = 1 << 30
NONE = Resources()
NOW = 1_000_000.0


def node(
    name: str,
    *,
    cpu: int = 4000,
    mem: int = 8 * GIB,
    used_cpu: int = 0,
    used_mem: int = 0,
    reserved: Resources = NONE,
    zone: str = "",
    online: bool = True,
    offline_since: float = 0.0,
    known: bool = True,
) -> Candidate:
    return Candidate(
        node_id=name,
        labels={"zone": zone} if zone else {},
        online=online,
        offline_since=offline_since,
        capacity=Resources(cpu, mem) if known else None,
        used=Resources(used_cpu, used_mem),
        reserved=reserved,
    )


def test_new_instances_go_to_the_nodes_with_the_most_room() -> None:
    """Two instances on three nodes: the two least loaded (by their scarcer resource)."""
    nodes = [
        node("a", used_cpu=3000),  # 25% CPU free
        node("b", used_mem=2 * GIB),  # 75% free
        node("c", used_cpu=1000, used_mem=4 * GIB),  # 50% free
    ]
    result = place(PlacementRequest(count=2), nodes, [], NOW)
    assert result.nodes == ("b", "c")
    assert result.added == ("b", "c")
    assert result.unplaced == 0


def test_placed_instances_stay_put() -> None:
    """A running instance is not moved to a roomier node."""
    nodes = [node("a", used_cpu=3500), node("b")]
    result = place(PlacementRequest(count=1), nodes, ["a"], NOW)
    assert result.nodes == ("a",)
    assert result.added == ()
    assert result.removed == ()


def test_requests_must_fit_and_reservations_count() -> None:
    """A node whose free room (capacity minus the larger of use and reservations) is too small
    is skipped, and the shortfall is explained."""
    want = Resources(cpu_millicores=1500, memory_bytes=GIB)
    nodes = [
        node("a", used_cpu=3000),  # 1000m free
        node("b", reserved=Resources(3000, 0)),  # 1000m free: reserved beats measured use
        node("c", used_cpu=500, reserved=Resources(2000, 0)),  # 2000m free
    ]
    result = place(PlacementRequest(count=2, requests=want), nodes, [], NOW)
    assert result.nodes == ("c",)
    assert result.unplaced == 1
    assert result.reason == (
        "1 of 2 instance(s) not placed: 2 of 3 online matching node(s) lack room for"
        f" 1500m CPU and {GIB} bytes of memory"
    )


def test_nodes_without_metrics_are_used_last_and_only_without_requests() -> None:
    """Unknown capacity: a fallback for request-free definitions, never for ones with requests."""
    nodes = [node("new", known=False), node("old", used_cpu=3900)]
    assert place(PlacementRequest(count=1), nodes, [], NOW).nodes == ("old",)
    assert place(PlacementRequest(count=2), nodes, [], NOW).nodes == ("new", "old")
    needs = PlacementRequest(count=2, requests=Resources(100, 0))
    assert place(needs, nodes, [], NOW).nodes == ("old",)


def test_spread_balances_instances_over_a_label() -> None:
    """Four instances over zones a (3 nodes) and b (2 nodes): two in each."""
    nodes = [node(f"a{i}", zone="a") for i in range(3)] + [
        node(f"b{i}", zone="b") for i in range(2)
    ]
    result = place(PlacementRequest(count=4, spread="zone"), nodes, [], NOW)
    zones = sorted(n[0] for n in result.nodes)
    assert zones == ["a", "a", "b", "b"]


def test_spread_fills_the_emptiest_group_first_around_existing_instances() -> None:
    """Two instances already in zone a: the next goes to zone b even if a has roomier nodes."""
    nodes = [node("a0", zone="a"), node("a1", zone="a"), node("a2", zone="a"),
             node("b0", zone="b", used_cpu=2000)]  # fmt: skip
    result = place(PlacementRequest(count=3, spread="zone"), nodes, ["a0", "a1"], NOW)
    assert result.added == ("b0",)


def test_an_instance_on_a_long_offline_node_is_moved() -> None:
    """Offline past reschedule_after: moved elsewhere; offline for less: kept."""
    nodes = [
        node("a", online=False, offline_since=NOW - 600),
        node("b", online=False, offline_since=NOW - 60),
        node("c"),
        node("d"),
    ]
    request = PlacementRequest(count=2, reschedule_after=300.0)
    result = place(request, nodes, ["a", "b"], NOW)
    assert result.nodes == ("b", "c")
    assert result.removed == ("a",)
    assert result.added == ("c",)


def test_fewer_instances_wanted_removes_from_the_most_crowded_group() -> None:
    """count 3 -> 2 with spread: the extra goes from the zone with two, the fullest node."""
    nodes = [node("a0", zone="a"), node("a1", zone="a", used_mem=7 * GIB), node("b0", zone="b")]
    result = place(PlacementRequest(count=2, spread="zone"), nodes, ["a0", "a1", "b0"], NOW)
    assert result.nodes == ("a0", "b0")
    assert result.removed == ("a1",)


def test_a_node_that_no_longer_matches_loses_its_instance() -> None:
    """An instance on a node outside the candidates is removed and placed again."""
    result = place(PlacementRequest(count=1), [node("b")], ["a"], NOW)
    assert result.nodes == ("b",)
    assert result.removed == ("a",)


@pytest.mark.parametrize(
    ("candidates", "reason"),
    [
        ([], "2 of 2 instance(s) not placed: no node matches the selector"),
        (
            [node("a", online=False, offline_since=NOW)],
            "2 of 2 instance(s) not placed: every matching node is offline",
        ),
        (
            [node("a")],
            "1 of 2 instance(s) not placed: only 1 matching node(s) are online"
            " (one instance per node)",
        ),
    ],
)
def test_why_instances_could_not_be_placed(candidates: list[Candidate], reason: str) -> None:
    """Unplaced instances come with the reason in words."""
    assert place(PlacementRequest(count=2), candidates, [], NOW).reason == reason


def test_a_negative_count_is_refused() -> None:
    """count < 0 is a programming error the validation should have caught."""
    with pytest.raises(ValueError, match="count must be >= 0"):
        place(PlacementRequest(count=-1), [], [], NOW)
