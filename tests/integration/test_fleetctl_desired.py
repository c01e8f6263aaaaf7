"""fleetctl apply / definitions / rollout against a real manager and simulated daemons.

The manager is real (mTLS, SQLite, the real clock so rollouts progress);
its nodes are `bench.sim` daemons: real gRPC servers that apply PushUpdate
and report their agents back, where a "bad" revision is one the test names
(its agent goes FATAL). fleetctl runs in this thread as the command does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetctl_live import LiveFleet, live_fleet

from bench.sim import SimFleet
from fleetctl.rollouts import EXIT_ROLLOUT_FAILED, EXIT_ROLLOUT_REVERTED

WEB = """\
[[definitions]]
name = "web"
selector = "env=prod"

[definitions.agent]
argv = ["/usr/bin/web", "--port", "80"]
version = "{version}"
stop_timeout = "5s"
env = {{ MODE = "live" }}

[definitions.update]
max_parallel = {max_parallel}
min_healthy_time = 0
healthy_deadline = "{healthy_deadline}"
progress_deadline = "2m"
auto_revert = {auto_revert}
"""


def web(
    version: str = "1.0",
    *,
    max_parallel: str = "1",
    healthy_deadline: str = "60s",
    auto_revert: bool = False,
) -> str:
    return WEB.format(
        version=version,
        max_parallel=max_parallel,
        healthy_deadline=healthy_deadline,
        auto_revert=str(auto_revert).lower(),
    )


class Env:
    """A live manager, its simulated nodes, and a directory for definition files."""

    def __init__(self, live: LiveFleet, sims: SimFleet, files: Path) -> None:
        self.live = live
        self.sims = sims
        self.files = files

    def add(self, name: str, labels: dict[str, str], **behaviour: Any) -> None:
        async def go() -> None:
            node = await self.sims.add(name, labels=labels, agents=(), **behaviour)
            await node.register(self.live.address, self.live.pki.trust_domain)

        self.live.run(go())

    def write(self, name: str, text: str) -> str:
        path = self.files / name
        path.write_text(text)
        return str(path)

    def revisions(self, agent: str = "web") -> dict[str, int]:
        """node -> the revision of `agent` its daemon runs."""
        out = {}
        for node in self.sims.nodes:
            spec = node.servicer.pushed.get(agent)
            if spec is not None:
                out[node.node_id] = spec.revision
        return out

    def ok(self, *args: str, input: str | None = None) -> str:
        result = self.live.fleetctl(*args, input=input)
        assert result.exit_code == 0, (args, result.output)
        return result.stdout


@pytest.fixture
def env(pki: Any, tmp_path: Path) -> Iterator[Env]:
    with live_fleet(pki, tmp_path, clock=time.time) as live:
        sims = live.run(SimFleet.start(pki.ca, tmp_path / "sims"))
        files = tmp_path / "defs"
        files.mkdir()
        try:
            yield Env(live, sims, files)
        finally:
            live.run(sims.close())


def until(probe: Callable[[], Any], ok: Callable[[Any], bool], within: float = 20.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {within}s; last: {value!r}")
        time.sleep(0.1)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fleetctl: error: "), stderr
    return lines[0].removeprefix("fleetctl: error: ")


def test_plan_apply_watch_check_revision_history_and_undo(env: Env) -> None:
    """The operator's round trip, each step through the real fleetctl."""
    for name, label in (("p1", "prod"), ("p2", "prod"), ("s1", "staging")):
        env.add(name, {"env": label})
    path = env.write("web.toml", web("1.0"))

    planned = env.ok("apply", "-f", path, "--plan")
    assert planned.splitlines()[0].startswith("web: ")
    assert "p1" in planned
    assert "add" in planned
    assert "s1" not in planned
    assert "batch 1: p1" in planned
    assert "batch 2: p2" in planned
    assert "No definitions" in env.ok("definitions", "list")  # the plan stored nothing
    assert env.revisions() == {}

    applied = env.ok("apply", "-f", path, "--message", "first web")
    assert applied.strip() == "web: revision 1 (rollout 1 started)"
    watched = env.live.fleetctl("rollout", "status", "web", "-w")
    assert watched.exit_code == 0, watched.output
    assert "SUCCESSFUL" in watched.stdout
    assert "batch 1: 1/1 done: p1" in watched.stdout
    assert env.revisions() == {"p1": 1, "p2": 1}
    # Nothing earlier to go back to: the manager says so, fleetctl names the flag.
    nowhere = env.live.fleetctl("rollout", "undo", "web")
    assert nowhere.exit_code == 1, nowhere.output
    assert nowhere.stderr.strip() == (
        "fleetctl: error: cannot undo web: web has no earlier revision that rolled out"
        " successfully; name the revision to go back to (--to-revision N)"
    )
    listed = env.ok("nodes", "list").splitlines()
    assert listed[0].split()[3] == "DESIRED"
    desired = {row.split()[0]: row.split()[3] for row in listed[1:]}
    assert desired == {"p1": "in", "p2": "in", "s1": "-"}  # "in sync"; s1 is not selected

    assert env.ok("apply", "-f", path).strip() == "web: unchanged (revision 1)"

    path = env.write("web.toml", web("2.0"))
    stale = env.live.fleetctl("apply", "-f", path, "--check-revision", "0")
    assert stale.exit_code == 1, stale.output
    assert one_error_line(stale.stderr).startswith(f"{path}: web already exists")
    applied = env.ok("apply", "-f", path, "--check-revision", "1", "--message", "ship 2.0")
    assert applied.strip() == "web: revision 2 (rollout 2 started)"
    assert env.live.fleetctl("rollout", "status", "web", "-w").exit_code == 0
    assert env.revisions() == {"p1": 2, "p2": 2}

    history = env.ok("definitions", "history", "web")
    assert "revision 1  " in history
    assert "by operator/alice: first web" in history
    assert "by operator/alice: ship 2.0" in history
    assert "  -  version: '1.0'\n  +  version: '2.0'\n" in history
    as_json = json.loads(env.ok("definitions", "history", "web", "-o", "json"))
    assert [r["revision"] for r in as_json["revisions"]] == [1, 2]
    assert as_json["revisions"][1]["definition"]["agent"]["version"] == "2.0"
    assert "+  version: '2.0'" in as_json["revisions"][1]["diff"]

    shown = env.ok("definitions", "show", "web", "--revision", "1")
    assert "version: '1.0'" in shown
    assert "(current: 2)" in shown
    listed = env.ok("definitions", "list")
    row = next(line for line in listed.splitlines() if line.startswith("web"))
    assert row.split()[:4] == ["web", "2", "2", "2/2"]
    rollouts = json.loads(env.ok("rollout", "list", "-o", "json"))["rollouts"]
    assert [(r["id"], r["state"], r["done"]) for r in rollouts] == [
        (2, "SUCCESSFUL", 2),
        (1, "SUCCESSFUL", 2),
    ]

    undone = env.ok("rollout", "undo", "web", "--to-revision", "1", "--message", "back")
    assert undone.strip() == "web: revision 3 (rollout 3 started)"
    assert env.live.fleetctl("rollout", "status", "web", "-w").exit_code == 0
    assert env.revisions() == {"p1": 3, "p2": 3}
    shown = json.loads(env.ok("definitions", "show", "web", "-o", "json"))
    assert shown["definition"]["agent"]["version"] == "1.0"


