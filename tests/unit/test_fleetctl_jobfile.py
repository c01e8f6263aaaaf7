"""Job files (TOML/YAML) and `run` flags to one JobSpec; every bad input is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleet import selectors
from fleet.v1 import jobs_pb2
from fleetctl.app import app, hoist_global_options
from fleetctl.jobfile import JobFileError, JobFlags, JobSpecError, build_spec, load_job

FULL_TOML = """\
name = "apt-upgrade"
selector = "role=web,env in (prod)"
max_concurrency = "25%"
max_errors = 2
canary = 1
timeout = "10m"
delivery_timeout = 120
lock = "apt"

[[steps]]
name = "update"
argv = ["apt-get", "update"]
env = { DEBIAN_FRONTEND = "noninteractive" }
cwd = "/"
user = "root"
timeout = "5m"

[[steps]]
name = "report"
script = "dpkg -l | wc -l"
interpreter = ["/bin/sh", "-eu"]
when = "always"

[[steps]]
name = "alert"
script = "echo failed"
interpreter = "/bin/bash -eu"
when = "on_failure"
"""

FULL_YAML = """\
name: apt-upgrade
selector: role=web,env in (prod)
max_concurrency: 25%
max_errors: 2
canary: 1
timeout: 10m
delivery_timeout: 120
lock: apt
steps:
  - name: update
    argv: [apt-get, update]
    env: {DEBIAN_FRONTEND: noninteractive}
    cwd: /
    user: root
    timeout: 5m
  - name: report
    script: dpkg -l | wc -l
    interpreter: [/bin/sh, -eu]
    when: always
  - name: alert
    script: echo failed
    interpreter: /bin/bash -eu
    when: on_failure
"""


def test_full_toml_file_becomes_the_spec() -> None:
    """Every key of a job file lands in its JobSpec field, durations in seconds."""
    spec = load_job("job.toml", FULL_TOML)
    assert spec.name == "apt-upgrade"
    assert str(selectors.from_proto(spec.selector)) == "env in (prod),role=web"
    assert list(spec.node_ids) == []
    assert (spec.max_concurrency, spec.max_errors, spec.canary) == ("25%", 2, 1)
    assert spec.timeout_seconds == 600
    assert spec.delivery_timeout_seconds == 120
    assert spec.lock == "apt"
    update, report, alert = spec.steps
    assert update.name == "update"
    assert list(update.command.argv) == ["apt-get", "update"]
    assert dict(update.command.env) == {"DEBIAN_FRONTEND": "noninteractive"}
    assert (update.command.cwd, update.command.user) == ("/", "root")
    assert update.command.timeout_seconds == 300
    assert update.when == jobs_pb2.STEP_WHEN_UNSPECIFIED  # on_success, the default
    assert report.command.script == "dpkg -l | wc -l"
    assert list(report.command.interpreter) == ["/bin/sh", "-eu"]
    assert report.when == jobs_pb2.STEP_WHEN_ALWAYS
    assert list(alert.command.interpreter) == ["/bin/bash", "-eu"]  # a string is split
    assert alert.when == jobs_pb2.STEP_WHEN_ON_FAILURE


def test_yaml_file_means_the_same_as_toml() -> None:
    """The same job in YAML gives the same message."""
    assert load_job("job.yaml", FULL_YAML) == load_job("job.toml", FULL_TOML)
    assert load_job("-", FULL_YAML) == load_job("-", FULL_TOML)  # stdin: by content


def test_timeouts_left_out_stay_unset() -> None:
    """A file without timeouts leaves them to the manager's defaults (unset, not 0)."""
    spec = load_job("j.toml", 'nodes = ["a"]\n[[steps]]\nargv = ["true"]\n')
    assert not spec.HasField("timeout_seconds")
    assert not spec.HasField("delivery_timeout_seconds")
    assert list(spec.node_ids) == ["a"]
    assert not spec.HasField("selector")


