"""How jobs read: prefixed lines, truncation markers, progress, summary and exit codes."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from fleet import selectors
from fleet.v1 import fleet_pb2, jobs_pb2
from fleetctl.jobfollow import JobTracker, OutputPrinter
from fleetctl.joboutput import (
    EXIT_JOB_CANCELLED,
    EXIT_JOB_FAILED,
    EXIT_JOB_PARTIAL,
    LineSplitter,
    command_text,
    counts_text,
    exit_code,
    header_lines,
    offline_note,
    progress_line,
    spec_lines,
    summary_line,
    unreached_note,
)
from fleetctl.runtime import Cli, GlobalOptions
from fleetctl.views import job_view

NOW_MS = 1_800_000_000_000
S = jobs_pb2.JobTargetState


def _target(node: str, state: int, exit_code: int = 0, **fields: Any) -> jobs_pb2.JobTarget:
    return jobs_pb2.JobTarget(node_id=node, state=state, exit_code=exit_code, **fields)


def _job(state: int, *targets: jobs_pb2.JobTarget, **fields: Any) -> jobs_pb2.Job:
    spec = jobs_pb2.JobSpec(
        steps=[jobs_pb2.JobStep(command=jobs_pb2.JobCommand(argv=["uptime"]))],
        selector=selectors.to_proto(selectors.parse("role=web")),
    )
    return jobs_pb2.Job(id="j1", spec=spec, state=state, targets=targets, **fields)


@pytest.mark.parametrize(
    ("state", "targets", "code"),
    [
        (jobs_pb2.JOB_STATE_SUCCESS, [S.JOB_TARGET_STATE_SUCCESS] * 2, 0),
        (
            jobs_pb2.JOB_STATE_PARTIAL,
            [S.JOB_TARGET_STATE_SUCCESS, S.JOB_TARGET_STATE_FAILED],
            EXIT_JOB_PARTIAL,
        ),
        (
            jobs_pb2.JOB_STATE_FAILED,
            [S.JOB_TARGET_STATE_FAILED, S.JOB_TARGET_STATE_TIMEOUT],
            EXIT_JOB_FAILED,
        ),
        (jobs_pb2.JOB_STATE_FAILED, [S.JOB_TARGET_STATE_UNDELIVERABLE], EXIT_JOB_FAILED),
        (
            jobs_pb2.JOB_STATE_PARTIAL,
            [S.JOB_TARGET_STATE_SUCCESS, S.JOB_TARGET_STATE_SKIPPED],
            EXIT_JOB_PARTIAL,
        ),
        (
            jobs_pb2.JOB_STATE_CANCELLED,
            [S.JOB_TARGET_STATE_SUCCESS, S.JOB_TARGET_STATE_CANCELLED],
            EXIT_JOB_CANCELLED,
        ),
        # Says SUCCESS but one target did not succeed: exit 0 only if every one did.
        (
            jobs_pb2.JOB_STATE_SUCCESS,
            [S.JOB_TARGET_STATE_SUCCESS, S.JOB_TARGET_STATE_FAILED],
            EXIT_JOB_PARTIAL,
        ),
        (jobs_pb2.JOB_STATE_RUNNING, [S.JOB_TARGET_STATE_FAILED, S.JOB_TARGET_STATE_RUNNING], 0),
        (jobs_pb2.JOB_STATE_FAILED, [], EXIT_JOB_FAILED),
    ],
)
def test_exit_code_is_the_jobs_outcome(state: int, targets: list[int], code: int) -> None:
    """0 only when every target succeeded; 3 none did, 4 some did, 5 cancelled."""
    job = _job(state, *(_target(f"n{i}", s) for i, s in enumerate(targets)))
    assert exit_code(job_view(job)) == code


def test_job_view_shapes_times_steps_and_counts() -> None:
    """job_view: prefixes gone, ms times as RFC 3339, durations, counts by state, env names."""
    job = _job(
        jobs_pb2.JOB_STATE_PARTIAL,
        _target(
            "web-1",
            S.JOB_TARGET_STATE_FAILED,
            3,
            started_at=NOW_MS,
            ended_at=NOW_MS + 2500,
            reason="exit 3",
            steps=[jobs_pb2.JobStepResult(index=0, state=S.JOB_TARGET_STATE_FAILED, exit_code=3)],
        ),
        actor="operator/alice",
        created_at=NOW_MS,
        ended_at=NOW_MS + 3000,
        counts=[jobs_pb2.JobTargetCount(state=S.JOB_TARGET_STATE_FAILED, count=1)],
    )
    job.spec.steps[0].command.env["SECRET"] = "hunter2"
    view = job_view(job)
    assert view["state"] == "PARTIAL"
    assert view["created_at"] == "2027-01-15T08:00:00.000Z"
    assert view["duration_seconds"] == 3.0
    assert view["counts"] == {"FAILED": 1}
    assert view["spec"]["selector"] == "role=web"
    assert view["spec"]["steps"][0]["env_keys"] == ["SECRET"]
    assert "hunter2" not in repr(view)
    target = view["targets"][0]
    assert (target["state"], target["exit_code"], target["duration_seconds"]) == ("FAILED", 3, 2.5)
    assert target["steps"][0]["name"] == "step-1"
    assert view["spec"]["steps"][0]["when"] == "on_success"


def test_counts_progress_and_summary_lines() -> None:
    """Counts read outcomes first; the progress line says done/total; the summary says why."""
    counts = {"RUNNING": 2, "SUCCESS": 3, "FAILED": 1, "PENDING": 4}
    assert counts_text(counts) == "3 success, 1 failed, 2 running, 4 pending"
    assert counts_text({}) == "no targets"
    job = _job(
        jobs_pb2.JOB_STATE_RUNNING,
        counts=[
            jobs_pb2.JobTargetCount(state=getattr(S, f"JOB_TARGET_STATE_{s}"), count=n)
            for s, n in counts.items()
        ],
    )
    assert progress_line(job_view(job), 75) == (
        "job j1 RUNNING: 4/10 done (3 success, 1 failed, 2 running, 4 pending) 1m15s"
    )
    ended = _job(
        jobs_pb2.JOB_STATE_FAILED,
        _target("a", S.JOB_TARGET_STATE_FAILED),
        _target("b", S.JOB_TARGET_STATE_SKIPPED),
        created_at=NOW_MS,
        ended_at=NOW_MS + 65_000,
        reason="max_errors (1) reached",
    )
    assert summary_line(job_view(ended)) == (
        "job j1 FAILED: 1 failed, 1 skipped in 1m5s (max_errors (1) reached)"
    )


def test_header_and_plan_lines_show_what_where_and_how() -> None:
    """jobs show's header: id and name, state, who, where, the window, and each step."""
    job = _job(
        jobs_pb2.JOB_STATE_RUNNING,
        _target("web-1", S.JOB_TARGET_STATE_RUNNING),
        actor="operator/alice",
        created_at=NOW_MS - 30_000,
        rerun_of="j0",
    )
    job.spec.name = "restart"
    job.spec.max_concurrency = "25%"
    job.spec.max_errors = 2
    job.spec.canary = 1
    job.spec.timeout_seconds = 600
    job.spec.lock = "apt"
    job.spec.steps.append(
        jobs_pb2.JobStep(
            name="report",
            when=jobs_pb2.STEP_WHEN_ALWAYS,
            command=jobs_pb2.JobCommand(
                script="echo a\necho b",
                interpreter=["/bin/sh", "-eu"],
                user="root",
                timeout_seconds=30,
            ),
        )
    )
    lines = header_lines(job_view(job), now_ms=NOW_MS)
    assert lines[0] == "Job:      j1 (restart)"
    assert lines[1] == "State:    RUNNING"
    assert lines[2].endswith("(30s ago) by operator/alice")
    assert "Rerun of: j0" in lines
    assert "Targets:  selector 'role=web': 1 running" in lines
    assert "Policy:   max_concurrency 25%, max_errors 2, canary 1, timeout 10m, lock apt" in lines
    assert lines[-2:] == [
        "  1. step-1: uptime",
        "  2. report [always]: /bin/sh -eu <<< 'echo a' (+1 lines) (as root; timeout 30s)",
    ]
    one_step = _job(jobs_pb2.JOB_STATE_PENDING)
    one_step.spec.ClearField("selector")
    one_step.spec.node_ids.extend(["a", "b"])
    assert spec_lines(job_view(one_step))[0] == "Targets:  nodes a, b: no targets"
    assert spec_lines(job_view(one_step))[-1] == "Command:  uptime"


