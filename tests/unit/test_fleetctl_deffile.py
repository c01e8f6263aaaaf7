"""Definition files: TOML and YAML in, Definition messages out, every error one line."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from fleet import selectors
from fleet.v1 import common_pb2, desired_pb2
from fleetctl.deffile import (
    DefinitionFileError,
    check_unique,
    definition_from_dict,
    definition_to_dict,
    detect_format,
    load_text,
    render,
)
from fleetctl.rollouts import exit_code, progress_line, status_lines

FULL_TOML = """\
[[definitions]]
name = "web"
selector = "env=prod,tier in (web,api),!canary"
artifact = "web:1.4.2"

[definitions.agent]
argv = ["{artifact}/bin/web", "--port", "8080"]
type = "http"
version = "1.4.2"
env = { MODE = "prod" }
cwd = "{artifact}"
user = "web"
autostart = false
restart = "always"
expected_exit_codes = [0, 3]
start_secs = 2.5
backoff = { initial = "500ms", multiplier = 3, max = "2m", jitter = 0.1 }
max_retries = 0
stop_signal = "SIGINT"
stop_timeout = "30s"
log_max_bytes = 1048576
log_backups = 0
labels = { team = "edge" }
config = { listen = ":8080", workers = 4 }
resources = { cpu_millicores = 500, memory_bytes = 268435456 }
health = { kind = "heartbeat", timeout = 20 }

[[definitions.agent.checks]]
kind = "http"
url = "http://127.0.0.1:8080/healthz"
interval = "5s"
timeout = 2
failure_threshold = 3
expected_status_min = 200
expected_status_max = 299

[[definitions.agent.checks]]
kind = "tcp"
address = "127.0.0.1:8080"
initial_delay = "10s"

[definitions.update]
max_parallel = "25%"
canary = 1
auto_promote = true
min_healthy_time = "10s"
healthy_deadline = "5m"
progress_deadline = 600
auto_revert = true
pause_between_batches = 0

[definitions.placement]
count = 3
spread = "zone"
reschedule_after = "10m"

[[definitions]]
name = "worker"
agent = { argv = ["/usr/bin/worker"] }
"""

MINIMAL = {"name": "web", "agent": {"argv": ["/bin/web"]}}


def one(text: str, source: str = "defs.toml") -> desired_pb2.Definition:
    (loaded,) = load_text(source, text)
    return loaded.definition


def error(text: str, source: str = "defs.toml") -> str:
    with pytest.raises(DefinitionFileError) as info:
        load_text(source, text)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_full_toml_definition_maps_to_every_field() -> None:
    web, worker = load_text("defs.toml", FULL_TOML)
    assert (web.index, worker.index) == (1, 2)
    d = web.definition
    assert selectors.from_proto(d.selector) == selectors.parse("env=prod,tier in (web,api),!canary")
    assert (d.artifact.name, d.artifact.version, d.artifact.digest) == ("web", "1.4.2", "")
    a = d.agent
    assert list(a.argv) == ["{artifact}/bin/web", "--port", "8080"]
    assert (a.type, a.version, a.cwd, a.user) == ("http", "1.4.2", "{artifact}", "web")
    assert dict(a.env) == {"MODE": "prod"}
    assert (a.autostart, a.restart) == (False, common_pb2.RESTART_POLICY_ALWAYS)
    assert list(a.expected_exit_codes) == [0, 3]
    assert a.start_secs == 2.5
    assert (a.backoff.initial_seconds, a.backoff.multiplier) == (0.5, 3)
    assert (a.backoff.max_seconds, a.backoff.jitter) == (120, 0.1)
    assert (a.max_retries, a.log_backups, a.log_max_bytes) == (0, 0, 1048576)
    assert (a.stop_signal, a.stop_timeout_seconds) == ("SIGINT", 30)
    assert dict(a.labels) == {"team": "edge"}
    assert a.config == b'{"listen":":8080","workers":4}'
    assert (a.resources.cpu_millicores, a.resources.memory_bytes) == (500, 256 << 20)
    assert (a.health.kind, a.health.timeout_seconds) == (common_pb2.HEALTH_CHECK_KIND_HEARTBEAT, 20)
    http, tcp = a.checks
    assert (http.kind, http.url) == (
        common_pb2.HEALTH_CHECK_KIND_HTTP,
        "http://127.0.0.1:8080/healthz",
    )
    assert (http.interval_seconds, http.timeout_seconds, http.failure_threshold) == (5, 2, 3)
    assert (http.expected_status_min, http.expected_status_max) == (200, 299)
    assert (tcp.kind, tcp.address, tcp.initial_delay_seconds) == (
        common_pb2.HEALTH_CHECK_KIND_TCP,
        "127.0.0.1:8080",
        10,
    )
    u = d.update
    assert (u.max_parallel, u.canary, u.auto_promote, u.auto_revert) == ("25%", "1", True, True)
    assert (u.min_healthy_time_seconds, u.healthy_deadline_seconds) == (10, 300)
    assert u.progress_deadline_seconds == 600
    assert u.HasField("pause_between_batches_seconds")
    p = d.placement
    assert (p.count, p.spread, p.reschedule_after_seconds) == (3, "zone", 600)


def test_left_out_keys_mean_the_daemon_toml_defaults() -> None:
    """A pushed spec takes autostart, start_secs, max_retries and log_backups literally:
    the file's silence is sent as the TOML defaults, not as proto zeros."""
    a = definition_from_dict(MINIMAL).agent
    assert (a.autostart, a.start_secs, a.max_retries, a.log_backups) == (True, 1.0, 5, 3)
    d = definition_from_dict(MINIMAL)
    assert not d.HasField("artifact")
    assert not d.update.HasField("min_healthy_time_seconds")  # the manager's default