STEP = '[[steps]]\nargv = ["true"]\n'


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("j.json", STEP, "j.json: cannot tell TOML from YAML by the name"),
        ("j.toml", "steps = [", "j.toml: not valid TOML"),
        ("j.yaml", "steps: [", "j.yaml: not valid YAML"),
        (
            "j.yaml",
            "name: x\n  steps: [\n",
            "j.yaml: not valid YAML: line 2, column 8: mapping values are not allowed here",
        ),
        (
            "j.yaml",
            "- 1\n- 2\n",
            "j.yaml: expected the job's keys (name, selector, steps, ...), got a list",
        ),
        (
            "j.yaml",
            "name: a\n---\nname: b\n",
            "j.yaml: holds 2 YAML documents; a job file holds one job",
        ),
        (
            "j.toml",
            'name = "x"\n',
            "j.toml: steps: is required: at least one step ([[steps]] in TOML)",
        ),
        (
            "j.toml",
            "steps = []\n",
            "j.toml:1: steps: must be a non-empty list of step tables, got a list",
        ),
        ("j.toml", 'nmae = "x"\n' + STEP, "j.toml:1: nmae: unknown key; expected one of"),
        (
            "j.toml",
            'selector = "env in ("\n' + STEP,
            "j.toml:1: selector: invalid selector 'env in (': position 8",
        ),
        (
            "j.toml",
            'selector = "a=b"\nnodes = ["n1"]\n' + STEP,
            "j.toml:2: nodes: give selector or nodes, not both",
        ),
        ("j.toml", 'nodes = ["n1", "n1"]\n' + STEP, "j.toml:1: nodes: names 'n1' twice"),
        ("j.toml", 'nodes = [""]\n' + STEP, "j.toml:1: nodes: must list node ids (non-empty)"),
        (
            "j.toml",
            "max_concurrency = 0\n" + STEP,
            "j.toml:1: max_concurrency: must be a number of targets (>= 1) or a percentage"
            " like 25%, got a number (0)",
        ),
        (
            "j.toml",
            'max_concurrency = "150%"\n' + STEP,
            "j.toml:1: max_concurrency: must be a number of targets",
        ),
        (
            "j.toml",
            "max_errors = -1\n" + STEP,
            "j.toml:1: max_errors: must be 0..2147483647, got -1",
        ),
        (
            "j.toml",
            'canary = "one"\n' + STEP,
            "j.toml:1: canary: must be a whole number, got a string ('one')",
        ),
        (
            "j.toml",
            'timeout = "0s"\n' + STEP,
            "j.toml:1: timeout: must be a duration > 0, got '0s'",
        ),
        ("j.toml", 'timeout = "soon"\n' + STEP, "j.toml:1: timeout: 'soon' is not a duration"),
        (
            "j.toml",
            "delivery_timeout = -5\n" + STEP,
            "j.toml:1: delivery_timeout: must be a duration >= 0, got -5",
        ),
        ("j.toml", "lock = 3\n" + STEP, "j.toml:1: lock: must be a string, got a number (3)"),
        (
            "j.toml",
            '[[steps]]\nname = "x"\n',
            "j.toml:1: steps[0]: needs argv (a program and its arguments) or script and"
            " interpreter",
        ),
        (
            "j.toml",
            STEP + "[[steps]]\nargv = []\n",
            "j.toml:4: steps[1].argv: must name a program (an empty argv runs nothing)",
        ),
        (
            "j.toml",
            STEP + '[[steps]]\nargv = [""]\n',
            "j.toml:4: steps[1].argv: must name a program",
        ),
        (
            "j.toml",
            '[[steps]]\nargv = ["a"]\nscript = "b"\n',
            "j.toml:3: steps[0].script: give argv or script (with interpreter), not both",
        ),
        (
            "j.toml",
            '[[steps]]\nscript = "echo"\n',
            "j.toml:1: steps[0].interpreter: is required with script, e.g. interpreter ="
            ' ["/bin/sh", "-eu"]',
        ),
        (
            "j.toml",
            '[[steps]]\nscript = "  "\ninterpreter = ["sh"]\n',
            "j.toml:2: steps[0].script: is empty",
        ),
        (
            "j.toml",
            '[[steps]]\nscript = "x"\ninterpreter = []\n',
            "j.toml:3: steps[0].interpreter: must name a program",
        ),
        (
            "j.toml",
            '[[steps]]\nargv = ["a"]\ninterpreter = ["sh"]\n',
            "j.toml:3: steps[0].interpreter: goes with script, not argv",
        ),
        (
            "j.toml",
            STEP + '\n[[steps]]\nargv = ["b"]\nwhen = "sometimes"\n',
            "j.toml:6: steps[1].when: must be one of on_success, on_failure, always;"
            " got 'sometimes'",
        ),
        (
            "j.toml",
            '[[steps]]\nargv = ["a"]\ntimeout = 0\n',
            "j.toml:3: steps[0].timeout: must be a duration > 0, got 0",
        ),
        (
            "j.toml",
            '[[steps]]\nargv = ["a"]\nuser = 0\n',
            "j.toml:3: steps[0].user: must be a string, got a number (0)",
        ),
        (
            "j.toml",
            '[[steps]]\nargv = ["a"]\nenv = { "A=B" = "c" }\n',
            "j.toml:3: steps[0].env.A=B: an environment variable name must be non-empty and"
            " hold no '='",
        ),
        (
            "j.toml",
            '[[steps]]\nargv = ["a"]\n[steps.env]\nX = 1\n',
            "j.toml:3: steps[0].env.X: must be a string, got a number (1)",
        ),
        (
            "j.toml",
            '[[steps]]\nargv = ["a"]\nretries = 3\n',
            "j.toml:3: steps[0].retries: unknown key; expected one of argv, cwd, env",
        ),
        (
            "j.toml",
            '[[steps]]\nname = "a"\nargv = ["a"]\n[[steps]]\nname = "a"\nargv = ["b"]\n',
            "j.toml:5: steps[1].name: 'a' is also steps[0]'s name",
        ),
        (
            "j.yaml",
            "steps:\n  - argv: [a]\n  - argv: [b]\n    when: never\n",
            "j.yaml:4: steps[1].when: must be one of on_success",
        ),
        ("j.yaml", "steps:\n  - name: x\n", "j.yaml:2: steps[0]: needs argv"),
        (
            "j.yaml",
            "max_errors: many\nsteps:\n  - argv: [a]\n",
            "j.yaml:1: max_errors: must be a whole number, got a string ('many')",
        ),
        (
            "j.yaml",
            "steps:\n  - argv: [a]\n    env: {A: 1}\n",
            "j.yaml:3: steps[0].env.A: must be a string, got a number (1)",
        ),
    ],
)
def test_bad_job_files_name_file_line_and_key(name: str, text: str, message: str) -> None:
    """Each problem is one JobFileError naming the file, the line where it can, and the key."""
    with pytest.raises(JobFileError) as caught:
        load_job(name, text)
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


