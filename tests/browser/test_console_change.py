"""The console's rollouts, definitions and jobs pages, driven in Chromium against a real fleet.

The module's fleet gets one definition, `sleeper` (node-2 only), with two
revisions rolled out before the first test. Jobs run on both daemons for
real: their output reaches the page live, operations done in the browser
are audited as the console's operator, and output containing `<script>`
stays text.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_helpers import CONTEXT_OPTIONS, Console, Fleetctl, PageErrors, open_page, shot
from fleetctl_live import LiveFleet
from playwright.sync_api import Browser, Page, expect

from fleet.v1 import common_pb2, manager_pb2
from manager.storage.audit import AuditRecord, AuditRepository

OPERATOR = "operator/alice"
"""Who the console acts as (the `fleetctl` fixture's certificate)."""
DEFINITION = "sleeper"
SCRIPT_LINE = "<script>alert(1)</script>"
REFUSED_REQUEST = "Failed to load resource: the server responded with a status of 400"
"""What Chromium logs for an API call the manager refused (a test that expects one allows it)."""


def definition_file(path: Path, seconds: int, *, min_healthy: str = "1s") -> Path:
    """A definition file for `sleeper`: a `sleep SECONDS` agent on the staging node."""
    path.write_text(
        f"""
[[definitions]]
name = "{DEFINITION}"
selector = "env=staging"

[definitions.agent]
argv = ["sleep", "{seconds}"]
restart = "always"
health = {{ kind = "none" }}

[definitions.update]
min_healthy_time = "{min_healthy}"
"""
    )
    return path


def apply(fleetctl: Fleetctl, file: Path, message: str) -> None:
    """`fleetctl apply` the file (which must start a rollout)."""
    result = fleetctl("apply", "-f", str(file), "--message", message)
    assert result.returncode == 0, result.stderr
    assert "rollout" in result.stdout, result.stdout


def rollout_ids(fleetctl: Fleetctl) -> list[int]:
    """The ids of `sleeper`'s rollouts, newest first."""
    return [int(r["id"]) for r in fleetctl.json("rollout", "list", DEFINITION)["rollouts"]]


@pytest.fixture(scope="module")
def revisions(fleetctl: Fleetctl, tmp_path_factory: pytest.TempPathFactory) -> list[int]:
    """`sleeper` applied twice (sleep 1001, then 1002), both rollouts SUCCESSFUL; their ids."""
    folder = tmp_path_factory.mktemp("definitions")
    for seconds, why in ((1001, "first sleeper"), (1002, "a longer sleep")):
        apply(fleetctl, definition_file(folder / f"{seconds}.toml", seconds), why)
        status = fleetctl("rollout", "status", DEFINITION, "-w", timeout=90)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "SUCCESSFUL" in status.stdout
    return sorted(rollout_ids(fleetctl))


def audit(fleet: LiveFleet) -> list[AuditRecord]:
    """The manager's audit trail, newest first."""
    return fleet.run(AuditRepository(fleet.manager.db).list_recent(limit=200))


def audited(fleet: LiveFleet, action: str, target: str) -> list[str]:
    """The actors of the audit entries of `action` on `target`."""
    return [a.actor for a in audit(fleet) if a.action == action and a.target == target]


def jobs_now(fleetctl: Fleetctl) -> set[str]:
    """The ids of every job the manager has."""
    return {j["id"] for j in fleetctl.json("jobs", "list")["jobs"]}


def job_id_of(page: Page) -> str:
    """The job id of the job page open in `page`."""
    match = re.search(r"#/jobs/([^/?]+)$", page.url)
    assert match, f"not a job page: {page.url}"
    return match[1]


# --- rollouts and definitions ----------------------------------------------------


def test_rollouts_page_lists_the_definition_and_its_rollouts(
    page: Page, revisions: list[int]
) -> None:
    """#/rollouts: the definition with its revision and nodes, and both rollouts, successful."""
    open_page(page, "#/rollouts", "rollouts")
    definition = page.get_by_role("row").filter(
        has=page.get_by_role("link", name=DEFINITION, exact=True)
    )
    expect(definition.first).to_contain_text("env=staging")
    expect(definition.first).to_contain_text("1/1")
    for rollout_id in revisions:
        row = page.get_by_role("row").filter(
            has=page.get_by_role("link", name=str(rollout_id), exact=True)
        )
        expect(row).to_contain_text("successful")
        expect(row).to_contain_text(OPERATOR)
    shot(page, "rollouts")


def test_rollout_page_shows_its_batch_and_node(page: Page, revisions: list[int]) -> None:
    """#/rollouts/<id> (without the definition's name, as the overview links it): the batch,
    node-2 done on revision 2, the policy in fleetctl's words."""
    newest = revisions[-1]
    open_page(page, f"#/rollouts/{newest}", "rollout")
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Rollout {newest} of {DEFINITION}")
    expect(page.locator("dl.props")).to_contain_text("min_healthy_time 1s")
    node = page.get_by_role("row").filter(has=page.get_by_role("link", name="node-2", exact=True))
    expect(node).to_contain_text("done")
    expect(node.get_by_role("cell").nth(4)).to_have_text("2")  # the revision it runs
    expect(page.locator("table.batches")).to_contain_text("batch 1")
    shot(page, "rollout")


def test_definition_page_diffs_two_revisions(page: Page, revisions: list[int]) -> None:
    """#/definitions/<name>: the current spec, and the diff of revisions 1 and 2 shows the
    argv change as a removed and an added line; the same revision twice shows none."""
    open_page(page, f"#/definitions/{DEFINITION}", "definition")
    expect(page.locator("pre.spec")).to_contain_text('"sleep"')
    page.get_by_role("radio", name="diff from revision 1").check()
    page.get_by_role("radio", name="diff to revision 2").check()
    diff = page.get_by_label("diff from revision 1 to revision 2")
    expect(diff.locator(".diff-del")).to_have_text(['-      "1001"'])
    expect(diff.locator(".diff-add")).to_have_text(['+      "1002"'])
    expect(diff.locator(".diff-hunk")).to_have_count(1)
    shot(page, "definition")
    page.get_by_role("radio", name="diff from revision 2").check()
    expect(page.get_by_label("diff from revision 2 to revision 2")).to_contain_text(
        "(no differences)"
    )


def test_a_rollout_paused_resumed_aborted_and_undone_in_the_browser_is_audited(
    page: Page, revisions: list[int], fleet: LiveFleet, fleetctl: Fleetctl, tmp_path: Path
) -> None:
    """A live rollout's pause, resume and abort, each confirmed naming the rollout, change its
    state on the page as they happen and are audited as the console's operator; undo, planned
    in its confirmation, stores revision 2's content again and starts a rollout of it."""
    apply(fleetctl, definition_file(tmp_path / "slow.toml", 1003, min_healthy="4m"), "slow")
    live = rollout_ids(fleetctl)[0]
    assert live not in revisions
    open_page(page, f"#/rollouts/{live}?name={DEFINITION}", "rollout")
    state = page.locator("dl.props dd .badge").first
    expect(state).to_have_text("running")
    page.get_by_placeholder("why (optional; kept in the audit)").fill("browser test")
    for button, after in (("Pause", "paused"), ("Resume", "running"), ("Abort", "failed")):
        page.get_by_role("button", name=button, exact=True).click()
        dialog = page.get_by_role("dialog")
        expect(dialog).to_contain_text(f"rollout {live} of {DEFINITION}")
        dialog.get_by_role("button", name=button, exact=True).click()
        expect(dialog).to_be_hidden()
        expect(state).to_have_text(after)
    expect(
        page.get_by_role("button", name="Pause")
    ).to_be_hidden()  # an ended rollout has no controls
    for action in ("rollout.pause", "rollout.resume", "rollout.abort"):
        assert audited(fleet, action, DEFINITION) == [OPERATOR], action
    reason = fleetctl.json("rollout", "list", DEFINITION)["rollouts"][0]["reason"]
    assert f"aborted by {OPERATOR}: browser test" in reason

    page.get_by_role("button", name="Undo…").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text(f"roll {DEFINITION} back to revision 2?")
    expect(dialog).to_contain_text("revision 4 (was 3)")
    expect(dialog.get_by_role("listitem")).to_have_text(["node-2: restart"])
    dialog.get_by_role("button", name="Undo", exact=True).click()
    undone = rollout_ids(fleetctl)[0]
    expect(page.get_by_role("status")).to_contain_text(f"rollout {undone} started")
    shown = fleetctl.json("definitions", "show", DEFINITION)
    assert (shown["revision"], shown["actor"]) == (4, OPERATOR)
    assert shown["message"] == "undo to revision 2: browser test"
    assert shown["definition"]["agent"]["argv"] == ["sleep", "1002"]


# --- jobs ------------------------------------------------------------------------


def test_a_job_planned_and_run_in_the_browser_reaches_both_daemons_live(
    page: Page, fleet: LiveFleet, fleetctl: Fleetctl, tmp_path: Path
) -> None:
    """Plan, then Run after a confirmation naming both nodes: each target's output appears on
    the job page while the job still runs, `<script>` in it is text, and the job is the
    console operator's in the job, the jobs list, the events and the audit."""
    go = tmp_path / "go"
    script = (
        f"echo first-line\necho '{SCRIPT_LINE}'\n"
        f"while [ ! -e {shlex.quote(str(go))} ]; do sleep 0.1; done\n"
        "echo last-line\n"
    )
    jobs_before = jobs_now(fleetctl)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    open_page(page, "#/jobs", "jobs")
    page.get_by_role("button", name="Run a job…").click()
    form = page.get_by_role("form", name="Run a job")
    form.locator("input[name=selector]").fill("zone in (a,b)")
    form.get_by_label("shell script (/bin/sh)").check()
    form.locator("textarea[name=command]").fill(script)
    form.get_by_text("Options:").click()
    form.locator("input[name=timeout]").fill("2m")
    form.get_by_role("button", name="Plan").click()
    plan = page.locator("[data-plan]")
    expect(plan).to_contain_text("Plan: 2 targets")
    expect(plan).to_contain_text("timeout 2m")
    expect(plan.get_by_role("row")).to_have_count(3)  # the header and both nodes
    shot(page, "job-plan")
    assert jobs_now(fleetctl) == jobs_before, "the plan ran something"

    plan.get_by_role("button", name="Run on 2 nodes…").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("on 2 nodes?")
    expect(dialog.get_by_role("listitem")).to_have_text(["node-1", "node-2"])
    dialog.get_by_role("button", name="Run", exact=True).click()
    expect(page.locator('[data-page="job"][data-ready="true"]')).to_be_visible()
    job_id = job_id_of(page)

    output = page.get_by_label("job output")
    for node in ("node-1", "node-2"):
        expect(output).to_contain_text(f"{node} | first-line")
        expect(output).to_contain_text(f"{node} | {SCRIPT_LINE}")
    assert "last-line" not in output.inner_text()  # live: the job waits for `go`
    expect(page.locator("dl.props dd .badge").first).to_have_text("running")
    assert output.locator("script").count() == 0
    go.touch()
    for node in ("node-1", "node-2"):
        expect(output).to_contain_text(f"{node} | last-line", timeout=20_000)
    expect(page.locator("dl.props dd .badge").first).to_have_text("success")
    expect(page.locator("dl.props")).to_contain_text(f"by {OPERATOR}")
    shot(page, "job")
    assert dialogs == [], "the page ran a script from the job's output"

    shown = fleetctl.json("jobs", "show", job_id)
    assert shown["actor"] == OPERATOR
    assert shown["state"] == "SUCCESS"
    events = fleetctl.json("events", "--kind", "job_started")["events"]
    assert [e["actor"] for e in events if e["attributes"].get("job_id") == job_id] == [OPERATOR]
    assert audited(fleet, "job.run", job_id) == [OPERATOR]

    open_page(page, "#/jobs", "jobs")
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name=job_id))
    expect(row).to_contain_text("success")
    expect(row).to_contain_text("2 success")
    expect(row).to_contain_text(OPERATOR)
    shot(page, "jobs")