def test_command_text_quotes_like_a_shell() -> None:
    """An argv is shown as a shell would need it typed."""
    step = {"argv": ["grep", "-c", "a b", "/var/log/syslog"], "script": "", "interpreter": []}
    assert command_text(step) == "grep -c 'a b' /var/log/syslog"


def test_line_splitter_waits_for_whole_lines_per_node() -> None:
    """A line split over chunks comes out once, whole; nodes do not mix; CRLF and UTF-8 hold."""
    split = LineSplitter()
    assert split.feed("a", b"one\ntw") == ["one"]
    assert split.feed("b", b"x\r\n") == ["x"]
    euro = "€".encode()
    assert split.feed("a", b"o " + euro[:1]) == []
    assert split.feed("a", euro[1:] + b"\nthree") == ["two €"]
    assert split.pending() == ["a"]
    assert split.flush("a") == "three"
    assert split.flush("a") is None
    assert split.feed("c", b"\xff\n") == ["\ufffd"]


def _cli() -> tuple[Cli, io.StringIO, io.StringIO]:
    cli = Cli(GlobalOptions())
    out, err = io.StringIO(), io.StringIO()
    cli.out = Console(file=out, width=200, highlight=False)
    cli.err = Console(file=err, width=200, highlight=False)
    return cli, out, err