def test_command_flags_build_a_one_step_job() -> None:
    """`run -l SEL [flags] -- CMD ARGS` is one step with the argv, and the flags' values."""
    spec = build_spec(
        JobFlags(
            command=("systemctl", "restart", "nginx"),
            selector="role=web",
            max_concurrency="10",
            max_errors=3,
            canary=2,
            timeout="10m",
            delivery_timeout="1m30s",
            lock="svc",
            user="root",
            env=("A=1", "B=x=y"),
            cwd="/tmp",
            name="restart",
        )
    )
    assert str(selectors.from_proto(spec.selector)) == "role=web"
    (step,) = spec.steps
    assert list(step.command.argv) == ["systemctl", "restart", "nginx"]
    assert (step.command.user, step.command.cwd) == ("root", "/tmp")
    assert dict(step.command.env) == {"A": "1", "B": "x=y"}
    assert (spec.max_concurrency, spec.max_errors, spec.canary) == ("10", 3, 2)
    assert (spec.timeout_seconds, spec.delivery_timeout_seconds) == (600, 90)
    assert (spec.lock, spec.name) == ("svc", "restart")


def test_flags_override_the_file() -> None:
    """Flags win over the file; --node replaces its selector; --user/--cwd/--env reach all steps."""
    file_spec = load_job("job.toml", FULL_TOML)
    spec = build_spec(
        JobFlags(
            nodes=("web-2", "web-1", "web-2"),
            max_errors=0,
            timeout="30s",
            user="ops",
            env=("DEBIAN_FRONTEND=readline", "X=1"),
            name="again",
        ),
        file_spec,
    )
    assert not spec.HasField("selector")
    assert list(spec.node_ids) == ["web-2", "web-1"]  # once each, as given
    assert (spec.max_errors, spec.timeout_seconds, spec.name) == (0, 30, "again")
    assert spec.max_concurrency == "25%"  # not given: the file's
    assert [s.command.user for s in spec.steps] == ["ops", "ops", "ops"]
    assert dict(spec.steps[0].command.env) == {"DEBIAN_FRONTEND": "readline", "X": "1"}
    assert spec.steps[0].command.cwd == "/"  # --cwd not given
    assert file_spec.max_errors == 2  # the file's message is not changed


