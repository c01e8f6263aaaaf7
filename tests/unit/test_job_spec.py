"""JobSpec validation: each bad input is INVALID_ARGUMENT naming its field."""

from __future__ import annotations

from typing import Any

import pytest

from fleet.errors import FailedPrecondition, InvalidArgument
from fleet.v1 import common_pb2, jobs_pb2
from manager.service.job_spec import check_spec, resolve_targets
from manager.storage.records import NodeRecord


def spec(command: dict[str, Any] | None = None, **fields: Any) -> jobs_pb2.JobSpec:
    cmd = jobs_pb2.JobCommand(**(command if command is not None else {"argv": ["true"]}))
    fields.setdefault("node_ids", ["n1"])
    return jobs_pb2.JobSpec(steps=[jobs_pb2.JobStep(command=cmd)], **fields)


def node(node_id: str, **labels: str) -> NodeRecord:
    return NodeRecord(node_id, "h", "10.0.0.1", "linux", "x86_64", labels, "1", "1", "h:1")


@pytest.mark.parametrize(
    ("bad", "field", "words"),
    [
        (jobs_pb2.JobSpec(node_ids=["n1"]), "spec.steps", "at least one step"),
        (spec({"argv": []}), "spec.steps[0].command.argv", "must not be empty"),
        (spec({"script": "echo"}), "spec.steps[0].command.interpreter", "needs an interpreter"),
        (spec({"argv": ["x"], "script": "echo"}), "spec.steps[0].command.argv", "not both"),
        (spec({"argv": ["x"], "env": {"1A": "v"}}), "spec.steps[0].command.env", "variable"),
        (spec({"argv": ["x"], "cwd": "tmp"}), "spec.steps[0].command.cwd", "absolute"),
        (spec({"argv": ["x"], "user": "a b"}), "spec.steps[0].command.user", "user name"),
        (spec({"argv": ["x"], "timeout_seconds": -1}), "timeout_seconds", "0 or 1..3600"),
        (spec(timeout_seconds=0), "spec.timeout_seconds", "1..604800"),
        (spec(delivery_timeout_seconds=10**6), "spec.delivery_timeout_seconds", "0..86400"),
        (spec(max_concurrency="lots"), "spec.max_concurrency", "number or a percentage"),
        (spec(max_concurrency="0"), "spec.max_concurrency", "at least one"),
        (spec(max_errors=-1), "spec.max_errors", ">= 0"),
        (spec(canary=-2), "spec.canary", ">= 0"),
        (spec(lock="APT!"), "spec.lock", "lock name"),
        (spec(node_ids=["n1", "n1"]), "spec.node_ids[1]", "twice"),
        (spec(node_ids=[]), "spec.selector", "pick the nodes"),
        (
            spec(selector=common_pb2.LabelSelector(match_labels={"a": "b"})),
            "spec.node_ids",
            "not both",
        ),
        (
            spec(
                node_ids=[],
                selector=common_pb2.LabelSelector(match_labels={"bad key!": "b"}),
            ),
            "spec.selector",
            "",
        ),
    ],
)
def test_bad_specs_name_the_field(bad: jobs_pb2.JobSpec, field: str, words: str) -> None:
    """The message names the field and says what is wrong."""
    with pytest.raises(InvalidArgument) as caught:
        check_spec(bad)
    assert field in caught.value.message
    assert words in caught.value.message


def test_targets_come_from_node_ids_or_the_selector() -> None:
    """node_ids in their order; a selector's nodes by id; unknown ids and empty matches refused."""
    nodes = [node("b", env="prod"), node("a", env="prod"), node("c", env="dev")]
    listed = resolve_targets(check_spec(spec(node_ids=["c", "a"])), nodes)
    assert [n.node_id for n in listed] == ["c", "a"]
    prod = common_pb2.LabelSelector(match_labels={"env": "prod"})
    picked = resolve_targets(check_spec(spec(node_ids=[], selector=prod)), nodes)
    assert [n.node_id for n in picked] == ["a", "b"]
    with pytest.raises(InvalidArgument, match=r"spec.node_ids\[1\]"):
        resolve_targets(check_spec(spec(node_ids=["a", "zz"])), nodes)
    none = common_pb2.LabelSelector(match_labels={"env": "qa"})
    with pytest.raises(FailedPrecondition, match="matches no registered node") as refused:
        resolve_targets(check_spec(spec(node_ids=[], selector=none)), nodes)
    # For any client (the HTTP API, the console): no fleetctl command in the manager's words.
    assert str(refused.value) == "spec.selector: env=qa matches no registered node"
    with pytest.raises(InvalidArgument, match=r"spec\.canary"):
        resolve_targets(check_spec(spec(node_ids=["a"], canary=2)), nodes)