def test_cancelling_a_long_job_in_the_browser_ends_it_cancelled(
    page: Page, fleet: LiveFleet, fleetctl: Fleetctl
) -> None:
    """`sleep 60` cancelled from its page, after a confirmation naming the running target,
    ends CANCELLED long before its minute, audited as the console's operator."""
    started = fleetctl("run", "--node", "node-1", "--detach", "--", "sleep", "60")
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.strip()
    open_page(page, f"#/jobs/{job_id}", "job")
    target = page.get_by_role("row").filter(has=page.get_by_role("link", name="node-1", exact=True))
    expect(target).to_contain_text("running")
    page.get_by_role("button", name="Cancel…").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text(f"Cancel job {job_id}")
    expect(dialog.get_by_role("listitem")).to_have_text(["node-1 (running)"])
    dialog.get_by_role("button", name="Cancel the job").click()
    expect(page.locator("dl.props dd .badge").first).to_have_text("cancelled", timeout=20_000)
    expect(target).to_contain_text("cancelled")
    expect(page.get_by_role("button", name="Cancel…")).to_be_hidden()
    shown = fleetctl("-o", "json", "jobs", "show", job_id)
    assert shown.returncode == 5, shown.stderr  # jobs show exits with the outcome: cancelled
    assert json.loads(shown.stdout)["state"] == "CANCELLED"
    assert audited(fleet, "job.cancel", job_id) == [OPERATOR]


