"""fleetctl nodes list/show/label against a real mTLS FleetService (in-process)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fleetctl_fake import Fleetctl, demo_fleet, serve

from fleet.v1 import common_pb2, fleet_pb2
from fleetctl.nodes import label_notes, label_sources


@pytest.fixture
def fleetctl(pki, tmp_path: Path) -> Iterator[Fleetctl]:
    """fleetctl wired to a fake manager holding demo_fleet()."""
    with serve(pki.issue("manager", "manager"), demo_fleet()) as manager:
        yield Fleetctl(manager, pki.issue("operator", "alice"), tmp_path)


def test_nodes_list_table_shows_every_node(fleetctl: Fleetctl) -> None:
    """A plain `nodes list` prints one row per node with status and labels."""
    result = fleetctl("nodes", "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["NODE", "STATUS", "AGENTS"]
    assert [line.split()[0] for line in lines[1:]] == ["node-1", "node-2", "node-3"]
    assert "env=prod,tier=web" in lines[1]
    assert "ONLINE" in lines[1]


def test_nodes_list_selector_filters_and_is_sent_as_proto(fleetctl: Fleetctl) -> None:
    """-l sends the parsed selector; only matching nodes are listed."""
    result = fleetctl("-o", "json", "nodes", "list", "-l", "env=prod, tier in (web)")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [n["node_id"] for n in data["nodes"]] == ["node-1", "node-2"]


def test_invalid_selector_is_a_usage_error_with_position(fleetctl: Fleetctl) -> None:
    """A selector that does not parse exits 2 with one line naming the position, sending nothing."""
    result = fleetctl("nodes", "list", "-l", "env in (prod")
    assert result.exit_code == 2
    assert result.stdout == ""
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("fleetctl: error: invalid selector 'env in (prod': position")
    assert fleetctl.manager.fleet.requests == []


def test_nodes_show_yaml_parses(fleetctl: Fleetctl) -> None:
    """-o yaml prints one YAML document with the node's fields."""
    result = fleetctl("-o", "yaml", "nodes", "show", "node-3")
    assert result.exit_code == 0, result.output
    node = yaml.safe_load(result.stdout)
    assert node["node_id"] == "node-3"
    assert node["labels"] == {"env": "staging"}
    assert node["status"] == "ONLINE"
    assert node["agents"] == {}


def test_nodes_show_says_when_the_host_refuses_jobs(fleetctl: Fleetctl) -> None:
    """A node whose daemon has [jobs] enabled = false shows "Jobs: disabled"; others "enabled"."""
    fleetctl.manager.fleet.nodes["node-2"].jobs_disabled = True
    shown = fleetctl("nodes", "show", "node-2")
    assert shown.exit_code == 0, shown.output
    assert (
        "Jobs:            disabled (jobs.enabled = false in the host's daemon config)"
        in shown.stdout
    )
    assert "Jobs:            enabled" in fleetctl("nodes", "show", "node-1").stdout
    data = json.loads(fleetctl("-o", "json", "nodes", "show", "node-2").stdout)
    assert data["jobs_disabled"] is True


def test_nodes_show_of_a_revoked_node_quotes_the_command_that_reenrolls_it(
    fleetctl: Fleetctl,
) -> None:
    """A revoked node's certificate line names the whole command, not only its flag."""
    fleetctl.manager.fleet.nodes["node-2"].revoke_time = int(time.time() * 1000) - 60_000
    shown = fleetctl("nodes", "show", "node-2")
    assert shown.exit_code == 0, shown.output
    assert (
        "refused until it enrolls again with a token made with"
        " `fleetctl tokens create --node-name node-2`" in " ".join(shown.stdout.split())
    )


