"""fleetctl agents list/show/logs/operate against a real mTLS FleetService (in-process)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleetctl_fake import NOW_MS, Fleetctl, demo_fleet, serve

from fleet.v1 import common_pb2
from fleetctl.timespec import format_time


@pytest.fixture
def fleetctl(pki, tmp_path: Path) -> Iterator[Fleetctl]:
    """fleetctl wired to a fake manager holding demo_fleet()."""
    with serve(pki.issue("manager", "manager"), demo_fleet()) as manager:
        yield Fleetctl(manager, pki.issue("operator", "alice"), tmp_path)


def test_agents_list_all_nodes(fleetctl: Fleetctl) -> None:
    """Without --node or -l every node's agents are listed, sorted by node and agent."""
    result = fleetctl("agents", "list")
    assert result.exit_code == 0, result.output
    rows = [line.split()[:4] for line in result.stdout.splitlines()[1:]]
    assert rows == [
        ["node-1", "web", "web", "RUNNING"],
        ["node-1", "worker-1", "worker", "RUNNING"],
        ["node-2", "web", "web", "RUNNING"],
        ["node-2", "worker-2", "worker", "RUNNING"],
        ["node-3", "web", "web", "RUNNING"],
    ]


def test_agents_list_wide_adds_columns(fleetctl: Fleetctl) -> None:
    """-o wide shows the extra columns (HEALTH, VERSION, REV, LAST EXIT, MESSAGE, LABELS)."""
    result = fleetctl("-o", "wide", "agents", "list", "--node", "node-3")
    assert result.exit_code == 0, result.output
    header = result.stdout.splitlines()[0].split()
    assert header[-7:] == ["HEALTH", "VERSION", "REV", "LAST", "EXIT", "MESSAGE", "LABELS"]


def test_agents_list_node_and_selector_conflict(fleetctl: Fleetctl) -> None:
    """--node and -l together is a usage error (exit 2), nothing sent."""
    result = fleetctl("agents", "list", "--node", "node-1", "-l", "env=prod")
    assert result.exit_code == 2
    assert "not both" in result.stderr
    assert fleetctl.manager.fleet.requests == []


def test_agents_list_live_reports_unreachable_nodes_and_exits_1(fleetctl: Fleetctl) -> None:
    """--live with a daemon down lists the others, names the failed node, exits 1."""
    fleetctl.manager.fleet.down.add("node-2")
    result = fleetctl("-o", "json", "agents", "list", "-l", "env=prod", "--live")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert {a["node_id"] for a in data["agents"]} == {"node-1"}
    assert data["errors"][0]["node_id"] == "node-2"


def test_agents_show_and_unknown_agent(fleetctl: Fleetctl) -> None:
    """show NODE/AGENT prints the agent; an unknown agent is one line, exit 1."""
    ok = fleetctl("-o", "json", "agents", "show", "node-1/worker-1")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["type"] == "worker"
    missing = fleetctl("agents", "show", "node-1/nope")
    assert missing.exit_code == 1
    assert missing.stderr.strip() == (
        "fleetctl: error: node 'node-1' has no agent 'nope'"
        " (see `fleetctl agents list --node node-1`)"
    )


def test_agents_show_says_whether_the_output_is_being_lost(fleetctl: Fleetctl) -> None:
    """An agent whose log's filesystem is full shows "Output: BEING LOST: <why>"."""
    problem = "no space left on the filesystem of /logs/worker-1.log: ..."
    info = next(a for a in fleetctl.manager.fleet.agents["node-1"] if a.id == "worker-1")
    assert "Output:          logged" in fleetctl("agents", "show", "node-1/worker-1").stdout
    info.log_problem = problem
    shown = fleetctl("agents", "show", "node-1/worker-1")
    assert f"Output:          BEING LOST: {problem}" in shown.stdout
    assert (
        json.loads(fleetctl("-o", "json", "agents", "show", "node-1/worker-1").stdout)[
            "log_problem"
        ]
        == problem
    )


def test_agents_show_needs_node_slash_agent(fleetctl: Fleetctl) -> None:
    """A reference without a slash is a usage error naming the expected shape."""
    result = fleetctl("agents", "show", "web")
    assert result.exit_code == 2
    assert "expected NODE/AGENT" in result.stderr