@pytest.mark.parametrize(
    "text",
    [
        "- name: web\n  agent: {argv: [/bin/web]}\n- name: api\n  agent: {argv: [/bin/api]}\n",
        "definitions:\n  - name: web\n    agent: {argv: [/bin/web]}\n"
        "  - name: api\n    agent: {argv: [/bin/api]}\n",
        "name: web\nagent: {argv: [/bin/web]}\n---\nname: api\nagent: {argv: [/bin/api]}\n---\n",
    ],
)
def test_yaml_holds_a_list_a_definitions_key_or_several_documents(text: str) -> None:
    loaded = load_text("defs.yaml", text)
    assert [d.definition.name for d in loaded] == ["web", "api"]
    assert [d.index for d in loaded] == [1, 2]


def test_the_format_comes_from_the_flag_the_extension_or_the_text() -> None:
    assert detect_format("a.toml", "") == "toml"
    assert detect_format("a.YML", "") == "yaml"
    assert detect_format("a.txt", "", "yaml") == "yaml"
    assert detect_format("-", '[[definitions]]\nname = "web"\n') == "toml"
    assert detect_format("-", "name: web\n") == "yaml"
    with pytest.raises(DefinitionFileError, match=r"^a\.txt: cannot tell TOML from YAML"):
        detect_format("a.txt", "")
    loaded = load_text("-", "- name: web\n  agent: {argv: [x]}\n")
    assert loaded[0].source == "-"


def test_short_forms_of_artifacts_amounts_and_durations() -> None:
    digest = "sha256:" + "ab" * 32
    d = definition_from_dict({**MINIMAL, "artifact": digest, "update": {"max_parallel": 3}})
    assert (d.artifact.digest, d.update.max_parallel) == (digest, "3")
    d = definition_from_dict(
        {**MINIMAL, "artifact": {"name": "web", "version": "2"}, "update": {"canary": "10 %"}}
    )
    assert (d.artifact.name, d.update.canary) == ("web", "10%")
    d = definition_from_dict({**MINIMAL, "update": {"min_healthy_time": "1m30s"}})
    assert d.update.min_healthy_time_seconds == 90
    config = definition_from_dict({"name": "w", "agent": {"argv": ["x"], "config": "raw"}})
    assert config.agent.config == b"raw"


def test_health_may_list_a_heartbeat_and_probes() -> None:
    """A heartbeat goes to agent.health, probes to agent.checks (what the daemon runs)."""
    health = [
        {"kind": "command", "command": ["/bin/check"]},
        {"kind": "heartbeat", "timeout": "20s"},
        {"kind": "none"},
    ]
    a = definition_from_dict({"name": "w", "agent": {"argv": ["x"], "health": health}}).agent
    assert (a.health.kind, a.health.timeout_seconds) == (common_pb2.HEALTH_CHECK_KIND_HEARTBEAT, 20)
    assert [(c.kind, list(c.command)) for c in a.checks] == [
        (common_pb2.HEALTH_CHECK_KIND_COMMAND, ["/bin/check"])
    ]


