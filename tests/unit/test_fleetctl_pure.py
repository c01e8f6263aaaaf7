"""fleetctl's pure helpers: durations, times, sparklines, argv hoisting, labels, agent views."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509

from fleet.errors import NotFound
from fleet.pki import CertificateAuthority
from fleet.v1 import common_pb2
from fleetctl.agents import (
    last_lines,
    parse_statuses,
    show_fields,
    split_agent_ref,
    stale_note,
    wanted,
)
from fleetctl.app import hoist_global_options
from fleetctl.chart import bucket_values, format_number
from fleetctl.client import hinted
from fleetctl.events import DEFAULT_TAIL, start_tail
from fleetctl.nodes import parse_label_changes
from fleetctl.output import sparkline
from fleetctl.runtime import UsageProblem
from fleetctl.timespec import (
    format_age,
    format_duration,
    format_time,
    parse_duration,
    parse_instant,
)
from fleetctl.tlsprobe import explain_server_certificate

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h", 3600), ("2d", 172800), ("1h30m", 5400), ("250ms", 0.25),
     ("1.5h", 5400), (" 1W ", 604800)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    """Durations take s/m/h/d/w/ms parts, combined and case-insensitive."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "m5", "5x", "1h 30m", "-5m", "1h30"])
def test_parse_duration_rejects(text: str) -> None:
    """Anything else is a ValueError that shows an example."""
    with pytest.raises(ValueError, match="30s"):
        parse_duration(text)


def test_parse_instant_forms() -> None:
    """'now', a duration ago, and RFC 3339 with Z or an offset are instants."""
    assert parse_instant("now", now=NOW) == NOW
    assert parse_instant("1h", now=NOW) == NOW - dt.timedelta(hours=1)
    assert parse_instant("2026-11-22T10:00:00Z", now=NOW) == NOW - dt.timedelta(hours=2)
    assert parse_instant("2026-11-22T12:00:00+02:00", now=NOW) == NOW - dt.timedelta(hours=2)
    with pytest.raises(ValueError, match="no UTC offset"):
        parse_instant("2026-11-22T10:00:00", now=NOW)
    with pytest.raises(ValueError, match="neither a duration"):
        parse_instant("last tuesday", now=NOW)


def test_format_helpers() -> None:
    """Wire times print as RFC 3339 (None for 0); ages and durations kubectl-style."""
    assert format_time(0) is None
    assert format_time(1_767_225_600_123) == "2026-01-01T00:00:00.123Z"
    assert [format_duration(s) for s in (5, 60, 192, 3600, 3720, 90000)] == [
        "5s", "1m", "3m12s", "1h", "1h2m", "1d1h",
    ]  # fmt: skip
    assert format_age(0, now_ms=10) == "never"
    assert format_age(1_000, now_ms=61_000) == "1m ago"


def test_sparkline_scales_and_marks_gaps() -> None:
    """Lowest value draws the lowest block, highest the full block, None a blank."""
    assert sparkline([0.0, None, 7.0, 3.5]) == "▁ █▅"
    assert sparkline([2.0, 2.0]) == "▁▁"
    assert sparkline([None, None]) == "  "
    assert sparkline([]) == ""


def test_sparkline_shrinks_to_width_by_averaging() -> None:
    """A long series is averaged down to the width asked for."""
    line = sparkline([float(i) for i in range(100)], width=10)
    assert len(line) == 10
    assert line[0] == "▁"
    assert line[-1] == "█"


def test_bucket_values_places_points_by_time() -> None:
    """Points go to their step bucket; buckets without points are None."""
    points = [(60_000, 1.0), (180_000, 3.0)]
    assert bucket_values(points, start_ms=60_000, end_ms=300_000, step_ms=60_000) == [
        1.0, None, 3.0, None,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["nodes", "list", "-o", "json"], ["-o", "json", "nodes", "list"]),
        (["nodes", "list", "--manager=h:1", "-l", "a"],
         ["--manager=h:1", "nodes", "list", "-l", "a"]),
        (["-ojson", "events"], ["-ojson", "events"]),
        (["agents", "logs", "n/a", "--", "-o", "x"], ["agents", "logs", "n/a", "--", "-o", "x"]),
        (["pki", "issue", "node", "n", "--out", "d"], ["pki", "issue", "node", "n", "--out", "d"]),
    ],
)  # fmt: skip
def test_hoist_global_options(argv: list[str], expected: list[str]) -> None:
    """Global options after the subcommand move to the front; others and '--' stay."""
    assert hoist_global_options(argv) == expected


