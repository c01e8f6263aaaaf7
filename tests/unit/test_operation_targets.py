"""Resolving fan-out targets: selector over node labels, exactly one of agent id/type."""

from __future__ import annotations

import pytest

from fleet.errors import InvalidArgument
from fleet.selectors import parse
from manager.service.operations import Target, check_agent_choice, resolve_targets
from manager.storage.targets import Candidate

CANDIDATES = [
    Candidate("a", "web", {"env": "prod", "zone": "1"}, "10.0.0.1:7444"),
    Candidate("b", "web", {"env": "prod", "zone": "2"}, "10.0.0.2:7444"),
    Candidate("c", "web", {"env": "staging"}, "10.0.0.3:7444"),
    Candidate("d", "web", {}, "10.0.0.4:7444"),
]


@pytest.mark.parametrize(
    ("selector", "nodes"),
    [
        ("", ["a", "b", "c", "d"]),
        ("env=prod", ["a", "b"]),
        ("env!=prod", ["c", "d"]),
        ("zone>1", ["b"]),
        ("!env", ["d"]),
        ("env in (prod,staging),zone notin (1)", ["b", "c"]),
        ("env=qa", []),
    ],
)
def test_selector_picks_nodes_by_their_labels(selector: str, nodes: list[str]) -> None:
    """Only candidates whose node's labels match the selector become targets, in order."""
    targets = resolve_targets(CANDIDATES, parse(selector))
    assert [t.node_id for t in targets] == nodes


def test_targets_carry_the_daemon_address() -> None:
    """A target names the node, the agent and the address the pool dials."""
    assert resolve_targets(CANDIDATES[:1], parse("")) == [Target("a", "web", "10.0.0.1:7444")]


@pytest.mark.parametrize(
    ("agent_id", "agent_type", "needle"),
    [
        ("", "", "exactly one of agent_id and agent_type (got neither)"),
        ("web", "web", "exactly one of agent_id and agent_type (got both)"),
        ("bad id", "", "agent_id"),
        ("", "-bad", "agent_type"),
    ],
)
def test_agent_choice_must_be_exactly_one_valid_name(
    agent_id: str, agent_type: str, needle: str
) -> None:
    """Neither, both, or a malformed name is InvalidArgument naming the field."""
    with pytest.raises(InvalidArgument) as info:
        check_agent_choice(agent_id, agent_type)
    assert needle in str(info.value)


def test_one_valid_agent_choice_passes() -> None:
    """An agent id alone, or an agent type alone, is accepted."""
    check_agent_choice("web", "")
    check_agent_choice("", "worker")