@pytest.mark.parametrize(
    ("definition", "expected"),
    [
        ({**MINIMAL, "selecter": "a=b"}, "definition 'web': selecter: unknown key; expected one"),
        ({"name": "web", "agent": {"argv": ["x"], "arg": 1}}, "agent.arg: unknown key"),
        ({**MINIMAL, "update": {"parallel": 1}}, "update.parallel: unknown key"),
        ({**MINIMAL, "placement": {"cnt": 1}}, "placement.cnt: unknown key"),
        ({"agent": {"argv": ["x"]}}, "definition #1: name: is required"),
        ({"name": 3, "agent": {"argv": ["x"]}}, "definition #1: name: must be a string, got a"),
        ({"name": "web"}, "definition 'web': agent: is required"),
        ({"name": "web", "agent": {}}, "agent.argv: is required"),
        ({"name": "web", "agent": {"argv": "/bin/web --x"}}, "agent.argv: must be a list"),
        ({**MINIMAL, "selector": "=x"}, "selector: '=x': "),
        ({**MINIMAL, "selector": "a b"}, "selector: 'a b': position "),
        ({"name": "w", "agent": {"argv": ["x"], "version": 1.1}},
         'agent.version: must be a string, got a number (1.1) (quote it: "1.0")'),
        ({"name": "w", "agent": {"argv": ["x"], "restart": "sometimes"}},
         "agent.restart: must be one of always, on-failure, never; got 'sometimes'"),
        ({"name": "w", "agent": {"argv": ["x"], "stop_signal": "SIGNOPE"}},
         "agent.stop_signal: unknown signal 'SIGNOPE'"),
        ({"name": "w", "agent": {"argv": ["x"], "stop_timeout": -1}},
         "agent.stop_timeout: must be a duration >= 0, got -1"),
        ({"name": "w", "agent": {"argv": ["x"], "stop_timeout": True}},
         "agent.stop_timeout: must be seconds"),
        ({"name": "w", "agent": {"argv": ["x"], "max_retries": 1.5}},
         "agent.max_retries: must be a whole number, got a number (1.5)"),
        ({"name": "w", "agent": {"argv": ["x"], "expected_exit_codes": [0, 300]}},
         "agent.expected_exit_codes[1]: must be 0..255, got 300"),
        ({"name": "w", "agent": {"argv": ["x"], "env": {"A": 1}}},
         "agent.env.A: must be a string"),
        ({"name": "w", "agent": {"argv": ["x"], "backoff": {"jitter": 2}}},
         "agent.backoff.jitter: must be a fraction 0..1, got 2"),
        ({"name": "w", "agent": {"argv": ["x"], "health": {"kind": "ping"}}},
         "agent.health.kind: must be one of heartbeat, http, tcp, command, none; got 'ping'"),
        ({"name": "w", "agent": {"argv": ["x"], "health": {"kind": "http"}}},
         "agent.health.url: is required for a http check"),
        ({"name": "w", "agent": {"argv": ["x"], "health": [{"kind": "tcp"}]}},
         "agent.health[0].address: is required for a tcp check"),
        ({"name": "w", "agent": {"argv": ["x"], "checks": [{"kind": "heartbeat"}] * 2,
                                 "health": {"kind": "none"}}},
         "agent.checks[1]: one heartbeat check per agent"),
        ({"name": "w", "agent": {"argv": ["x"], "health": {"timeout": 3}}},
         "agent.health.kind: is required"),
        ({**MINIMAL, "update": {"max_parallel": "150%"}},
         "update.max_parallel: a percentage must be at most 100%, got 150%"),
        ({**MINIMAL, "update": {"canary": "some"}},
         "update.canary: must be a number of nodes or a percentage like 25%"),
        ({**MINIMAL, "update": {"max_parallel": -1}}, "update.max_parallel: must be >= 0"),
        ({**MINIMAL, "update": {"auto_revert": "yes"}},
         "update.auto_revert: must be true or false, got a string ('yes')"),
        ({**MINIMAL, "update": {"healthy_deadline": "soon"}},
         "update.healthy_deadline: 'soon' is not a duration"),
        ({**MINIMAL, "artifact": "web"}, "artifact: give NAME:VERSION"),
        ({**MINIMAL, "artifact": {"name": "web"}}, "artifact: needs name and version, or digest"),
        ({**MINIMAL, "artifact": {"digest": "sha256:xyz"}}, "artifact.digest: must be sha256:"),
        ({**MINIMAL, "agent": "web"}, "agent: must be a table of keys, got a string ('web')"),
    ],
)  # fmt: skip
def test_every_bad_key_or_value_is_named(definition: dict[str, Any], expected: str) -> None:
    message = error(yaml.safe_dump([definition]), "defs.yaml")
    assert message.startswith("defs.yaml: definition "), message
    assert expected in message, message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[definitions]\n", "defs.toml: not valid TOML: "),
        ("title = 'x'\n", "defs.toml: no definitions found (top-level keys: title)"),
        ("", "defs.toml: no definitions found (top-level keys: none)"),
        ("definitions = 3\n", "defs.toml: definitions: must be a list of tables"),
        ("definitions = []\nother = 1\n", "defs.toml: unknown top-level key 'other'"),
        ("definitions = []\n", "defs.toml: the file holds no definitions"),
        ("definitions = [3]\n", "defs.toml: definition #1: definition: must be a table"),
    ],
)
def test_a_broken_file_is_one_line_naming_it(text: str, expected: str) -> None:
    assert error(text).startswith(expected)