def test_rerunning_the_failed_targets_in_the_browser_starts_a_linked_job(
    page: Page, fleet: LiveFleet, fleetctl: Fleetctl
) -> None:
    """Re-run failed, confirmed naming the failed target and why, starts a new job on it
    alone, linked to the first, as the console's operator."""
    started = fleetctl("run", "--node", "node-1", "--detach", "--", "sh", "-c", "exit 3")
    assert started.returncode == 0, started.stderr
    first = started.stdout.strip()
    open_page(page, f"#/jobs/{first}", "job")
    expect(page.locator("dl.props dd .badge").first).to_have_text("failed", timeout=20_000)
    page.get_by_role("button", name="Re-run failed…").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text(f"of job {first}")
    expect(dialog.get_by_role("listitem")).to_have_text([re.compile(r"^node-1: failed")])
    dialog.get_by_role("button", name="Re-run", exact=True).click()
    expect(page.get_by_role("link", name=first)).to_be_visible()  # "Rerun of" on the new job
    second = job_id_of(page)
    assert second != first
    expect(page.locator("dl.props dd .badge").first).to_have_text("failed", timeout=20_000)
    shown = fleetctl("-o", "json", "jobs", "show", second)
    job = json.loads(shown.stdout)
    assert (job["rerun_of"], job["actor"]) == (first, OPERATOR)
    assert [t["node_id"] for t in job["targets"]] == ["node-1"]
    assert audited(fleet, "job.rerun", second) == [OPERATOR]