def test_nodes_list_and_show_say_whether_each_node_runs_its_desired_version(
    fleetctl: Fleetctl,
) -> None:
    """DESIRED is "in sync", "DRIFT" or "-" (no definition selects it); show says why."""
    nodes = fleetctl.manager.fleet.nodes
    nodes["node-1"].MergeFrom(fleet_pb2.Node(desired_version=4, reported_version=4))
    nodes["node-2"].MergeFrom(
        fleet_pb2.Node(
            desired_version=5,
            reported_version=4,
            drift=True,
            drift_reason="runs version 4, should run 5",
        )
    )
    listed = fleetctl("nodes", "list")
    assert listed.exit_code == 0, listed.output
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:4] == ["NODE", "STATUS", "AGENTS", "DESIRED"]
    assert [row.split()[3] for row in rows] == ["in", "DRIFT", "-"]
    assert rows[0].split()[3:5] == ["in", "sync"]
    wide = fleetctl("-o", "wide", "nodes", "list").stdout
    assert "runs version 4, should run 5" in wide

    shown = fleetctl("nodes", "show", "node-2").stdout
    assert (
        "Desired state:   DRIFT: runs version 4, should run 5 (version 5, daemon reports 4)"
        in shown
    )
    assert "in sync (version 4, daemon reports 4)" in fleetctl("nodes", "show", "node-1").stdout
    assert "- (no definition has selected this node)" in fleetctl("nodes", "show", "node-3").stdout

    nodes["node-2"].update_errors.append(
        common_pb2.UpdateError(agent_id="web", revision=2, reason="defined in the host's TOML")
    )
    shown = fleetctl("nodes", "show", "node-2").stdout
    assert "DRIFT: the daemon refused 1 agent(s) (version 5, daemon reports 4)" in shown
    assert "refused web (revision 2): defined in the host's TOML" in shown
    data = json.loads(fleetctl("-o", "json", "nodes", "show", "node-2").stdout)
    assert (data["desired_version"], data["reported_version"], data["drift"]) == (5, 4, True)
    assert data["update_errors"] == [
        {"agent_id": "web", "revision": 2, "reason": "defined in the host's TOML"}
    ]


def test_nodes_show_and_wide_list_say_how_the_control_stream_is(fleetctl: Fleetctl) -> None:
    """A lost stream explains an ONLINE node with a fresh heartbeat: when it broke and when
    the node goes offline; connected, on another replica, none, unknown."""
    now_ms = int(time.time() * 1000)  # fleetctl's own clock
    nodes = fleetctl.manager.fleet.nodes
    nodes["node-1"].MergeFrom(
        fleet_pb2.Node(
            stream_state=fleet_pb2.CONTROL_STREAM_STATE_CONNECTED, stream_since=now_ms - 90_000
        )
    )
    nodes["node-2"].MergeFrom(
        fleet_pb2.Node(
            stream_state=fleet_pb2.CONTROL_STREAM_STATE_LOST,
            stream_since=now_ms - 8_000,
            stream_offline_at=now_ms + 3_600_000,
        )
    )
    nodes["node-3"].MergeFrom(
        fleet_pb2.Node(stream_state=fleet_pb2.CONTROL_STREAM_STATE_ELSEWHERE, stream_replica="m2")
    )
    shown = fleetctl("nodes", "show", "node-2").stdout
    assert "Control stream:  lost " in shown
    assert "OFFLINE in 59m" in shown
    assert "unless it reconnects" in shown
    assert "Control stream:  connected since " in fleetctl("nodes", "show", "node-1").stdout
    assert "connected to replica m2" in fleetctl("nodes", "show", "node-3").stdout
    header, *rows = fleetctl("-o", "wide", "nodes", "list").stdout.splitlines()
    at = header.index("STREAM")
    assert [row[at:].split()[0] for row in rows] == ["connected", "lost", "on"]
    # The plain list says why an ONLINE node has not been heard for a while.
    header, *rows = fleetctl("nodes", "list").stdout.splitlines()
    assert ["(stream lost)" in row for row in rows] == [False, True, False]
    data = json.loads(fleetctl("-o", "json", "nodes", "list").stdout)
    assert [n["stream"] for n in data["nodes"]] == ["CONNECTED", "LOST", "ELSEWHERE"]
    assert "stream_cell" not in data["nodes"][0]  # table cells stay out of JSON

    nodes["node-3"].stream_state = fleet_pb2.CONTROL_STREAM_STATE_NONE
    assert (
        "Control stream:  none (the daemon heartbeats over unary calls)"
        in fleetctl("nodes", "show", "node-3").stdout
    )
    nodes["node-3"].stream_state = fleet_pb2.CONTROL_STREAM_STATE_UNSPECIFIED
    assert "Control stream:  unknown" in fleetctl("nodes", "show", "node-3").stdout