def test_a_broken_yaml_file_is_one_line() -> None:
    assert error("- name: [web\n", "d.yml").startswith("d.yml: not valid YAML: ")
    # Line and column first, no "<unicode string>" nor the caret line of PyYAML's text.
    assert error("name: x\n  cmd: [\n", "d.yml") == (
        "d.yml: not valid YAML: line 2, column 6: mapping values are not allowed here"
    )
    assert error('a: "x\n', "d.yml") == (
        "d.yml: not valid YAML: line 2, column 1: found unexpected end of stream"
        " (while scanning a quoted scalar at line 1, column 4)"
    )
    assert error("42\n", "d.yml") == "d.yml: expected definition tables, got int"


def test_a_name_twice_is_refused_across_files() -> None:
    first = load_text("a.toml", '[[definitions]]\nname = "web"\nagent = {argv = ["x"]}\n')
    second = load_text("b.yaml", "name: web\nagent: {argv: [y]}\n")
    check_unique(first)
    with pytest.raises(DefinitionFileError, match=r"^b\.yaml: definition 'web' is defined twice"):
        check_unique(first + second)


def test_the_rendering_reads_back_to_the_same_message() -> None:
    """definitions show / history print what apply reads: the round trip is exact."""
    for loaded in load_text("defs.toml", FULL_TOML):
        d = loaded.definition
        assert definition_from_dict(definition_to_dict(d)) == d
        assert definition_from_dict(yaml.safe_load(render(d))) == d
    for config in ('{"b":1,"a":2}', "[1, 2]", "plain", '"s"', '{"a":{"b":[1,2]}}'):
        d = definition_from_dict({"name": "w", "agent": {"argv": ["x"], "config": config}})
        assert definition_from_dict(yaml.safe_load(render(d))) == d, config
    table = definition_from_dict(MINIMAL | {"agent": {"argv": ["x"], "config": {"b": 1}}})
    assert definition_to_dict(table)["agent"]["config"] == {"b": 1}  # diffs show the key
    minimal = definition_to_dict(definition_from_dict(MINIMAL))
    assert minimal == {"name": "web", "agent": {"argv": ["/bin/web"]}}


def test_rendering_what_the_manager_stored() -> None:
    """The manager stores agent.id = name: the rendering leaves it out, as the file did."""
    d = definition_from_dict({**MINIMAL, "update": {"max_parallel": 2}})
    d.agent.id = "web"
    rendered = definition_to_dict(d)
    assert "id" not in rendered["agent"]
    assert rendered["update"] == {"max_parallel": 2}


