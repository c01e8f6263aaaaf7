"""fleetctl run / jobs against a real manager and real fleet-daemons running real processes.

The manager is real (mTLS, SQLite, the real clock); n1 and n2 are real
`DaemonServer`s that run each job's command as a child process. fleetctl
runs in this thread as the command does (Typer's CliRunner), or as a
subprocess where a signal must reach it (Ctrl-C).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from control_end import open_stream
from fleetctl_live import LiveFleet, live_fleet

from fleetctl.joboutput import EXIT_JOB_CANCELLED, EXIT_JOB_FAILED, EXIT_JOB_PARTIAL

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fleet(pki: Any, tmp_path: Path) -> Iterator[LiveFleet]:
    """A real manager and two real daemons, n1 and n2, both role=web."""
    with live_fleet(pki, tmp_path, clock=time.time) as live:
        for node in ("n1", "n2"):
            live.start_daemon(node)
            assert live.fleetctl("nodes", "label", node, "role=web").exit_code == 0
        yield live


def until(probe: Callable[[], Any], ok: Callable[[Any], bool], within: float = 20.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {within}s; last: {value!r}")
        time.sleep(0.1)


def show(live: LiveFleet, job_id: str) -> dict[str, Any]:
    result = live.fleetctl("-o", "json", "jobs", "show", job_id)
    assert result.exit_code in (0, 3, 4, 5), result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def listed(live: LiveFleet) -> list[dict[str, Any]]:
    result = live.fleetctl("-o", "json", "jobs", "list")
    assert result.exit_code == 0, result.output
    jobs: list[dict[str, Any]] = json.loads(result.stdout)["jobs"]
    return jobs


def test_run_prints_each_nodes_output_prefixed_and_exits_0(fleet: LiveFleet) -> None:
    """run -l on two daemons: `node | line` for each, a summary table, SUCCESS, exit 0."""
    result = fleet.fleetctl(
        "run", "-l", "role=web", "--yes", "--", "sh", "-c", "echo hello; echo bye"
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for node in ("n1", "n2"):
        assert f"{node} | hello" in lines
        assert f"{node} | bye" in lines
        assert lines.index(f"{node} | hello") < lines.index(f"{node} | bye")
    rows = {ln.split()[0]: ln.split() for ln in lines if ln.startswith(("n1 ", "n2 "))}
    assert rows["n1"][1:3] == ["SUCCESS", "0"]
    assert rows["n2"][1:3] == ["SUCCESS", "0"]
    assert "SUCCESS: 2 success" in lines[-1]
    (job,) = listed(fleet)
    assert job["state"] == "SUCCESS"
    assert job["actor"] == "operator/alice"
    assert job["spec"]["steps"][0]["argv"] == ["sh", "-c", "echo hello; echo bye"]


def test_a_failing_target_shows_its_exit_code_and_run_exits_3(fleet: LiveFleet) -> None:
    """A command exiting 7 is FAILED with exit 7 in the table; the job FAILED; run exits 3."""
    result = fleet.fleetctl("run", "--node", "n1", "--", "sh", "-c", "echo oops >&2; exit 7")
    assert result.exit_code == EXIT_JOB_FAILED, result.output
    assert "n1 | oops" in result.stdout.splitlines()  # stderr is part of the output
    (row,) = [
        ln.split() for ln in result.stdout.splitlines() if ln.startswith("n1 ") and "|" not in ln
    ]
    assert row[1:3] == ["FAILED", "7"]
    job = listed(fleet)[0]
    assert job["state"] == "FAILED"
    assert show(fleet, job["id"])["targets"][0]["exit_code"] == 7


def test_plan_lists_targets_and_steps_and_runs_nothing(fleet: LiveFleet, tmp_path: Path) -> None:
    """--plan resolves the selector, prints the nodes and the command; no job is stored or run."""
    marker = tmp_path / "ran"
    result = fleet.fleetctl("run", "-l", "role=web", "--plan", "--", "touch", str(marker))
    assert result.exit_code == 0, result.output
    assert f"Command:  touch {marker}" in result.stdout
    nodes = [ln.split()[0] for ln in result.stdout.splitlines()[3:] if ln.strip()]
    assert nodes[-2:] == ["n1", "n2"]
    assert "2 target(s); nothing was run (--plan)." in result.stderr
    time.sleep(0.5)
    assert listed(fleet) == []
    assert not marker.exists()


def test_run_refuses_several_nodes_without_a_terminal_or_yes(fleet: LiveFleet) -> None:
    """Without --yes and no terminal to ask on, a job on two nodes is refused (exit 2)."""
    result = fleet.fleetctl("run", "-l", "role=web", "--", "true")
    assert result.exit_code == 2, result.output
    assert "refusing to run a job on 2 nodes without confirmation" in result.stderr
    assert listed(fleet) == []


def test_detach_prints_the_id_and_logs_follow_it(fleet: LiveFleet) -> None:
    """--detach prints only the id; `jobs logs ID -f` prints the output until the job ends."""
    script = "echo first; sleep 1; echo second"
    started = fleet.fleetctl("run", "-n", "n1", "--detach", "--", "sh", "-c", script)
    assert started.exit_code == 0, started.output
    job_id = started.stdout.strip()
    assert job_id
    assert " " not in job_id
    assert f"fleetctl jobs logs {job_id} -f" in started.stderr
    logs = fleet.fleetctl("jobs", "logs", job_id, "-f")
    assert logs.exit_code == 0, logs.output
    assert logs.stdout.splitlines() == ["n1 | first", "n1 | second"]
    raw = fleet.fleetctl("jobs", "logs", job_id, "n1")
    assert raw.stdout == "first\nsecond\n"
    assert show(fleet, job_id)["state"] == "SUCCESS"


def test_cancel_stops_a_running_job(fleet: LiveFleet) -> None:
    """jobs cancel: the running target is stopped and CANCELLED; jobs show exits 5."""
    started = fleet.fleetctl("run", "-n", "n1", "--detach", "--", "sleep", "60")
    job_id = started.stdout.strip()
    until(lambda: show(fleet, job_id)["targets"][0]["state"], lambda s: s == "RUNNING")
    cancelled = fleet.fleetctl("jobs", "cancel", job_id)
    assert cancelled.exit_code == 0, cancelled.output
    assert f"job {job_id} cancelled" in cancelled.stdout
    view = until(lambda: show(fleet, job_id), lambda v: v["state"] == "CANCELLED")
    assert view["targets"][0]["state"] == "CANCELLED"
    assert fleet.fleetctl("jobs", "show", job_id).exit_code == EXIT_JOB_CANCELLED
    again = fleet.fleetctl("jobs", "cancel", job_id)
    assert again.exit_code == 0, again.output
    assert f"job {job_id} had already ended (CANCELLED" in again.stdout


def test_unknown_job_points_at_jobs_list(fleet: LiveFleet) -> None:
    """jobs show of an id that does not exist: exit 1, one line with the command that lists jobs."""
    result = fleet.fleetctl("jobs", "show", "nope")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "fleetctl: error: job 'nope' does not exist (see `fleetctl jobs list`)"
    )


def test_a_selector_matching_no_node_points_at_nodes_list_with_it(fleet: LiveFleet) -> None:
    """run -l with a selector no node matches: exit 1, one line ending in the nodes list
    command for that very selector (fleetctl's words; the manager's name no client)."""
    result = fleet.fleetctl("run", "-l", "role in (db, cache)", "--yes", "--", "true")
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == (
        "fleetctl: error: cannot run the job: spec.selector: role in (cache,db) matches no"
        " registered node (see `fleetctl nodes list -l 'role in (cache,db)'`)"
    )
    assert listed(fleet) == []


def test_rerun_failed_is_a_new_job_linked_to_the_first(fleet: LiveFleet, tmp_path: Path) -> None:
    """rerun --failed runs the failed targets again as a new job with rerun_of set."""
    flag = tmp_path / "ok"
    first = fleet.fleetctl("run", "-n", "n1", "--", "test", "-e", str(flag))
    assert first.exit_code == EXIT_JOB_FAILED, first.output
    first_id = listed(fleet)[0]["id"]
    flag.touch()
    again = fleet.fleetctl("jobs", "rerun", first_id, "--failed")
    assert again.exit_code == 0, again.output
    assert f"(rerun of {first_id})" in again.stderr
    newest = listed(fleet)[0]
    assert newest["id"] != first_id
    assert newest["rerun_of"] == first_id
    assert newest["state"] == "SUCCESS"
    assert show(fleet, first_id)["state"] == "FAILED"  # the first job is not changed


def test_rerun_on_several_nodes_asks_first_and_plan_runs_nothing(
    fleet: LiveFleet, tmp_path: Path
) -> None:
    """rerun of a job that failed on both nodes: --plan lists them and runs nothing; without a
    terminal or --yes it is refused (exit 2) and nothing runs; --yes runs it."""
    flag = tmp_path / "ok"
    first = fleet.fleetctl("run", "-l", "role=web", "--yes", "--", "test", "-e", str(flag))
    assert first.exit_code == EXIT_JOB_FAILED, first.output
    first_id = listed(fleet)[0]["id"]

    planned = fleet.fleetctl("jobs", "rerun", first_id, "--failed", "--plan")
    assert planned.exit_code == 0, planned.output
    assert [ln.split()[0] for ln in planned.stdout.splitlines()[-2:]] == ["n1", "n2"]
    assert "2 target(s); nothing was run (--plan)." in planned.stderr
    refused = fleet.fleetctl("jobs", "rerun", first_id, "--failed")
    assert refused.exit_code == 2, refused.output
    assert "refusing to run a job on 2 nodes without confirmation" in refused.stderr
    assert [j["id"] for j in listed(fleet)] == [first_id]

    flag.touch()
    again = fleet.fleetctl("jobs", "rerun", first_id, "--failed", "--yes")
    assert again.exit_code == 0, again.output
    newest = listed(fleet)[0]
    assert newest["rerun_of"] == first_id
    assert newest["state"] == "SUCCESS"
    # Nothing failed: refused, and fleetctl (not the manager) names the flag that helps.
    nothing = fleet.fleetctl("jobs", "rerun", newest["id"], "--failed", "--yes")
    assert nothing.exit_code == 1, nothing.output
    assert nothing.stderr.strip() == (
        f"fleetctl: error: cannot rerun job {newest['id']}: job {newest['id']}: no target"
        " failed, timed out or was undeliverable: nothing to re-run of those alone; without"
        " --failed it re-runs every target"
    )


def test_job_file_with_steps_shows_each_step(fleet: LiveFleet, tmp_path: Path) -> None:
    """run -f with three steps: on_failure skipped after success; jobs show lists each step."""
    job = tmp_path / "job.toml"
    job.write_text(
        'name = "steps"\nnodes = ["n1"]\n'
        '[[steps]]\nname = "one"\nargv = ["echo", "one"]\n'
        '[[steps]]\nname = "two"\nscript = "echo two"\ninterpreter = ["/bin/sh", "-eu"]\n'
        '[[steps]]\nname = "rescue"\nargv = ["echo", "rescue"]\nwhen = "on_failure"\n'
    )
    result = fleet.fleetctl("run", "-f", str(job))
    assert result.exit_code == 0, result.output
    assert "n1 | one" in result.stdout
    assert "n1 | two" in result.stdout
    assert "rescue" not in result.stdout.split("NODE")[0]
    job_id = listed(fleet)[0]["id"]
    shown = fleet.fleetctl("jobs", "show", job_id)
    assert shown.exit_code == 0, shown.output
    assert "Job:      " + job_id + " (steps)" in shown.stdout
    assert "  3. rescue [on_failure]: echo rescue" in shown.stdout
    steps = {ln.split()[2]: ln.split()[3] for ln in shown.stdout.splitlines()
             if ln.startswith("n1 ") and ln.split()[1].rstrip(".").isdigit()}  # fmt: skip
    assert steps["one"] == "SUCCESS"
    assert steps["two"] == "SUCCESS"
    assert steps["rescue"] == "SKIPPED"


def test_ctrl_c_without_a_terminal_leaves_the_job_running(fleet: LiveFleet) -> None:
    """Ctrl-C while following with no TTY: exit 130, the id and how to come back; job runs on."""
    argv = [sys.executable, "-c", "from fleetctl.app import main; main()"]
    proc = subprocess.Popen(
        [*argv, "run", "-n", "n1", "--", "sh", "-c", "echo started; sleep 60"],
        env=_env(fleet),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "n1 | started"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (out, err)
    (job,) = listed(fleet)
    assert f"job {job['id']} keeps running" in err
    assert f"fleetctl jobs cancel {job['id']}" in err
    assert show(fleet, job["id"])["targets"][0]["state"] == "RUNNING"
    assert fleet.fleetctl("jobs", "cancel", job["id"]).exit_code == 0


def run_with_n3_undeliverable(fleet: LiveFleet) -> str:
    """`run` on role=web with a 4 s delivery timeout, n3 unreachable: n1 and n2 succeed, n3
    ends UNDELIVERABLE and the job PARTIAL (exit 4); the one note saying why n3 waited."""
    result = fleet.fleetctl(
        "run", "-l", "role=web", "--yes", "--delivery-timeout", "4s", "--", "true"
    )
    assert result.exit_code == EXIT_JOB_PARTIAL, result.output
    notes = [ln for ln in result.stderr.splitlines() if "wait for their node" in ln]
    assert len(notes) == 1, result.stderr
    assert "(the delivery timeout, 4s) ends UNDELIVERABLE" in notes[0]
    (job,) = listed(fleet)
    assert job["counts"] == {"SUCCESS": 2, "UNDELIVERABLE": 1}
    return notes[0]


def test_run_says_which_targets_wait_for_an_offline_node(fleet: LiveFleet) -> None:
    """n3 is registered, role=web, and offline: while its target waits, run says so (with
    when it gives up), then it ends UNDELIVERABLE and the job PARTIAL (exit 4)."""
    fleet.register("n3", labels={"role": "web"}, daemon_address="127.0.0.1:1")
    now_ms = int(time.time() * 1000)
    gone = fleet.run(
        fleet.manager.nodes.mark_offline(cutoff_ms=now_ms + 1, now_ms=now_ms, only=["n3"])
    )
    assert gone == ["n3"]
    note = run_with_n3_undeliverable(fleet)
    assert note.startswith(
        "fleetctl: 1 target(s) wait for their node to come back online: n3 (offline since "
    )


def test_jobs_show_says_which_targets_wait_for_an_offline_node(fleet: LiveFleet) -> None:
    """A detached job whose n3 is offline: once n1 and n2 are done, jobs show lists n3
    PENDING and says on stderr that it waits for its node, and until when."""
    fleet.register("n3", labels={"role": "web"}, daemon_address="127.0.0.1:1")
    now_ms = int(time.time() * 1000)
    fleet.run(fleet.manager.nodes.mark_offline(cutoff_ms=now_ms + 1, now_ms=now_ms, only=["n3"]))
    started = fleet.fleetctl(
        "run", "-l", "role=web", "--yes", "--detach", "--delivery-timeout", "10m", "--", "true"
    )
    assert started.exit_code == 0, started.output
    job_id = started.stdout.strip()
    deadline = time.monotonic() + 30
    while show(fleet, job_id)["counts"] != {"SUCCESS": 2, "PENDING": 1}:
        assert time.monotonic() < deadline, show(fleet, job_id)
        time.sleep(0.2)
    shown = fleet.fleetctl("jobs", "show", job_id)
    assert shown.exit_code == 0, shown.output
    assert re.search(r"^n3 +PENDING", shown.stdout, re.M), shown.stdout
    assert shown.stderr.startswith(
        "fleetctl: 1 target(s) wait for their node to come back online: n3 (offline since "
    ), shown.stderr
    assert "(the delivery timeout, 10m) ends UNDELIVERABLE" in shown.stderr
    assert fleet.fleetctl("jobs", "cancel", job_id).exit_code == 0
    ended = fleet.fleetctl("jobs", "show", job_id)
    assert "wait for their node" not in ended.stderr  # an ended job waits for nothing


def test_run_says_which_targets_wait_for_a_lost_control_stream(fleet: LiveFleet) -> None:
    """n3 holds a control stream only (no address to dial) and loses it: the manager keeps
    it online for the stream's grace, so run names its target as waiting for the
    stream, not for the node to come back online; it ends UNDELIVERABLE (exit 4)."""

    async def connect_and_drop() -> None:
        end, welcome = await open_stream(
            fleet.pki, fleet.manager.port, "n3", labels={"role": "web"}, daemon_address=""
        )
        assert welcome is not None
        assert welcome.HasField("welcome"), welcome
        await end.close()

    fleet.run(connect_and_drop())
    nodes = until(
        lambda: json.loads(fleet.fleetctl("-o", "json", "nodes", "list").stdout)["nodes"],
        lambda ns: any(n["node_id"] == "n3" and n["stream"] == "LOST" for n in ns),
    )
    assert [n["status"] for n in nodes if n["node_id"] == "n3"] == ["ONLINE"]
    note = run_with_n3_undeliverable(fleet)
    assert note.startswith(
        "fleetctl: 1 target(s) wait for their node's control stream to come back"
        " (the node still counts as online): n3 (lost at "
    ), note
    (job,) = listed(fleet)
    (n3,) = [t for t in show(fleet, job["id"])["targets"] if t["node_id"] == "n3"]
    assert "attempt(s) failed, the last: n3: the node has no control stream" in n3["reason"]


def test_a_pending_target_says_why_its_node_could_not_be_reached(fleet: LiveFleet) -> None:
    """n4 is online but its daemon refuses connections: its target stays PENDING (retried
    until the delivery timeout, not FAILED), and jobs show gives the last attempt's error
    as its reason."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fleet.register("n4", labels={"role": "db"}, daemon_address=f"127.0.0.1:{port}")
    started = fleet.fleetctl(
        "run", "-n", "n4", "--detach", "--delivery-timeout", "10m", "--", "true"
    )
    assert started.exit_code == 0, started.output
    job_id = started.stdout.strip()
    (target,) = until(lambda: show(fleet, job_id)["targets"], lambda ts: ts[0]["reason"] != "")
    assert target["state"] == "PENDING"
    assert re.fullmatch(
        rf"not delivered yet after \d+ attempt\(s\): n4: daemon at 127\.0\.0\.1:{port}"
        r" refused the connection \(is fleet-daemon running there\?\);"
        r" retried until the delivery timeout",
        target["reason"],
    ), target["reason"]
    assert fleet.fleetctl("jobs", "cancel", job_id).exit_code == 0