def test_an_offline_nodes_agent_counts_are_marked_as_last_reported(fleetctl: Fleetctl) -> None:
    """An OFFLINE node's agents are what its daemon last said (it may have been killed with
    them still running): the table marks them * with a note, `show` says so; JSON has the
    counts and the status, not the table's cell."""
    nodes = fleetctl.manager.fleet.nodes
    running = [fleet_pb2.AgentCount(status=common_pb2.AGENT_STATUS_RUNNING, count=2)]
    for node_id in ("node-1", "node-2"):
        nodes[node_id].agent_counts.extend(running)
    nodes["node-2"].status = common_pb2.NODE_STATUS_OFFLINE

    result = fleetctl("nodes", "list")
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    at = header.index("AGENTS")
    assert [row[at:].split()[0] for row in rows] == ["2/2", "2/2*", "0"]
    assert result.stderr.strip() == (
        "fleetctl: agents marked * are what the daemon last reported: the node is not ONLINE"
    )
    assert fleetctl("nodes", "list", "-l", "env=staging").stderr == ""  # nothing marked

    def agents_line(node_id: str) -> str:
        shown = fleetctl("nodes", "show", node_id).stdout.splitlines()
        return next(line.rstrip() for line in shown if line.startswith("Agents:"))

    assert agents_line("node-1") == "Agents:          2 RUNNING"
    assert agents_line("node-2") == (
        "Agents:          2 RUNNING (as its daemon last reported; the node is OFFLINE)"
    )
    data = json.loads(fleetctl("-o", "json", "nodes", "list").stdout)
    assert data["nodes"][1]["agents"] == {"RUNNING": 2}
    assert "agents_cell" not in data["nodes"][1]


def test_nodes_show_unknown_node_exits_1_with_one_line(fleetctl: Fleetctl) -> None:
    """An unknown node is NOT_FOUND: exit 1, the server's message on one line."""
    result = fleetctl("nodes", "show", "nope")
    assert result.exit_code == 1
    assert result.stderr.strip() == "fleetctl: error: node 'nope' is not registered"


def test_nodes_label_sets_and_removes(fleetctl: Fleetctl) -> None:
    """kubectl syntax: k=v sets, k- removes, in one UpdateNodeLabels call."""
    result = fleetctl("nodes", "label", "node-1", "zone=a", "tier-")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "node/node-1 labeled: env=prod,zone=a"
    assert dict(fleetctl.manager.fleet.nodes["node-1"].labels) == {"env": "prod", "zone": "a"}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ("zone", "use key=value to set or key- to remove"),
        ("bad_=1", "label change 'bad_=1'"),
        ("zone=a b", "label change 'zone=a b'"),
    ],
)
def test_nodes_label_rejects_bad_changes(fleetctl: Fleetctl, change: str, problem: str) -> None:
    """A malformed label change exits 2 with one line and changes nothing."""
    result = fleetctl("nodes", "label", "node-1", change)
    assert result.exit_code == 2
    assert problem in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert fleetctl.manager.fleet.requests == []