def _chunk(node: str, data: bytes, offset: int, **flags: bool) -> Any:
    return fleet_pb2.FleetServiceReadJobOutputResponse(
        node_id=node, data=data, offset=offset, next_offset=offset + len(data), **flags
    )


def test_printer_prefixes_each_line_with_its_node_aligned() -> None:
    """Stream mode: `node | line` as each line completes, prefixes padded to the widest node."""
    cli, out, _ = _cli()
    printer = OutputPrinter(cli, "j1", ["web-1", "db"], group=False)
    printer.on_message(_chunk("web-1", b"hello\nwor", 0))
    printer.on_message(_chunk("db", b"up 3 days\n", 0))
    printer.on_message(_chunk("web-1", b"ld", 9, eof=True))
    assert out.getvalue().splitlines() == ["web-1 | hello", "db    | up 3 days", "web-1 | world"]


def test_printer_groups_a_targets_lines_until_its_output_ends() -> None:
    """--group: a node's lines come together when its eof arrives, not interleaved."""
    cli, out, _ = _cli()
    printer = OutputPrinter(cli, "j1", ["a", "b"], group=True)
    printer.on_message(_chunk("a", b"a1\n", 0))
    printer.on_message(_chunk("b", b"b1\n", 0))
    printer.on_message(_chunk("a", b"a2\n", 3))
    assert out.getvalue() == ""
    printer.on_message(_chunk("b", b"b2", 3, eof=True))
    printer.on_message(_chunk("a", b"", 6, eof=True))
    assert out.getvalue().splitlines() == ["b | b1", "b | b2", "a | a1", "a | a2"]


def test_printer_marks_where_the_manager_cut_the_output() -> None:
    """A truncated target gets one marker line saying how much was kept and how to get the rest."""
    cli, out, _ = _cli()
    printer = OutputPrinter(cli, "j1", ["web-1"], group=False)
    printer.on_message(_chunk("web-1", b"x" * 10 + b"\npart", 0, truncated=True))
    printer.on_message(_chunk("web-1", b"", 15, truncated=True, eof=True))
    assert out.getvalue().splitlines() == [
        "web-1 | xxxxxxxxxx",
        "web-1 | part",
        "web-1 | [fleetctl: the manager stored only the first 15 bytes of this output; the rest"
        " is on the node: fleetctl jobs logs j1 web-1 --from-node]",
    ]


def test_raw_printer_writes_bytes_and_warns_on_stderr(capsysbinary: Any) -> None:
    """One node's logs: the bytes as written on stdout, the cut marker on stderr."""
    cli, _, err = _cli()
    printer = OutputPrinter(cli, "j1", ["web-1"], group=False, raw=True)
    printer.on_message(_chunk("web-1", b"\x00bin\xffary", 0))
    printer.on_message(_chunk("web-1", b"", 8, truncated=True, eof=True))
    assert capsysbinary.readouterr().out == b"\x00bin\xffary"
    assert err.getvalue().startswith("[fleetctl: the manager stored only the first 8 bytes")
    assert "--from-node" in err.getvalue()