def test_parse_label_changes() -> None:
    """k=v sets (empty value allowed), k- removes; a key both set and removed is refused."""
    assert parse_label_changes(["a=1", "b=", "example.com/c-"]) == (
        {"a": "1", "b": ""},
        ["example.com/c"],
    )
    with pytest.raises(UsageProblem, match="both set and removed"):
        parse_label_changes(["a=1", "a-"])


def test_split_agent_ref_and_last_lines() -> None:
    """NODE/AGENT splits in two; --tail keeps the last N lines, a partial last line included."""
    assert split_agent_ref("node-1/web") == ("node-1", "web")
    for bad in ("web", "/web", "node-1/", "a/b/c"):
        with pytest.raises(UsageProblem):
            split_agent_ref(bad)
    assert last_lines(b"a\nb\nc", 2) == b"b\nc"
    assert last_lines(b"a\nb\n", 0) == b""


def test_explain_server_certificate() -> None:
    """The probe's verdicts: fine, unknown CA, name mismatch, expired, not yet valid, via a CA."""
    ca, other = CertificateAuthority.create(), CertificateAuthority.create()
    now = dt.datetime.now(dt.UTC)  # certificates are minted with the real clock
    ours = [x509.load_pem_x509_certificate(ca.cert_pem)]
    good = ca.issue("manager", "m").certificate
    name = "manager.fleet.local"
    assert explain_server_certificate(good, ours, name, now=now) is None
    foreign = other.issue("manager", "m").certificate
    assert "unknown CA" in str(explain_server_certificate(foreign, ours, name, now=now))
    node = ca.issue("node", "n1").certificate
    assert "name mismatch" in str(explain_server_certificate(node, ours, name, now=now))
    later = now + dt.timedelta(days=400)
    assert "expired on" in str(explain_server_certificate(good, ours, name, now=later))
    earlier = now - dt.timedelta(days=1)
    assert "not valid until" in str(explain_server_certificate(good, ours, name, now=earlier))
    issuing = ca.create_intermediate()
    enrolled = issuing.issue("manager", "m").certificate
    mid = [x509.load_pem_x509_certificate(issuing.cert_pem)]
    assert explain_server_certificate(enrolled, ours, name, now=now, intermediates=mid) is None
    assert "unknown CA" in str(explain_server_certificate(enrolled, ours, name, now=now))


@pytest.mark.parametrize(
    ("value", "name", "shown"),
    [(0.0, "x", "0"), (6.945, "usage_percent", "6.945"), (9999.0, "x", "9999"),
     (2.51e9, "packets", "2.51G"), (1.2e4, "x", "12k"), (512.0, "used_bytes", "512"),
     (2.352e10, "available_bytes", "21.9GiB"), (3 * 1024**2, "bytes_recv", "3MiB"),
     (float("nan"), "x", "nan")],
)  # fmt: skip
def test_format_number(value: float, name: str, shown: str) -> None:
    """Chart figures stay short: binary units for byte series, k/M/G for big counts."""
    assert format_number(value, name) == shown


@pytest.mark.parametrize(
    ("follow", "since", "tail", "expected"),
    [
        (False, None, None, DEFAULT_TAIL),  # events: the last 20
        (True, None, None, 0),  # events -f: from now
        (False, 7, None, None),  # --since 7: everything after 7
        (True, 0, None, None),  # -f --since 0: the whole history, then follow
        (False, None, 5, 5),
        (True, None, 5, 5),  # -f --tail 5: the last five, then follow
        (False, 7, 3, 3),  # the last 3 after 7
    ],
)
def test_start_tail(
    follow: bool, since: int | None, tail: int | None, expected: int | None
) -> None:
    """How many past events `events` begins with, for each combination of options."""
    assert start_tail(follow=follow, since=since, tail=tail) == expected