def test_a_target_waiting_for_an_offline_node_says_why_on_the_job_page(
    page: Page, fleet: LiveFleet, fleetctl: Fleetctl
) -> None:
    """A job on node-1 and gone-1, which is registered and offline: once node-1 is done the
    page says gone-1's target waits for its node, since when, and until when, as `fleetctl
    run` does; an ended job says nothing of it."""
    fleet.register("gone-1", labels={"env": "gone"}, daemon_address="127.0.0.1:1")
    now_ms = int(time.time() * 1000)
    gone = fleet.run(
        fleet.manager.nodes.mark_offline(cutoff_ms=now_ms + 1, now_ms=now_ms, only=["gone-1"])
    )
    assert gone == ["gone-1"]
    started = fleetctl(
        "run", "-n", "node-1", "-n", "gone-1", "--yes", "--detach",
        "--delivery-timeout", "10m", "--", "true",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.strip()
    open_page(page, f"#/jobs/{job_id}", "job")
    note = page.get_by_role("status", name="why targets wait")
    expect(note).to_contain_text(
        "1 target(s) wait for their node to come back online: gone-1 (offline since ",
        timeout=20_000,
    )
    expect(note).to_contain_text("(the delivery timeout, 10m) ends undeliverable")
    expect(note).not_to_contain_text("node-1")
    shot(page, "job-waiting")
    assert fleetctl("jobs", "cancel", job_id).returncode == 0
    expect(page.locator("dl.props dd .badge").first).to_have_text("cancelled", timeout=20_000)
    expect(note).to_be_hidden()


@pytest.fixture
def refusing_page(
    browser: Browser, console: Console, console_session: dict[str, Any]
) -> Iterator[tuple[Page, PageErrors]]:
    """A logged-in page for a test that expects the manager to refuse a call: Chromium logs
    the refused request as a console error, so this page fails its test on any other error,
    and without one."""
    errors = PageErrors()
    options = {**CONTEXT_OPTIONS, "storage_state": console_session, "base_url": console.origin}
    context = browser.new_context(**options)
    errors.watch(context)
    try:
        yield context.new_page(), errors
    finally:
        context.close()  # dispatches the events still in flight
    assert errors.seen, "the manager refused nothing"
    unexpected = [e for e in errors.seen if REFUSED_REQUEST not in e]
    assert not unexpected, f"the page reported other errors: {unexpected}"


def test_an_offline_nodes_agents_are_not_counted_as_running(
    page: Page, fleet: LiveFleet, fleetctl: Fleetctl
) -> None:
    """quiet-1's daemon reported two RUNNING agents, then its node went offline (a daemon
    killed with -9 leaves them running, unseen): the overview counts them apart from the
    online nodes' running agents, and the nodes page marks them as last reported."""
    fleet.register("quiet-1", labels={"env": "quiet"}, daemon_address="127.0.0.1:1")
    running = common_pb2.AGENT_STATUS_RUNNING
    fleet.sync_agents(
        "quiet-1",
        [manager_pb2.AgentState(agent_id=a, status=running) for a in ("web", "worker")],
    )
    now_ms = int(time.time() * 1000)
    fleet.run(
        fleet.manager.nodes.mark_offline(cutoff_ms=now_ms + 1, now_ms=now_ms, only=["quiet-1"])
    )
    agents = fleetctl.json("agents", "list")["agents"]
    unseen = sum(1 for a in agents if a["stale"])
    assert unseen >= 2  # quiet-1's, and any other offline node's
    live = sum(1 for a in agents if a["status"] == "RUNNING" and not a["stale"])

    open_page(page, "#/", "overview")
    card = page.locator(".card", has=page.get_by_role("heading", name="Agents", exact=True))
    expect(card.locator(".big")).to_have_text(str(len(agents)))
    expect(card.locator("li", has=page.get_by_text("running", exact=True))).to_have_text(
        f"running{live}"
    )
    expect(card.locator("li", has=page.get_by_text("node offline", exact=True))).to_have_text(
        f"node offline{unseen}"
    )
    open_page(page, "#/nodes?selector=env%3Dquiet", "nodes")
    expect(page.locator("tbody tr", has_text="quiet-1")).to_contain_text("2/2*")
    # Its daemon cannot be asked: the operations say so before anyone confirms one.
    open_page(page, "#/agents/quiet-1/web", "agent")
    for verb in ("Start", "Stop", "Restart"):
        button = page.locator(".operations").get_by_role("button", name=verb, exact=True)
        expect(button).to_be_disabled()
        expect(button).to_have_attribute("title", "its node is offline: its daemon cannot be asked")
    # Nor are its log and metrics asked of it (they only failed, in two error boxes).
    expect(page.get_by_text("Its node is offline: the log and metrics are read")).to_have_count(2)


def test_the_run_form_shows_mistakes_in_place_and_runs_nothing(
    refusing_page: tuple[Page, PageErrors], fleetctl: Fleetctl
) -> None:
    """A selector that does not parse is named next to its box (no call made); one the manager
    refuses (it matches no node) shows the manager's words; nothing runs."""
    page, errors = refusing_page
    before = jobs_now(fleetctl)
    open_page(page, "#/jobs?run", "jobs")
    form = page.get_by_role("form", name="Run a job")
    form.locator("textarea[name=command]").fill("true")
    form.locator("input[name=selector]").fill("env in (")
    form.get_by_role("button", name="Plan").click()
    expect(form.get_by_role("alert")).to_have_text(
        "position 8: expected a value, ',' or ')', found end of string"
    )
    assert errors.seen == []
    form.locator("input[name=selector]").fill("env=nowhere")
    form.get_by_role("button", name="Plan").click()
    expect(page.get_by_role("alert")).to_contain_text("env=nowhere matches no registered node")
    expect(page.locator("[data-plan]")).to_have_count(0)
    assert jobs_now(fleetctl) == before
