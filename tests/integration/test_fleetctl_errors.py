"""fleetctl's errors against a real manager: one line, in words, pointing at the right command.

Unknown nodes and agents name the fleetctl command that lists what exists
(the manager names the resource, fleetctl its own commands); daemons that
cannot be reached say why in words, never in gRPC's terms.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetctl_live import LiveFleet, live_fleet

NODE_9 = "fleetctl: error: node 'node-9' is not registered (see `fleetctl nodes list`)"


@pytest.fixture
def fleet(pki: Any, tmp_path: Path) -> Iterator[LiveFleet]:
    """A real manager with one real daemon (n1, agent web)."""
    with live_fleet(pki, tmp_path) as live:
        live.start_daemon("n1", "web")
        yield live


@pytest.mark.parametrize(
    "args",
    [
        ["nodes", "show", "node-9"],
        ["nodes", "label", "node-9", "tier=web"],
        ["agents", "list", "--node", "node-9"],
        ["agents", "show", "node-9/web"],
        ["agents", "logs", "node-9/web"],
        ["agents", "restart", "web", "--node", "node-9", "--yes"],
        ["metrics", "query", "--node", "node-9", "--type", "cpu"],
        ["metrics", "agent", "node-9/web"],
    ],
    ids=" ".join,
)
def test_an_unknown_node_is_one_line_pointing_at_nodes_list(
    fleet: LiveFleet, args: list[str]
) -> None:
    """Every command given an unregistered node says so the same way, exit 1."""
    result = fleet.fleetctl(*args)
    assert result.exit_code == 1, result.output
    assert NODE_9 in result.stderr.splitlines()
    assert "RegisterNode" not in result.stderr
    assert "ListNodes" not in result.stderr


def test_a_job_on_an_unknown_node_points_at_nodes_list(fleet: LiveFleet) -> None:
    """The manager refuses the spec field naming the node (INVALID_ARGUMENT); fleetctl adds
    where to see the registered ones, as for any unknown node."""
    result = fleet.fleetctl("run", "--node", "node-9", "--yes", "--", "true")
    assert result.exit_code != 0, result.output
    (line,) = result.stderr.splitlines()
    assert line.endswith(
        "spec.node_ids[0]: node 'node-9' is not registered (see `fleetctl nodes list`)"
    ), line


@pytest.mark.parametrize(
    "args",
    [["agents", "show", "n1/nope"], ["agents", "logs", "n1/nope"], ["metrics", "agent", "n1/nope"]],
    ids=" ".join,
)
def test_an_unknown_agent_points_at_agents_list_of_its_node(
    fleet: LiveFleet, args: list[str]
) -> None:
    """An agent the node does not have names it and `fleetctl agents list --node n1`."""
    result = fleet.fleetctl(*args)
    assert result.exit_code == 1, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("fleetctl: error: ")
    assert "'nope'" in line
    assert line.endswith("(see `fleetctl agents list --node n1`)")


def test_restarting_an_unknown_agent_points_at_agents_list(fleet: LiveFleet) -> None:
    """agents restart AGENT --node N for an agent N does not have points at N's agents."""
    result = fleet.fleetctl("agents", "restart", "nope", "--node", "n1", "--yes")
    assert result.exit_code == 1, result.output
    assert "(see `fleetctl agents list --node n1`)" in result.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_live_listing_says_in_words_why_a_daemon_cannot_be_asked(fleet: LiveFleet) -> None:
    """agents list --live: a refused and an unresolvable daemon are one line each, exit 1."""
    port = _closed_port()
    fleet.register("n2", daemon_address=f"127.0.0.1:{port}")
    fleet.register("n3", daemon_address="n3.invalid:7444")
    result = fleet.fleetctl("agents", "list", "--live")
    assert result.exit_code == 1, result.output
    assert sorted(result.stderr.strip().splitlines()) == [
        f"fleetctl: node n2: could not list agents: daemon at 127.0.0.1:{port} refused the"
        " connection (is fleet-daemon running there?)",
        "fleetctl: node n3: could not list agents: daemon at n3.invalid:7444: the name does"
        " not resolve (check its advertise setting)",
    ]
    assert "web" in result.stdout  # n1 answered


def test_a_manager_name_that_does_not_resolve_is_one_line(fleet: LiveFleet) -> None:
    """--manager naming a host that never resolves (.invalid) says so, no resolver text."""
    result = fleet.fleetctl("nodes", "list", "--manager", "manager.invalid:7443")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "fleetctl: error: cannot connect to the manager at manager.invalid:7443: the name"
        " does not resolve; check --manager / FLEET_MANAGER (or use an IP address)"
    )


def test_a_daemon_the_manager_cannot_reach_is_not_blamed_on_the_manager(
    fleet: LiveFleet,
) -> None:
    """A live call to a node whose daemon is down fails UNAVAILABLE naming the node: one
    line saying the manager cannot reach the node, not that the manager is unavailable."""
    port = _closed_port()
    fleet.register("n2", daemon_address=f"127.0.0.1:{port}")
    result = fleet.fleetctl("agents", "logs", "n2/web")
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == (
        f"fleetctl: error: the manager at {fleet.address} cannot reach n2: daemon at"
        f" 127.0.0.1:{port} refused the connection (is fleet-daemon running there?)"
    )