def test_agents_logs_tail_and_follow(fleetctl: Fleetctl) -> None:
    """--tail N prints the last N lines; -f then streams what comes after."""
    fleetctl.manager.fleet.logs["node-1", "web"] = b"".join(b"line %d\n" % i for i in range(10))
    tail = fleetctl("agents", "logs", "node-1/web", "--tail", "2")
    assert tail.exit_code == 0, tail.output
    assert tail.stdout == "line 8\nline 9\n"
    follow = fleetctl("agents", "logs", "node-1/web", "--tail", "1", "-f")
    assert follow.stdout == "line 9\nfollowed line\n"
    everything = fleetctl("agents", "logs", "node-1/web")
    assert everything.stdout.count("\n") == 10


def test_restart_one_agent_on_a_node(fleetctl: Fleetctl) -> None:
    """--node N AGENT restarts just that agent (no prompt for one target) and shows the pid."""
    before = fleetctl.manager.fleet.agents["node-1"][0].pid
    result = fleetctl("agents", "restart", "web", "--node", "node-1")
    assert result.exit_code == 0, result.output
    assert fleetctl.manager.fleet.operations == [("node-1", "web", "restart")]
    after = fleetctl.manager.fleet.agents["node-1"][0].pid
    assert after != before
    assert str(after) in result.stdout
    assert "1 ok, 0 failed, 0 skipped of 1" in result.stdout


def test_node_slash_agent_as_show_takes_it_is_answered_with_the_command(
    fleetctl: Fleetctl,
) -> None:
    """`agents stop node-1/web` (show's spelling) exits 2 saying the command that does it."""
    result = fleetctl("agents", "stop", "node-1/web")
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1
    assert err.endswith("; for node-1/web: fleetctl agents stop web --node node-1"), err
    assert fleetctl.manager.fleet.operations == []


def test_an_operation_past_our_deadline_is_said_in_words(fleetctl: Fleetctl) -> None:
    """--node N AGENT whose answer does not come within --timeout: exit 1, the node and the
    timeout named, not gRPC's 'Stream removed (Deadline Exceeded)'."""
    fleetctl.manager.fleet.slow.add("node-1")
    result = fleetctl("--timeout", "0.5", "agents", "restart", "web", "--node", "node-1")
    assert result.exit_code == 1
    assert "Deadline Exceeded" not in result.output
    assert (
        f"node-1: the manager at {fleetctl.manager.address} did not answer within 0.5 s;"
        " the operation may still happen (raise --timeout)"
    ) in result.stderr


def test_fanout_without_tty_or_yes_refuses(fleetctl: Fleetctl) -> None:
    """A fan-out over several targets without --yes and without a terminal is refused (exit 2)."""
    result = fleetctl("agents", "restart", "web", "-l", "env=prod")
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1
    assert "on 2 targets" in err
    assert "--yes" in err
    assert fleetctl.manager.fleet.operations == []


def test_plan_touches_nothing(fleetctl: Fleetctl) -> None:
    """--plan lists the resolved targets and performs no operation."""
    result = fleetctl("-o", "json", "agents", "operate", "stop", "web", "-l", "env", "--plan")
    assert result.exit_code == 0, result.output
    targets = json.loads(result.stdout)["targets"]
    assert [(t["node_id"], t["outcome"]) for t in targets] == [
        ("node-1", "PLANNED"),
        ("node-2", "PLANNED"),
        ("node-3", "PLANNED"),
    ]
    assert fleetctl.manager.fleet.operations == []


def test_fanout_with_yes_reports_each_target_and_summary(fleetctl: Fleetctl) -> None:
    """--yes runs the fan-out; the table lists each target and the summary counts them."""
    result = fleetctl("agents", "operate", "restart", "worker", "--type", "-l", "env=prod", "--yes")
    assert result.exit_code == 0, result.output
    assert sorted(fleetctl.manager.fleet.operations) == [
        ("node-1", "worker-1", "restart"),
        ("node-2", "worker-2", "restart"),
    ]
    assert "2 ok, 0 failed, 0 skipped of 2" in result.stdout
    assert "operation op-1" in result.stdout