def test_a_bad_revision_fails_and_auto_revert_brings_back_the_last_good_one(env: Env) -> None:
    """Revision 2 crashes: without auto_revert, status exits 3 naming the failed node;
    with it, exit 4 and every node runs revision 1's content again."""
    env.add("p1", {"env": "prod"}, bad_revisions=(2, 3))
    env.add("p2", {"env": "prod"}, bad_revisions=(2, 3))
    env.ok("apply", "-f", env.write("web.toml", web("1.0")))
    assert env.live.fleetctl("rollout", "status", "web", "-w").exit_code == 0

    env.ok("apply", "-f", env.write("web.toml", web("2.0", healthy_deadline="2s")))
    failed = env.live.fleetctl("rollout", "status", "web", "-w")
    assert failed.exit_code == EXIT_ROLLOUT_FAILED, failed.output
    assert "State:    FAILED" in failed.stdout
    assert "failed: p1: " in failed.stdout
    again = env.live.fleetctl("rollout", "status", "web")
    assert again.exit_code == EXIT_ROLLOUT_FAILED

    env.ok("apply", "-f", env.write("web.toml", web("3.0", healthy_deadline="2s",
                                                    auto_revert=True)))  # fmt: skip
    reverted = env.live.fleetctl("rollout", "status", "web", "-w")
    assert reverted.exit_code == EXIT_ROLLOUT_REVERTED, reverted.output
    assert "REVERTED" in reverted.stdout
    until(env.revisions, lambda r: r == {"p1": 1, "p2": 1})