def test_manager_rejects_what_only_it_can_check(fleet: LiveFleet) -> None:
    """A timeout beyond the manager's range is INVALID_ARGUMENT: exit 2, one line, no job."""
    result = fleet.fleetctl("run", "-n", "n1", "--timeout", "3650d", "--", "true")
    assert result.exit_code == 2, result.output
    assert "timeout" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert listed(fleet) == []


def _env(live: LiveFleet) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "FLEETCTL_"))},
        "PYTHONPATH": str(REPO),
        "XDG_CONFIG_HOME": str(live.home),
        "FLEET_MANAGER": live.address,
        "FLEET_CA": str(live.operator.ca_file),
        "FLEET_CERT": str(live.operator.cert_file),
        "FLEET_KEY": str(live.operator.key_file),
    }


_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\r")


def _read_until(fd: int, wanted: bytes, seen: bytearray, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while wanted not in _ANSI.sub(b"", bytes(seen)):
        if time.monotonic() > deadline:
            raise AssertionError(f"{wanted!r} not seen; got {bytes(seen)[-2000:]!r}")
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                seen.extend(os.read(fd, 65536))
            except OSError:  # the other end closed
                return


@contextlib.contextmanager
def _on_a_terminal(
    fleet: LiveFleet, *args: str
) -> Iterator[tuple[subprocess.Popen[bytes], int, bytearray]]:
    """`fleetctl ARGS` on a pseudo-terminal: (the process, the terminal's master end, a
    buffer for what it shows); killed if still running at the end."""
    master, slave = os.openpty()
    argv = [sys.executable, "-c", "from fleetctl.app import main; main()", *args]
    proc = subprocess.Popen(
        argv, env=_env(fleet), stdin=slave, stdout=slave, stderr=slave, start_new_session=True
    )
    os.close(slave)
    try:
        yield proc, master, bytearray()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_ctrl_c_on_a_terminal_asks_and_c_cancels_the_job(fleet: LiveFleet) -> None:
    """On a terminal, Ctrl-C asks; 'c' cancels the job, fleetctl follows it to CANCELLED, exit 5."""
    command = ("run", "-n", "n1", "--", "sh", "-c", "echo started; sleep 60")
    with _on_a_terminal(fleet, *command) as (proc, master, seen):
        try:
            _read_until(master, b"n1 | started", seen)
            proc.send_signal(signal.SIGINT)
            _read_until(master, b"cancel the job (c), or leave it running (l)?", seen)
            os.write(master, b"c\n")
            _read_until(master, b"CANCELLED", seen)
            proc.wait(30)
            _read_until(master, b"\x00", seen, within=1)  # whatever is left
        except AssertionError:
            if proc.poll() is None:
                raise
    text = _ANSI.sub(b"", bytes(seen)).decode(errors="replace")
    assert proc.returncode == EXIT_JOB_CANCELLED, text
    (job,) = listed(fleet)
    assert f"cancelling job {job['id']}" in text
    assert job["state"] == "CANCELLED"
    # The note starts a line of its own (after a newline, or on the line the
    # progress display erased as it stopped), not glued to the progress line.
    raw = re.sub(r"\x1b\[[0-9;]*m", "", bytes(seen).decode(errors="replace"))
    before = raw[: raw.index("cancelling job")]
    assert before.endswith(("\n", "\r", "\x1b[2K")), repr(before[-80:])


def test_on_a_terminal_output_lines_start_their_own_line_under_the_progress_line(
    fleet: LiveFleet,
) -> None:
    """The progress line redraws below the output; no output line is glued to it."""
    script = "for i in 1 2 3 4; do echo tick $i; sleep 0.6; done"
    with _on_a_terminal(fleet, "run", "-n", "n1", "--", "sh", "-c", script) as (
        proc,
        master,
        seen,
    ):
        try:
            _read_until(master, b"SUCCESS", seen)
            proc.wait(30)
            _read_until(master, b"\x00", seen, within=1)  # whatever is left
        except AssertionError:
            if proc.poll() is None:
                raise
    text = _ANSI.sub(b"", bytes(seen)).decode(errors="replace")
    assert proc.returncode == 0, text
    assert "RUNNING: 0/1 done" in text, text  # the progress line was drawn
    # Colours out, cursor controls kept: a line starts after a newline, or
    # after the Live display's "carriage return, erase line".
    raw = re.sub(r"\x1b\[[0-9;]*m", "", bytes(seen).decode(errors="replace"))
    for i in range(1, 5):
        at = raw.index(f"n1 | tick {i}")
        before = raw[:at]
        assert before.endswith(("\n", "\r", "\r\x1b[2K")), repr(raw[max(0, at - 60) : at + 12])


@pytest.mark.parametrize("answer", ["ctrl-c", "ctrl-d"])
def test_ctrl_c_or_ctrl_d_at_the_confirmation_runs_nothing(fleet: LiveFleet, answer: str) -> None:
    """Asked to confirm a job on two nodes, Ctrl-C or the end of input is a no: one line,
    exit 1, no job (Ctrl-C used to be swallowed by the call's handler and the prompt asked
    again)."""
    with _on_a_terminal(fleet, "run", "-l", "role=web", "--", "true") as (proc, master, seen):
        _read_until(master, b"Proceed? [y/N]:", seen)
        if answer == "ctrl-c":
            proc.send_signal(signal.SIGINT)
        else:
            os.write(master, b"\x04")
        proc.wait(30)
        _read_until(master, b"\x00", seen, within=1)  # whatever is left
    text = _ANSI.sub(b"", bytes(seen)).decode(errors="replace")
    assert proc.returncode == 1, text
    assert "fleetctl: error: aborted; nothing was run" in text
    assert text.count("Proceed?") == 1, text
    assert "internal error" not in text
    assert listed(fleet) == []