def test_selector_flag_replaces_the_files_nodes() -> None:
    """-l over a file with nodes: the selector, and no node list."""
    file_spec = load_job("j.toml", 'nodes = ["a", "b"]\n' + STEP)
    spec = build_spec(JobFlags(selector="env=prod"), file_spec)
    assert list(spec.node_ids) == []
    assert str(selectors.from_proto(spec.selector)) == "env=prod"


@pytest.mark.parametrize(
    ("flags", "with_file", "message"),
    [
        (JobFlags(selector="a=b"), False, "nothing to run: give the command after the options"),
        (
            JobFlags(command=("x",)),
            False,
            "say where: -l SELECTOR for the nodes it matches, or --node NODE",
        ),
        (
            JobFlags(),
            True,
            "say where: -l SELECTOR for the nodes it matches, or --node NODE (repeatable)"
            " (or selector / nodes in the file)",
        ),
        (
            JobFlags(command=("x",), nodes=("a",)),
            True,
            "give a command or -f FILE, not both (got -f and 'x')",
        ),
        (JobFlags(command=("",), nodes=("a",)), False, "the command's program is empty"),
        (
            JobFlags(command=("x",), selector="a=b", nodes=("a",)),
            False,
            "give -l SELECTOR or --node NODE, not both",
        ),
        (
            JobFlags(command=("x",), selector="a in ("),
            False,
            "invalid selector 'a in (': position 6",
        ),
        (JobFlags(command=("x",), nodes=("",)), False, "--node: a node id must not be empty"),
        (
            JobFlags(command=("x",), nodes=("a",), max_concurrency="0"),
            False,
            "--max-concurrency '0': must be a number of targets (>= 1)",
        ),
        (
            JobFlags(command=("x",), nodes=("a",), max_concurrency="ten"),
            False,
            "--max-concurrency 'ten'",
        ),
        (
            JobFlags(command=("x",), nodes=("a",), max_errors=-1),
            False,
            "--max-errors -1: must be >= 0",
        ),
        (JobFlags(command=("x",), nodes=("a",), canary=-1), False, "--canary -1: must be >= 0"),
        (
            JobFlags(command=("x",), nodes=("a",), timeout="0s"),
            False,
            "--timeout '0s': must be a duration > 0",
        ),
        (
            JobFlags(command=("x",), nodes=("a",), timeout="10"),
            False,
            "--timeout: '10' is not a duration",
        ),
        (
            JobFlags(command=("x",), nodes=("a",), delivery_timeout="x"),
            False,
            "--delivery-timeout: 'x' is not a duration",
        ),
        (
            JobFlags(command=("x",), nodes=("a",), env=("NOEQUALS",)),
            False,
            "--env 'NOEQUALS': use NAME=VALUE",
        ),
        (JobFlags(command=("x",), nodes=("a",), env=("=v",)), False, "--env '=v': use NAME=VALUE"),
    ],
)
def test_bad_flags_name_the_flag(flags: JobFlags, with_file: bool, message: str) -> None:
    """A bad flag (or a missing command or target) is one JobSpecError naming it."""
    file_spec = load_job("j.toml", STEP) if with_file else None
    with pytest.raises(JobSpecError) as caught:
        build_spec(flags, file_spec)
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # run's --timeout is the job's: not hoisted; a global option before it still is.
        (
            ["run", "-l", "a=b", "--timeout", "10m", "-o", "json", "--", "ls"],
            ["-o", "json", "run", "-l", "a=b", "--timeout", "10m", "--", "ls"],
        ),
        # The job's command is left alone, options and all (grep -m 1 is not --manager).
        (
            ["run", "--node", "n1", "grep", "-m", "1", "x", "-o", "json"],
            ["run", "--node", "n1", "grep", "-m", "1", "x", "-o", "json"],
        ),
        (
            ["run", "-fjob.toml", "--timeout=5m", "-m", "h:1"],
            ["-m", "h:1", "run", "-fjob.toml", "--timeout=5m"],
        ),
        (
            ["--timeout", "3", "run", "-n", "a", "true"],
            ["--timeout", "3", "run", "-n", "a", "true"],
        ),
        # Other commands keep hoisting --timeout as the global one.
        (["jobs", "list", "--timeout", "3"], ["--timeout", "3", "jobs", "list"]),
    ],
)
def test_hoisting_leaves_run_options_and_command_alone(
    argv: list[str], expected: list[str]
) -> None:
    """Global options after `run` are hoisted, but not run's own nor the job's command."""
    assert hoist_global_options(argv) == expected