def test_fanout_asks_for_batches_and_reports_every_result_in_them(fleetctl: Fleetctl) -> None:
    """fleetctl asks for batch_results; several results in one message are each reported."""
    fleetctl.manager.fleet.down.add("node-3")
    result = fleetctl(
        "-o", "json", "agents", "restart", "web", "-l", "env", "--max-concurrency", "3", "--yes"
    )  # fmt: skip
    assert result.exit_code == 1
    # The plan (three targets) and the run (one window of three) came as one message each.
    assert fleetctl.manager.fleet.batches == [3, 3]
    data = json.loads(result.stdout)
    outcomes = {t["node_id"]: t["outcome"] for t in data["targets"]}
    assert outcomes == {"node-1": "OK", "node-2": "OK", "node-3": "FAILED"}
    assert "node-3/web:" in result.stderr


def test_fanout_with_a_down_daemon_exits_1_and_names_it(fleetctl: Fleetctl) -> None:
    """One daemon down: its target is FAILED with the reason, the others ok, exit 1."""
    fleetctl.manager.fleet.down.add("node-2")
    result = fleetctl("-o", "json", "agents", "restart", "web", "-l", "env", "--yes")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    outcomes = {t["node_id"]: t["outcome"] for t in data["targets"]}
    assert outcomes == {"node-1": "OK", "node-2": "FAILED", "node-3": "OK"}
    assert data["summary"]["failed"] == 1
    assert "node-2/web: node node-2: daemon at 127.0.0.1:1 unreachable" in result.stderr


def test_max_errors_stops_the_rollout(fleetctl: Fleetctl) -> None:
    """--max-errors 1 with concurrency 1: after the first failure the rest is SKIPPED."""
    fleetctl.manager.fleet.down.add("node-1")
    result = fleetctl(
        "-o", "json", "agents", "restart", "web", "-l", "env",
        "--max-concurrency", "1", "--max-errors", "1", "--yes",
    )  # fmt: skip
    assert result.exit_code == 1
    outcomes = [t["outcome"] for t in json.loads(result.stdout)["targets"]]
    assert outcomes == ["FAILED", "SKIPPED", "SKIPPED"]
    assert fleetctl.manager.fleet.operations == []


def test_node_type_fanout_runs_locally_within_the_window(fleetctl: Fleetctl) -> None:
    """--node N --type T operates every agent of that type on the node, <= window at once."""
    fleet = fleetctl.manager.fleet
    fleet.add_node("node-9", {}, [f"w{i}:worker" for i in range(6)] + ["web"])
    result = fleetctl(
        "-o", "json", "agents", "stop", "worker", "--type", "--node", "node-9",
        "--max-concurrency", "2", "--yes",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(a for _, a, _ in fleet.operations) == [f"w{i}" for i in range(6)]
    assert fleet.max_in_flight <= 2
    assert json.loads(result.stdout)["summary"]["ok"] == 6


def test_nothing_matches_is_a_failure(fleetctl: Fleetctl) -> None:
    """An operation that matches no agent exits 1 saying so, rather than pretending success."""
    result = fleetctl("agents", "restart", "db", "-l", "env=prod", "--yes")
    assert result.exit_code == 1
    assert "nothing to restart: no agent db on nodes matching 'env=prod'" in result.stderr


def test_operate_needs_exactly_one_target_option(fleetctl: Fleetctl) -> None:
    """Neither --node nor -l is a usage error: fleetctl never guesses "everything"."""
    result = fleetctl("agents", "restart", "web")
    assert result.exit_code == 2
    assert "exactly one of them" in result.stderr


def test_a_broken_result_stream_still_shows_what_happened(fleetctl: Fleetctl) -> None:
    """The manager dies mid fan-out: the finished targets are shown, then one error, exit 1."""
    fleetctl.manager.fleet.break_after = 1
    result = fleetctl(
        "agents", "restart", "web", "-l", "env", "--max-concurrency", "1", "--yes"
    )  # fmt: skip
    assert result.exit_code == 1
    assert "node-1" in result.stdout
    assert "OK" in result.stdout
    assert "broke after 1 of 3 targets" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"fleetctl: error: manager at {fleetctl.manager.address} is unavailable:"
        " the manager is shutting down"
    )


def _set(fleetctl: Fleetctl, node: str, agent: str, **fields: object) -> None:
    """Change an agent's state as the fake manager knows it."""
    for info in fleetctl.manager.fleet.agents[node]:
        if info.id == agent:
            for name, value in fields.items():
                if name == "last_exit":
                    info.last_exit.CopyFrom(value)  # type: ignore[arg-type]
                else:
                    setattr(info, name, value)


