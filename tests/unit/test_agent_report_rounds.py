"""How a group of SyncAgentStates reports is cut into runs with each node once."""

from __future__ import annotations

import asyncio

from manager.service.agents import _rounds, _Sync


def _group(*node_ids: str) -> list[_Sync]:
    loop = asyncio.new_event_loop()
    try:
        return [_Sync(n, [], 0, None, done=loop.create_future()) for n in node_ids]
    finally:
        loop.close()


def test_each_node_once_per_run_in_arrival_order_per_node() -> None:
    """A node that reported twice has its later report in a later run; runs keep the order
    they were given (node order, for row locks)."""
    group = _group("b", "a", "b", "c", "b")
    order = sorted(range(len(group)), key=lambda i: group[i].node_id)  # stable
    assert _rounds(order, group) == [[1, 0, 3], [2], [4]]


def test_distinct_nodes_make_one_run() -> None:
    group = _group("a", "b", "c")
    assert _rounds([0, 1, 2], group) == [[0, 1, 2]]
    assert _rounds([], group) == []