def rollout(state: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": 7, "name": "web", "target_revision": 3, "previous_revision": 2, "state": state,
        "reason": "", "batch": 1, "reverted_from": 0, "created_at": "2026-01-01T00:00:00.000Z",
        "created_at_ms": 1_767_225_600_000, "ended_at": None, "actor": "operator/alice",
        "message": "ship", "pending": 0, "updating": 0, "done": 0, "failed": 0, "offline": 0,
        "total": 0, "nodes": [],
        "policy": {"max_parallel": "2", "canary": None, "auto_promote": False,
                   "auto_revert": True, "min_healthy_time_seconds": 10.0,
                   "healthy_deadline_seconds": None, "progress_deadline_seconds": None,
                   "pause_between_batches_seconds": 0.0},
    }  # fmt: skip
    return {**base, **fields}


def node(node_id: str, phase: str, batch: int, **fields: Any) -> dict[str, Any]:
    return {"node_id": node_id, "phase": phase, "batch": batch, "offline": False, "reason": "",
            **fields}  # fmt: skip


def test_rollout_exit_codes() -> None:
    """0 live or successful; 3 failed, 4 reverted, 5 cancelled (documented in rollouts.md)."""
    live = ("PENDING", "RUNNING", "PAUSED", "AWAITING_PROMOTION", "REVERTING", "SUCCESSFUL")
    assert {exit_code(s) for s in live} == {0}
    assert [exit_code(s) for s in ("FAILED", "REVERTED", "CANCELLED")] == [3, 4, 5]


def test_rollout_status_names_batches_pending_offline_and_failed_nodes() -> None:
    nodes = [
        node("n1", "DONE", 1),
        node("n2", "FAILED", 1, reason="FATAL: exited with code 1"),
        node("n3", "UPDATING", 2),
        node("n4", "PENDING", -1, offline=True),
        node("n5", "PENDING", -1),
    ]
    view = rollout(
        "RUNNING", batch=2, nodes=nodes, done=1, failed=1, updating=1, pending=2, offline=1,
        total=5,
    )  # fmt: skip
    lines = status_lines(view, now_ms=view["created_at_ms"] + 65_000)
    assert lines[0] == "Rollout 7 of web: revision 2 -> 3"
    assert lines[2] == "Started:  2026-01-01T00:00:00.000Z (1m5s ago) by operator/alice: ship"
    assert lines[3] == "Policy:   max_parallel 2, min_healthy_time 10s, auto_revert"
    assert lines[4] == "Progress: 1/5 done, 1 updating, 2 pending (1 offline), 1 failed"
    assert "  batch 1: 1/2 done, 1 failed: n1, n2" in lines
    assert "  batch 2 (current): 0/1 done, 1 updating: n3" in lines
    assert "  pending: 2, 1 offline (they converge when they return): n4 (offline), n5" in lines
    assert "  failed: n2: FATAL: exited with code 1" in lines
    assert progress_line(view) == (
        "RUNNING batch 2, 1/5 done, 1 updating, 2 pending (1 offline), 1 failed"
    )
    assert progress_line(rollout("PENDING", batch=-1)) == "PENDING"
    reverted = rollout("REVERTED", target_revision=2, reverted_from=3, reason="n2 failed")
    assert status_lines(reverted, now_ms=0)[0] == "Rollout 7 of web: revision 3 -> back to 2"
    # A revert moves only the nodes the failed revision reached; the rest are counted and named.
    reverted = rollout(
        "REVERTED", target_revision=2, reverted_from=3, reason="n2 failed", total=2, done=2,
        nodes=[node("n1", "DONE", 1), node("n2", "DONE", -1)],
    )  # fmt: skip
    lines = status_lines(reverted, now_ms=0)
    assert "Progress: 2/2 done" in lines
    assert "  batch 1: 1/1 done: n1" in lines
    assert "  unchanged (already at revision 2): 1: n2" in lines


def test_the_example_definition_loads() -> None:
    """configs/definitions/probe.toml (what `make demo` applies) is a valid file."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "configs" / "definitions" / "probe.toml"
    (loaded,) = load_text(str(path), path.read_text())
    d = loaded.definition
    assert (d.name, list(d.agent.argv)) == ("probe", ["fleet-agent", "run", "probe"])
    assert d.agent.health.kind == common_pb2.HEALTH_CHECK_KIND_HEARTBEAT
    assert (d.update.max_parallel, d.update.auto_revert) == ("1", True)