def test_status_filter_is_sent_and_applied(fleetctl: Fleetctl) -> None:
    """--status fatal,BACKOFF (any case) asks the manager for exactly those states."""
    _set(fleetctl, "node-1", "worker-1", status=common_pb2.AGENT_STATUS_FATAL, pid=0)
    _set(fleetctl, "node-2", "web", status=common_pb2.AGENT_STATUS_BACKOFF, pid=0)
    result = fleetctl("-o", "json", "agents", "list", "--status", "fatal, BACKOFF")
    assert result.exit_code == 0, result.output
    shown = [
        (a["node_id"], a["agent_id"], a["status"]) for a in json.loads(result.stdout)["agents"]
    ]
    assert shown == [("node-1", "worker-1", "FATAL"), ("node-2", "web", "BACKOFF")]
    (_, request), *_ = fleetctl.manager.fleet.requests
    assert list(request.statuses) == [
        common_pb2.AGENT_STATUS_FATAL,
        common_pb2.AGENT_STATUS_BACKOFF,
    ]


def test_an_unknown_status_is_one_line_naming_the_valid_ones(fleetctl: Fleetctl) -> None:
    """A typo in --status exits 2 before anything is sent, listing the states there are."""
    result = fleetctl("agents", "list", "--status", "RUNNING,runing")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "fleetctl: error: --status: unknown agent state 'runing'; one of STOPPED, STARTING,"
        " RUNNING, BACKOFF, STOPPING, EXITED, FATAL, UNKNOWN"
    )
    assert fleetctl.manager.fleet.requests == []


def test_unhealthy_lists_only_agents_failing_their_check(fleetctl: Fleetctl) -> None:
    """--unhealthy keeps the UNHEALTHY agents, not the healthy or pending ones."""
    _set(fleetctl, "node-1", "web", health=common_pb2.AGENT_HEALTH_HEALTHY)
    _set(fleetctl, "node-2", "web", health=common_pb2.AGENT_HEALTH_UNHEALTHY)
    _set(fleetctl, "node-3", "web", health=common_pb2.AGENT_HEALTH_PENDING)
    result = fleetctl("agents", "list", "--unhealthy")
    assert result.exit_code == 0, result.output
    assert [line.split()[:2] for line in result.stdout.splitlines()[1:]] == [["node-2", "web"]]


def test_filters_hold_with_a_manager_that_ignores_them(fleetctl: Fleetctl) -> None:
    """A manager from before the filters answers with every agent: fleetctl still shows only
    the ones asked for, never more."""
    fleetctl.manager.fleet.ignores_filters = True
    _set(fleetctl, "node-3", "web", status=common_pb2.AGENT_STATUS_FATAL, pid=0)
    _set(fleetctl, "node-2", "web", health=common_pb2.AGENT_HEALTH_UNHEALTHY)
    fatal = json.loads(fleetctl("-o", "json", "agents", "list", "--status", "FATAL").stdout)
    assert [(a["node_id"], a["agent_id"]) for a in fatal["agents"]] == [("node-3", "web")]
    sick = json.loads(fleetctl("-o", "json", "agents", "list", "--unhealthy").stdout)
    assert [(a["node_id"], a["agent_id"]) for a in sick["agents"]] == [("node-2", "web")]


def test_agents_of_an_offline_node_are_stale_in_every_format(fleetctl: Fleetctl) -> None:
    """OFFLINE node-3: its agent's state is starred with a note on stderr saying since when;
    json and yaml carry stale and reported_at; the online nodes' agents are not stale."""
    reported_ms = int(time.time() * 1000) - 10 * 60_000
    fleetctl.manager.fleet.take_offline("node-3", reported_ms)
    table = fleetctl("agents", "list")
    assert table.exit_code == 0, table.output
    rows = {tuple(line.split()[:2]): line.split()[3] for line in table.stdout.splitlines()[1:]}
    assert rows[("node-3", "web")] == "RUNNING*"
    assert rows[("node-1", "web")] == "RUNNING"
    (note,) = table.stderr.splitlines()
    assert re.fullmatch(
        r"fleetctl: node node-3 is OFFLINE: its agents \(marked \*\) are what its daemon last"
        r" reported, 10m(\d+s)? ago",
        note,
    ), note
    wide = fleetctl("-o", "wide", "agents", "list", "--node", "node-3")
    assert "RUNNING*" in wide.stdout
    data = json.loads(fleetctl("-o", "json", "agents", "list").stdout)
    stale = {(a["node_id"], a["agent_id"]): a for a in data["agents"]}
    assert stale["node-3", "web"]["stale"] is True
    assert stale["node-3", "web"]["reported_at_ms"] == reported_ms
    assert stale["node-3", "web"]["reported_at"] == format_time(reported_ms)
    assert stale["node-1", "web"]["stale"] is False
    yaml_out = fleetctl("-o", "yaml", "agents", "list", "--node", "node-3").stdout
    assert "stale: true" in yaml_out
    assert f"reported_at: '{format_time(reported_ms)}'" in yaml_out