def test_tracker_merges_watch_messages() -> None:
    """WatchJob's first message has every target; later ones change some and the job's head."""
    first = _job(
        jobs_pb2.JOB_STATE_PENDING,
        _target("a", S.JOB_TARGET_STATE_PENDING),
        _target("b", S.JOB_TARGET_STATE_PENDING),
    )
    tracker = JobTracker(first)
    later = _job(jobs_pb2.JOB_STATE_RUNNING)
    tracker.update(later, [_target("b", S.JOB_TARGET_STATE_RUNNING)])
    assert tracker.state == "RUNNING"
    view = tracker.view()
    assert [(t["node_id"], t["state"]) for t in view["targets"]] == [
        ("a", "PENDING"),
        ("b", "RUNNING"),
    ]
    tracker.update(_job(jobs_pb2.JOB_STATE_SUCCESS), [_target("a", S.JOB_TARGET_STATE_SUCCESS)])
    assert tracker.state == "SUCCESS"
    assert tracker.view()["targets"][0]["state"] == "SUCCESS"


def test_offline_note_names_the_targets_waiting_for_an_offline_node() -> None:
    """Only PENDING targets on offline nodes; when they give up; the manager's default
    delivery timeout when the job set none; nothing to say when none waits."""
    created = 1_800_000_000_000  # 2027-01-15T08:00:00Z
    offline = {"web-3": created - 60_000, "web-9": 0, "db-1": created}
    note = offline_note(
        ["web-1", "web-3", "web-9"], offline, created_ms=created, delivery_timeout=None
    )
    assert note.startswith(
        "2 target(s) wait for their node to come back online:"
        " web-3 (offline since 2027-01-15T07:59:00.000Z), web-9;"
    )
    assert "by 2027-01-15T08:05:00.000Z (the delivery timeout, 5m)" in note
    assert note.endswith("ends UNDELIVERABLE (not counted against max_errors)")
    many = offline_note(
        [f"n{i}" for i in range(8)],
        {f"n{i}": 0 for i in range(8)},
        created_ms=created,
        delivery_timeout=30,
    )
    assert "n0, n1, n2, n3, n4 and 3 more;" in many
    assert "(the delivery timeout, 30s)" in many
    assert offline_note(["web-1"], offline, created_ms=created, delivery_timeout=None) == ""


def test_offline_note_names_the_targets_waiting_for_a_lost_control_stream() -> None:
    """A node still online in its stream's grace cannot be reached either: its PENDING
    targets are named apart from an offline node's, an offline node's once only."""
    created = 1_800_000_000_000  # 2027-01-15T08:00:00Z
    lost = {"web-2": created - 20_000, "web-3": created - 30_000}
    note = offline_note(
        ["web-1", "web-2", "web-3"],
        {"web-3": created - 30_000},
        created_ms=created,
        delivery_timeout=60,
        lost=lost,
    )
    assert note == (
        "1 target(s) wait for their node to come back online:"
        " web-3 (offline since 2027-01-15T07:59:30.000Z);"
        " 1 target(s) wait for their node's control stream to come back"
        " (the node still counts as online): web-2 (lost at 2027-01-15T07:59:40.000Z);"
        " any not delivered by 2027-01-15T08:01:00.000Z (the delivery timeout, 1m)"
        " ends UNDELIVERABLE (not counted against max_errors)"
    )
    only_lost = offline_note(["web-2"], {}, created_ms=created, delivery_timeout=None, lost=lost)
    assert only_lost.startswith("1 target(s) wait for their node's control stream to come back")
    assert offline_note(["web-1"], {}, created_ms=created, delivery_timeout=None, lost=lost) == ""


def test_unreached_note_names_started_targets_whose_node_is_out_of_reach() -> None:
    """Started targets on an offline node or a lost stream, offline first (an offline node
    once only); none when every started target's node is reachable."""
    t = 1_800_000_000_000  # 2027-01-15T08:00:00Z
    note = unreached_note(
        ["web-1", "web-2", "web-3", "web-4"],
        {"web-3": t - 30_000, "web-4": 0, "db-1": t},
        {"web-2": t - 20_000, "web-3": t - 30_000},
    )
    assert note == (
        "the manager cannot reach the node of 3 started target(s):"
        " web-3 (offline since 2027-01-15T07:59:30.000Z), web-4,"
        " web-2 (control stream lost at 2027-01-15T07:59:40.000Z);"
        " what runs there goes on, and its output follows once the node is back"
    )
    assert unreached_note(["web-1"], {"db-1": t}, {"db-2": t}) == ""