def test_canary_promote_pause_and_resume(env: Env) -> None:
    """A canary waits for `rollout promote`; a paused rollout starts no batch until resumed."""
    for i in range(4):
        env.add(f"p{i}", {"env": "prod"})
    env.ok("apply", "-f", env.write("web.toml", web("1.0", max_parallel="4")))
    assert env.live.fleetctl("rollout", "status", "web", "-w").exit_code == 0

    text = web("2.0").replace(
        "auto_revert = false", 'auto_revert = false\ncanary = 1\npause_between_batches = "2s"'
    )
    env.ok("apply", "-f", env.write("web.toml", text))
    status = until(
        lambda: env.live.fleetctl("rollout", "status", "web"),
        lambda r: "AWAITING_PROMOTION" in r.stdout,
    )
    assert status.exit_code == 0
    assert "fleetctl rollout promote web" in status.stdout
    assert sorted(env.revisions().values()) == [1, 1, 1, 2]

    promoted = env.ok("rollout", "promote", "web")
    assert promoted.startswith("rollout 2 of web promoted: ")
    paused = env.ok("rollout", "pause", "web", "--message", "db maintenance")
    assert paused.startswith("rollout 2 of web paused: PAUSED")
    held = env.revisions()
    assert 1 in held.values(), held
    time.sleep(3)  # longer than pause_between_batches: a running rollout would move on
    assert env.revisions() == held
    assert "paused by operator/alice: db maintenance" in env.ok("rollout", "status", "web")
    events = env.ok("events", "--tail", "5", "-o", "json")
    assert "revision 2 paused by operator/alice: db maintenance" in events
    env.ok("rollout", "resume", "web")
    done = env.live.fleetctl("rollout", "status", "web", "-w")
    assert done.exit_code == 0, done.output
    assert env.revisions() == {f"p{i}": 2 for i in range(4)}


def test_yaml_from_stdin_with_several_documents(env: Env) -> None:
    """`-f -` reads YAML (detected), one definition per document."""
    env.add("p1", {"env": "prod"})
    text = """\
name: web
selector: env=prod
agent: {argv: [/usr/bin/web], version: "1"}
update: {min_healthy_time: 0}
---
definitions:
  - name: worker
    selector: env=prod
    agent:
      argv: [/usr/bin/worker]
      config: {queue: jobs, threads: 4}
    update: {max_parallel: 100%, min_healthy_time: 0s}
"""
    out = env.ok("apply", "-f", "-", input=text)
    assert out.splitlines() == [
        "web: revision 1 (rollout 1 started)",
        "worker: revision 1 (rollout 2 started)",
    ]
    until(env.revisions, lambda r: r == {"p1": 1})
    until(lambda: env.revisions("worker"), lambda r: r == {"p1": 1})
    pushed = env.sims["p1"].servicer.pushed["worker"]
    assert pushed.config == b'{"queue":"jobs","threads":4}'
    assert pushed.autostart
    assert pushed.max_retries == 5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (web().replace("stop_timeout", "stop_timout"),
         "definition 'web': agent.stop_timout: unknown key; expected one of "),
        (web().replace('"env=prod"', '"env in (prod"'),
         "definition 'web': selector: 'env in (prod': position "),
        (web().replace('"5s"', '"5 parsecs"'),
         "definition 'web': agent.stop_timeout: '5 parsecs' is not a duration"),
        (web(max_parallel='"150%"'),
         "definition 'web': update.max_parallel: a percentage must be at most 100%, got 150%"),
        (web().replace('version = "1.0"', "version = 1.0"),
         "definition 'web': agent.version: must be a string, got a number (1.0)"),
        ('[[definitions]]\nselector = "env=prod"\n',
         "definition #1: name: is required"),
        (web() + web(), "definition 'web' is defined twice"),
        ("[[definitions]\n", "not valid TOML: "),
    ],
)  # fmt: skip
def test_a_bad_file_is_one_line_and_sends_nothing(env: Env, text: str, expected: str) -> None:
    """Exit 2, one line naming the file, the definition and the key; nothing stored."""
    path = env.write("bad.toml", text)
    result = env.live.fleetctl("apply", "-f", path)
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert line.startswith(f"{path}: "), line
    assert expected in line, line
    assert "No definitions" in env.ok("definitions", "list")