def test_show_has_the_state_last_exit_and_the_spec_without_env_values(
    fleetctl: Fleetctl,
) -> None:
    """show asks the daemon: state and health, the last exit in words, and the spec it runs
    (command, env names, restart, stop, log file); env values never appear."""
    _set(
        fleetctl,
        "node-1",
        "web",
        health=common_pb2.AGENT_HEALTH_UNHEALTHY,
        health_message="GET http://127.0.0.1:8080/healthz: 503",
        health_since=NOW_MS - 60_000,
        revision=4,
        exit_code=-9,
        last_exit=common_pb2.LastExit(
            kind=common_pb2.AGENT_EXIT_KIND_KILLED,
            exit_code=-9,
            reason="killed by SIGKILL",
            time=NOW_MS - 120_000,
        ),
    )
    result = fleetctl("agents", "show", "node-1/web")
    assert result.exit_code == 0, result.output
    lines = {
        label.strip(): value.strip()
        for label, _, value in (line.partition(":") for line in result.stdout.splitlines())
    }
    assert lines["Health"].startswith("UNHEALTHY since 2027-01-15T07:59:00")
    assert lines["Health"].endswith("): GET http://127.0.0.1:8080/healthz: 503")
    assert lines["Revision"] == "4 (of the definition web)"
    assert lines["Last exit"].startswith("killed by SIGKILL (exit code -9), 2027-01-15T07:58:00")
    assert lines["Command"] == "/opt/web/bin/web --port 8080"
    assert lines["Env (names)"] == "DB_PASSWORD,LOG_LEVEL"
    assert lines["Restart policy"].startswith("on_failure; autostart yes")
    assert lines["Stop"] == "SIGTERM, then SIGKILL after 10s"
    assert lines["Health check"] == "none"
    assert lines["Log file"] == "/var/log/fleet/agents/web.log"
    assert lines["Reported"] == "live (asked the daemon now)"
    assert result.stderr == ""
    (_, request), *_ = fleetctl.manager.fleet.requests
    assert request.live


def test_show_falls_back_to_the_last_report_when_the_daemon_is_down(fleetctl: Fleetctl) -> None:
    """The daemon unreachable: the stored state, when it was reported, the spec marked
    unavailable with the reason, a warning, exit 0; with --live it is an error instead."""
    fleetctl.manager.fleet.take_offline("node-3", NOW_MS - 60_000)
    result = fleetctl("agents", "show", "node-3/web")
    assert result.exit_code == 0, result.output
    assert "Spec:" in result.stdout
    assert (
        "unavailable: the daemon could not be asked (daemon at 127.0.0.1:1 refused the connection)"
        in result.stdout
    )
    assert "Reported:" in result.stdout
    assert "the node is OFFLINE, this is what its daemon last said" in result.stdout
    assert "live (asked" not in result.stdout
    assert result.stderr.startswith("fleetctl: node node-3: showing the state its daemon last")
    data = json.loads(fleetctl("-o", "json", "agents", "show", "node-3/web").stdout)
    assert (data["stale"], data["spec"]) == (True, None)
    assert data["spec_unavailable"] == (
        "the daemon could not be asked (daemon at 127.0.0.1:1 refused the connection)"
    )
    live = fleetctl("agents", "show", "node-3/web", "--live")
    assert live.exit_code == 1
    assert live.stdout == ""
    assert "daemon at 127.0.0.1:1 refused the connection" in live.stderr
