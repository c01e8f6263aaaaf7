"""What an agent-state-changed event says: the change and its reason, in words (pure)."""

from __future__ import annotations

import dataclasses

import pytest

from manager.storage.agents import describe_change
from manager.storage.records import AgentStateRecord

RUNNING = AgentStateRecord(
    node_id="n1",
    agent_id="web",
    status="RUNNING",
    pid=41,
    type="web",
    version="1.0",
    start_time_ms=1_000,
    health="UNSPECIFIED",
    config_version=3,
    message="running with pid 41",
)


def _then(**changes: object) -> AgentStateRecord:
    return dataclasses.replace(RUNNING, **changes)  # type: ignore[arg-type]


KILLED = _then(
    pid=57,
    start_time_ms=2_000,
    restart_count=1,
    exit_code=-9,
    last_exit_kind="killed",
    last_exit_code=-9,
    last_exit_reason="killed by SIGKILL",
    last_exit_ms=1_900,
    message="running with pid 57",
)


def test_a_restart_seen_as_running_to_running_says_why() -> None:
    """A new pid while RUNNING reads "restarted (pid a -> b): <reason>"; attributes carry it."""
    message, attributes = describe_change("n1", "web", RUNNING, KILLED)
    assert message == "web on n1 restarted (pid 41 -> 57): killed by SIGKILL"
    assert attributes == {
        "change": "changed",
        "from": "RUNNING",
        "to": "RUNNING",
        "reason": "killed by SIGKILL",
        "exit_kind": "killed",
        "exit_code": "-9",
    }


def test_a_state_change_with_an_exit_names_the_exit() -> None:
    """RUNNING -> BACKOFF after an exit: the exit's reason, not the backoff line."""
    crashed = _then(
        status="BACKOFF",
        pid=0,
        last_exit_kind="exited",
        last_exit_code=3,
        last_exit_reason="exited with code 3",
        last_exit_ms=5_000,
        message="exited too quickly (exit code 3); retry 1/5 in 1.00s",
    )
    message, attributes = describe_change("n1", "web", RUNNING, crashed)
    assert message == "web on n1: RUNNING -> BACKOFF: exited with code 3"
    assert attributes["exit_code"] == "3"


def test_a_state_change_without_an_exit_gives_the_daemons_line() -> None:
    """STARTING -> RUNNING ends no process: the event says what the daemon says."""
    starting = _then(status="STARTING", message="started with pid 41")
    message, attributes = describe_change("n1", "web", starting, RUNNING)
    assert message == "web on n1: STARTING -> RUNNING: running with pid 41"
    assert "reason" not in attributes


def test_a_health_change_says_why() -> None:
    """The issue's "RUNNING -> RUNNING" event: a failing health check names itself."""
    healthy = _then(health="HEALTHY")
    hung = _then(
        health="UNHEALTHY",
        message="unhealthy: no heartbeat for 5.1s (timeout 5s); left running (restart = never)",
    )
    message, _ = describe_change("n1", "web", healthy, hung)
    assert message == (
        "web on n1: health HEALTHY -> UNHEALTHY: unhealthy: no heartbeat for 5.1s"
        " (timeout 5s); left running (restart = never)"
    )


@pytest.mark.parametrize(
    ("after", "message"),
    [
        (_then(config_version=4), "web on n1: config version 3 -> 4"),
        (_then(version="1.1", labels={"a": "b"}), "web on n1: version 1.0 -> 1.1, labels changed"),
        (_then(health="PENDING"), "web on n1: health NONE -> PENDING: running with pid 41"),
    ],
)
def test_other_changes_are_listed_in_fleetctls_words(after: AgentStateRecord, message: str) -> None:
    """Versions, config and labels are named; "no health check" is NONE, as fleetctl says."""
    assert describe_change("n1", "web", RUNNING, after)[0] == message


def test_added_and_removed_agents() -> None:
    """An added agent says its state (and a known last exit); a removed one what it was."""
    assert describe_change("n1", "web", None, RUNNING) == (
        "web on n1 added: RUNNING",
        {"change": "added", "from": "", "to": "RUNNING"},
    )
    assert describe_change("n1", "web", None, KILLED)[0] == (
        "web on n1 added: RUNNING: killed by SIGKILL"
    )
    assert describe_change("n1", "web", KILLED, None) == (
        "web on n1 removed (was RUNNING)",
        {"change": "removed", "from": "RUNNING", "to": ""},
    )


def test_output_lost_to_a_full_log_filesystem_is_said_and_so_is_its_end() -> None:
    """A report whose only news is the log problem says it; its end too; with other news
    the problem follows the rest."""
    full = _then(log_problem="no space left on the filesystem of /logs/web.log: ...")
    message, attributes = describe_change("n1", "web", RUNNING, full)
    assert message == "web on n1: output being lost: no space left on the filesystem of" \
        " /logs/web.log: ..."  # fmt: skip
    assert attributes["log_problem"] == full.log_problem
    message, _ = describe_change("n1", "web", full, RUNNING)
    assert message == "web on n1: output logged again (its log's filesystem has space)"
    crashed_full = dataclasses.replace(KILLED, log_problem=full.log_problem)
    message, _ = describe_change("n1", "web", RUNNING, crashed_full)
    assert message == (
        "web on n1 restarted (pid 41 -> 57): killed by SIGKILL; output being lost: no space"
        " left on the filesystem of /logs/web.log: ..."
    )