def test_example_job_file_is_valid() -> None:
    """configs/jobs/report.toml (what `make demo` runs) is a valid job file with three steps."""
    path = Path(__file__).resolve().parents[2] / "configs" / "jobs" / "report.toml"
    spec = load_job(str(path), path.read_text())
    assert [s.name for s in spec.steps] == ["who", "disk", "tell"]
    assert spec.steps[2].when == jobs_pb2.STEP_WHEN_ON_FAILURE
    assert str(selectors.from_proto(spec.selector)) == "tier=demo"


def test_docs_job_file_example_is_valid() -> None:
    """The TOML job file shown in docs/jobs.md parses as a job."""
    page = Path(__file__).resolve().parents[2] / "docs" / "jobs.md"
    blocks = page.read_text().split("```toml\n")[1:]
    (example,) = [b.split("```", 1)[0] for b in blocks if "[[steps]]" in b]
    spec = load_job("jobs.md.toml", example)
    assert [s.name for s in spec.steps] == ["update", "upgrade", "report"]
    assert spec.lock == "apt"


def test_run_names_a_job_file_it_cannot_read(tmp_path: Path) -> None:
    """A missing or unreadable -f file is said in our words (no errno, the path once), exit 2."""
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe")
    cases = {
        str(tmp_path / "gone.toml"): f"{tmp_path / 'gone.toml'}: no such file",
        str(tmp_path): f"{tmp_path}: cannot read the job file: Is a directory",
        str(binary): f"{binary}: cannot read the job file: not UTF-8 text",
    }
    env = {"XDG_CONFIG_HOME": str(tmp_path), "FLEETCTL_CONFIG": None, "COLUMNS": "200"}
    for path, message in cases.items():
        result = CliRunner().invoke(app, ["run", "-f", path, "-l", "a=b"], env=env)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == f"fleetctl: error: {message}"