def test_parse_statuses_takes_any_case_and_names_a_bad_one() -> None:
    """--status values are state names in any case, comma-separated; a typo names the valid."""
    assert parse_statuses(None) == []
    assert parse_statuses(" fatal,Backoff ") == [
        common_pb2.AGENT_STATUS_FATAL,
        common_pb2.AGENT_STATUS_BACKOFF,
    ]
    with pytest.raises(UsageProblem, match=r"unknown agent state 'FATL'; one of STOPPED, "):
        parse_statuses("RUNNING,FATL")
    with pytest.raises(UsageProblem, match="unknown agent state ''"):
        parse_statuses("RUNNING,")


def test_wanted_applies_both_filters() -> None:
    """An agent passes --status if its state is listed, --unhealthy if it is UNHEALTHY."""
    sick = common_pb2.AgentInfo(
        status=common_pb2.AGENT_STATUS_RUNNING, health=common_pb2.AGENT_HEALTH_UNHEALTHY
    )
    fatal = common_pb2.AgentInfo(status=common_pb2.AGENT_STATUS_FATAL)
    running = [common_pb2.AGENT_STATUS_RUNNING]
    assert wanted(sick, [], unhealthy=False)
    assert wanted(sick, running, unhealthy=True)
    assert not wanted(fatal, running, unhealthy=False)
    assert not wanted(fatal, [], unhealthy=True)


def test_stale_note_is_one_line_per_offline_node_with_its_latest_report() -> None:
    """Offline nodes are named once, in order, with their newest report's age."""
    now = 1_800_000_000_000
    rows = [
        {"node_id": "n2", "stale": True, "reported_at_ms": now - 120_000},
        {"node_id": "n2", "stale": True, "reported_at_ms": now - 60_000},
        {"node_id": "n1", "stale": False, "reported_at_ms": now},
        {"node_id": "n0", "stale": True, "reported_at_ms": 0},
    ]
    assert stale_note(rows, now) == [
        "node n0 is OFFLINE: its agents (marked *) are what its daemon last reported, never",
        "node n2 is OFFLINE: its agents (marked *) are what its daemon last reported, 1m ago",
    ]


def test_show_calls_only_a_daemons_answer_live() -> None:
    """The manager's copy of a state says when it was reported, never "live"; without that
    time it says so instead of guessing."""
    now = 1_800_000_000_000
    view = {"stale": True, "reported_at": format_time(now - 60_000), "reported_at_ms": now - 60_000}
    asked, _ = show_fields({**view, "spec": None}, now_ms=now)
    assert asked["reported_line"] == "live (asked the daemon now)"
    copy, fields = show_fields(view, now_ms=now, unreachable="refused")
    assert copy["reported_line"] == (
        f"{format_time(now - 60_000)} (1m ago); the node is OFFLINE, this is what its daemon"
        " last said"
    )
    assert copy["spec_missing"] == "unavailable: the daemon could not be asked (refused)"
    assert ("Spec", "spec_missing") in fields
    unknown, _ = show_fields({**view, "reported_at_ms": 0}, now_ms=now, unreachable="refused")
    assert unknown["reported_line"] == "unknown (the manager has not kept when)"


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        ("job 'j9' does not exist", "job 'j9' does not exist (see `fleetctl jobs list`)"),
        (
            "definition 'web' does not exist",
            "definition 'web' does not exist (see `fleetctl definitions list`)",
        ),
        (
            "join token 'zzzzzzzz' does not exist",
            "join token 'zzzzzzzz' does not exist (see `fleetctl tokens list`)",
        ),
        ("the widget 'w' does not exist", "the widget 'w' does not exist"),
    ],
)
def test_not_found_in_words_names_the_command_that_lists_what_exists(
    message: str, shown: str
) -> None:
    """NOT_FOUND naming a job, definition or join token in words gets its list command."""
    assert hinted(NotFound(message)) == shown