def test_refusals_by_the_manager_and_usage_errors_are_one_line(env: Env) -> None:
    """What only the manager can check names the file too; a wrong command line exits 2."""
    path = env.write("bad.toml", web().replace('name = "web"', 'name = "web!"'))
    refused = env.live.fleetctl("apply", "-f", path)
    assert refused.exit_code == 2, refused.output
    assert one_error_line(refused.stderr).startswith(f"{path}: definitions[web!].name: ")

    two = env.write("two.toml", web() + web().replace('name = "web"', 'name = "api"'))
    both = env.live.fleetctl("apply", "-f", two, "--check-revision", "1")
    assert both.exit_code == 2
    assert "--check-revision applies to one definition" in one_error_line(both.stderr)
    missing = env.live.fleetctl("apply", "-f", str(env.files / "nope.toml"))
    assert missing.exit_code == 2
    assert one_error_line(missing.stderr).endswith("nope.toml: no such file")
    unknown = env.live.fleetctl("rollout", "status", "nothing")
    assert unknown.exit_code == 1, unknown.output
    assert one_error_line(unknown.stderr) == (
        "definition 'nothing' does not exist (see `fleetctl definitions list`)"
    )
    unknown = env.live.fleetctl("definitions", "show", "nothing")
    assert unknown.exit_code == 1, unknown.output
    assert one_error_line(unknown.stderr) == (
        "definition 'nothing' does not exist (see `fleetctl definitions list`)"
    )
    assert "No definitions" in env.ok("definitions", "list")


def test_abort_fails_the_live_rollout_and_status_says_so(env: Env) -> None:
    """`rollout abort` on a rollout waiting for promotion: FAILED, exit 3; a control that
    does not fit the state afterwards is one line, exit 1."""
    for i in range(2):
        env.add(f"p{i}", {"env": "prod"})
    env.ok("apply", "-f", env.write("web.toml", web("1.0", max_parallel="2")))
    assert env.live.fleetctl("rollout", "status", "web", "-w").exit_code == 0
    text = web("2.0").replace("auto_revert = false", "auto_revert = false\ncanary = 1")
    env.ok("apply", "-f", env.write("web.toml", text))
    until(
        lambda: env.live.fleetctl("rollout", "status", "web").stdout,
        lambda out: "AWAITING_PROMOTION" in out,
    )
    aborted = env.ok("rollout", "abort", "web", "--message", "wrong build")
    assert aborted.startswith("rollout 2 of web aborted: FAILED")
    status = env.live.fleetctl("rollout", "status", "web")
    assert status.exit_code == EXIT_ROLLOUT_FAILED, status.output
    assert "aborted by operator/alice: wrong build" in status.stdout
    late = env.live.fleetctl("rollout", "promote", "web")
    assert late.exit_code == 1, late.output
    assert one_error_line(late.stderr).startswith("cannot promote web's rollout: ")


def test_delete_asks_plans_and_removes_the_agent_everywhere(env: Env) -> None:
    """Without --yes and no terminal: exit 2, nothing deleted. --plan: the nodes that lose it.
    --yes: deleted as a revision, the agent removed, the history kept."""
    env.add("p1", {"env": "prod"})
    env.ok("apply", "-f", env.write("web.toml", web()))
    until(env.revisions, lambda r: r == {"p1": 1})
    refused = env.live.fleetctl("definitions", "delete", "web")
    assert refused.exit_code == 2, refused.output
    assert "pass --yes" in one_error_line(refused.stderr)
    planned = env.ok("definitions", "delete", "web", "--plan")
    assert "p1" in planned
    assert "remove" in planned
    assert env.revisions() == {"p1": 1}
    deleted = env.ok("definitions", "delete", "web", "--yes", "--message", "retired")
    assert deleted.startswith("web: deleted as revision 2 (")
    until(env.revisions, lambda r: r == {})
    assert "No definitions" in env.ok("definitions", "list")
    assert "(deleted)" in env.ok("definitions", "list", "--all")
    assert "revision 2 (deleted)" in env.ok("definitions", "history", "web")