def test_click_usage_errors_are_one_line(fleetctl: Fleetctl) -> None:
    """An unknown option is exit 2 with one line pointing at --help, not a panel."""
    result = fleetctl("nodes", "list", "--bogus")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "fleetctl: error: No such option: --bogus (see 'fleetctl nodes list --help')"
    ]


@pytest.mark.parametrize("command", [["agents", "show"], ["agents", "logs"], ["metrics", "agent"]])
def test_node_and_agent_as_two_words_says_how_to_write_them(
    fleetctl: Fleetctl, command: list[str]
) -> None:
    """`agents show node-1 web` is one line naming the shape NODE/AGENT takes, nothing asked."""
    result = fleetctl(*command, "node-1", "web")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "fleetctl: error: Got unexpected extra argument(s) (web): give the agent as NODE/AGENT,"
        f" e.g. node-1/web (see 'fleetctl {' '.join(command)} --help')"
    ]
    assert fleetctl.manager.fleet.requests == []
    # Other extra arguments keep click's line.
    other = fleetctl(*command, "node-1/web", "more")
    assert other.stderr.splitlines() == [
        "fleetctl: error: Got unexpected extra argument(s) (more)"
        f" (see 'fleetctl {' '.join(command)} --help')"
    ]


def test_bad_choice_reads_without_validator_prefix(fleetctl: Fleetctl) -> None:
    """A value outside a choice says which values are allowed, without pydantic's 'Value error,'."""
    result = fleetctl("-o", "xml", "nodes", "list")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "fleetctl: error: Invalid value for '--output' / '-o': 'xml' is not one of 'table',"
        " 'wide', 'json', 'yaml'. (see 'fleetctl --help')"
    ]


def test_piped_tables_never_wrap(fleetctl: Fleetctl) -> None:
    """Without a terminal (and no COLUMNS) a long row stays on one line, for grep and awk."""
    labels = {f"team.example.com/label-{i}": "x" * 40 for i in range(4)}
    fleetctl.manager.fleet.nodes["node-1"].labels.update(labels)
    result = fleetctl("nodes", "list", env={"COLUMNS": None})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    assert len(lines[1]) > 200


def _labelled_node() -> fleet_pb2.Node:
    return fleet_pb2.Node(
        node_id="n1",
        labels={"canary": "true", "env": "canary", "zone": "a"},
        daemon_labels={"env": "prod", "zone": "a"},
        operator_labels={"canary": "true", "env": "canary"},
    )


def test_label_sources_say_where_each_label_comes_from() -> None:
    """`nodes show -o wide` lines: daemon config, operator, operator overriding the daemon."""
    assert label_sources(_labelled_node()) == [
        "canary=true (operator)",
        "env=canary (operator; overrides 'prod' from the daemon config)",
        "zone=a (daemon config)",
    ]


def test_label_notes_explain_overrides_and_daemon_values() -> None:
    """After `nodes label`, the operator learns what overrides and what the daemon still sets."""
    node = _labelled_node()
    assert label_notes(node, {"env": "canary"}, []) == [
        "env=canary overrides env=prod from the daemon's config; 'env-' removes the override"
    ]
    after = fleet_pb2.Node(labels={"env": "prod"}, daemon_labels={"env": "prod"})
    assert label_notes(after, {}, ["env"]) == [
        "env: the operator's value is removed; env=prod from the daemon's config applies"
        " (only the host can change that one)"
    ]
    assert label_notes(node, {"canary": "false"}, ["other"]) == []
    assert label_notes(node, {}, ["nope"], absent=["nope"]) == [
        "nope: n1 has no such label; nothing removed"
    ]


def test_nodes_label_says_when_a_key_to_remove_was_not_there(fleetctl: Fleetctl) -> None:
    """`k-` for a key the node lacks succeeds (kubectl) but says nothing was removed."""
    result = fleetctl("nodes", "label", "node-1", "nope-", "tier-")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "node/node-1 labeled: env=prod"
    assert result.stderr.strip() == "fleetctl: nope: node-1 has no such label; nothing removed"
