"""Agent spec validation (one-line errors naming the field) and the restart hash.

`AgentSpec.validate` (fleet.agentspec) checks what holds anywhere; the daemon's
`validate_here` adds what only the host can check (program, user, directory).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

from daemon.supervisor.spec import (
    AgentSpec,
    BackoffSpec,
    HealthSpec,
    SpecError,
    signal_number,
    spec_from_dict,
    spec_to_dict,
    validate_here,
)
from fleet.agentspec import spec_from_proto, spec_to_proto
from fleet.artifacts import ArtifactRef
from fleet.config import load_config
from fleet.errors import ConfigError, InvalidArgument
from fleet.v1 import common_pb2


@dataclasses.dataclass(frozen=True)
class Daemon:
    """The part of the daemon's config that holds agents."""

    agents: tuple[AgentSpec, ...] = ()


def _spec(**kw: object) -> AgentSpec:
    base: dict[str, object] = {"id": "web-1", "argv": (sys.executable, "-c", "pass")}
    base.update(kw)
    return AgentSpec(**base)  # type: ignore[arg-type]


def test_valid_spec_passes() -> None:
    """A plain spec with argv[0] found in PATH validates."""
    validate_here(_spec(argv=("sleep", "1"), labels={"tier": "web"}))


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"argv": ()}, "agents[web-1].argv: must not be empty"),
        ({"argv": ("no-such-program-xyz",)}, "'no-such-program-xyz' not found"),
        ({"argv": ("./missing.sh",)}, "not found or not executable"),
        ({"user": "no-such-user-xyz"}, "agents[web-1].user: unknown user 'no-such-user-xyz'"),
        ({"cwd": "relative/does/not/exist"}, "agents[web-1].cwd: directory 'relative/does"),
        ({"cwd": "/no/such/dir"}, "does not exist"),
        ({"user": "no\x00body"}, "agents[web-1].user: must not contain NUL bytes"),
        ({"stop_timeout": -1.0}, "agents[web-1].stop_timeout: must be 0..604800 seconds"),
        ({"stop_timeout": float("inf")}, "agents[web-1].stop_timeout: must be 0..604800 seconds"),
        ({"start_secs": -0.5}, "agents[web-1].start_secs: must be 0..604800 seconds"),
        ({"start_secs": float("nan")}, "agents[web-1].start_secs: must be 0..604800 seconds"),
        ({"backoff": BackoffSpec(max=1e300)}, "backoff.max: must be 0..604800 seconds"),
        ({"stop_signal": "SIGNOPE"}, "agents[web-1].stop_signal: unknown signal 'SIGNOPE'"),
        ({"restart": "sometimes"}, "agents[web-1].restart: must be one of"),
        ({"max_retries": -1}, "max_retries: must be >= 0"),
        ({"backoff": BackoffSpec(multiplier=0.5)}, "backoff.multiplier: must be 1..100"),
        ({"backoff": BackoffSpec(jitter=2.0)}, "backoff.jitter: must be a fraction"),
        ({"health": HealthSpec(kind="heartbeat", timeout=0)}, "health.timeout: must be > 0"),
        ({"labels": {"bad key!": "x"}}, "agents[web-1].labels: invalid label key"),
        ({"expected_exit_codes": (300,)}, "exit codes must be 0..255"),
        ({"env": {"A=B": "x"}}, "agents[web-1].env: invalid environment variable"),
        ({"id": "../etc"}, "agent id '../etc' must be"),
        ({"id": ""}, "agent id '' must be"),
    ],
)
def test_bad_specs_are_refused_with_one_line(kw: dict[str, object], needle: str) -> None:
    """Each bad field gives a one-line error naming the agent and the field."""
    with pytest.raises(SpecError) as info:
        validate_here(_spec(**kw))
    message = str(info.value)
    assert needle in message
    assert "\n" not in message
    assert isinstance(info.value, InvalidArgument)
    assert isinstance(info.value, ValueError)


def test_relative_argv_resolves_against_cwd(tmp_path: Path) -> None:
    """'./run.sh' is looked up in cwd, as the child will see it."""
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    validate_here(_spec(argv=("./run.sh",), cwd=str(tmp_path)))
    script.chmod(0o644)
    with pytest.raises(SpecError, match="not found or not executable"):
        validate_here(_spec(argv=("./run.sh",), cwd=str(tmp_path)))


@pytest.mark.parametrize(
    "kw",
    [
        {"argv": ("no-such-program-xyz",)},
        {"user": "no-such-user-xyz"},
        {"cwd": "/no/such/dir"},
    ],
)
def test_host_independent_validation_leaves_host_facts_to_the_host(kw: dict[str, object]) -> None:
    """The manager's check passes what only a node can judge; the node's check refuses it."""
    spec = _spec(**kw)
    spec.validate()
    with pytest.raises(SpecError):
        validate_here(spec)


def test_host_independent_validation_still_refuses_bad_values() -> None:
    """A bad signal or a negative timeout is refused anywhere, before any host looks."""
    with pytest.raises(SpecError, match=r"agents\[web-1\]\.stop_signal: unknown signal"):
        _spec(stop_signal="SIGNOPE").validate()
    with pytest.raises(SpecError, match=r"agents\[web-1\]\.stop_timeout"):
        _spec(stop_timeout=-1.0).validate()


def test_signal_names() -> None:
    """Signals are accepted as SIGTERM, TERM or a number."""
    assert signal_number("SIGTERM") == signal_number("term") == signal_number("15")
    with pytest.raises(ValueError, match="unknown signal"):
        signal_number("999")


def test_process_hash_changes_only_for_restart_relevant_fields() -> None:
    """argv/env/cwd/user/version change the hash; policy, labels and config do not."""
    base = _spec()
    same = [
        _spec(config='{"x": 1}'),
        _spec(labels={"a": "b"}),
        _spec(stop_timeout=3.0, restart="always", backoff=BackoffSpec(initial=9)),
    ]
    for other in same:
        assert other.process_hash() == base.process_hash()
    different = [
        _spec(argv=(sys.executable, "-c", "pass", "x")),
        _spec(env={"A": "1"}),
        _spec(cwd=os.getcwd()),
        _spec(version="2"),
    ]
    for other in different:
        assert other.process_hash() != base.process_hash()


def test_round_trip_through_dict() -> None:
    """spec_from_dict(spec_to_dict(s)) == s, so state files keep every field."""
    spec = _spec(
        env={"A": "1"},
        backoff=BackoffSpec(initial=0.5),
        health=HealthSpec(kind="heartbeat", timeout=3),
        expected_exit_codes=(0, 2),
        labels={"x": "y"},
    )
    assert spec_from_dict(spec_to_dict(spec)) == spec


REF = ArtifactRef("web", "1.4.2", "sha256:" + "ab" * 32, 1234)


def test_an_artifact_travels_with_the_spec_and_is_part_of_the_restart_hash() -> None:
    """Message, state-file dict and back; a new digest restarts, no artifact keeps old hashes."""
    spec = _spec(artifact=REF, argv=("{artifact}/bin/web",))
    msg = spec_to_proto(spec)
    assert msg.artifact == common_pb2.ArtifactRef(
        name="web", version="1.4.2", digest=REF.digest, size_bytes=1234
    )
    assert spec_from_proto(msg) == spec
    assert spec_from_dict(spec_to_dict(spec)) == spec
    assert spec_from_proto(spec_to_proto(_spec())).artifact is None
    assert not spec_to_proto(_spec()).HasField("artifact")
    other = dataclasses.replace(REF, digest="sha256:" + "cd" * 32)
    assert spec.process_hash() != dataclasses.replace(spec, artifact=other).process_hash()
    assert spec.process_hash() == dataclasses.replace(spec, artifact=dataclasses.replace(
        REF, version="renamed")).process_hash()  # fmt: skip
    # The hash of a spec without an artifact is what it was before artifacts existed.
    assert _spec().process_hash() == _spec(artifact=None).process_hash()


@pytest.mark.parametrize(
    ("ref", "needle"),
    [
        (ArtifactRef("-web", "1", "", 0), "agents[web-1].artifact.name: artifact name '-web'"),
        (ArtifactRef("web", "1 0", "", 0), "agents[web-1].artifact.version: artifact version"),
        (ArtifactRef("web", "1", "md5:x", 0), "agents[web-1].artifact.digest: 'md5:x' is not"),
        (ArtifactRef("web", "1", "", -1), "agents[web-1].artifact.size_bytes: must be >= 0"),
    ],
)
def test_a_malformed_artifact_reference_is_refused_naming_the_field(
    ref: ArtifactRef, needle: str
) -> None:
    """What is set must be well formed; name and version alone (a definition's) are valid."""
    _spec(artifact=ArtifactRef("web", "1", "", 0)).validate()
    _spec(artifact=ArtifactRef("", "", REF.digest, 0)).validate()
    with pytest.raises(SpecError) as info:
        _spec(artifact=ref).validate()
    assert needle in str(info.value)


def test_agents_load_from_toml_with_fleet_config(tmp_path: Path) -> None:
    """[[agents]] tables load into AgentSpec via load_config; a bad one names file and field."""
    good = tmp_path / "good.toml"
    good.write_text(
        '[[agents]]\nid = "web"\nargv = ["sleep", "100"]\nrestart = "always"\n'
        'backoff = {initial = 0.5, max = 3.0}\nlabels = {tier = "web"}\n'
        "expected_exit_codes = [0, 2]\n"
    )
    (spec,) = load_config(Daemon, good, env_prefix="T_", environ={}).agents
    assert spec.argv == ("sleep", "100")
    assert spec.backoff == BackoffSpec(initial=0.5, max=3.0)
    assert spec.expected_exit_codes == (0, 2)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[agents]]\nid = "web"\nargv = ["sleep"]\nstop_timeout = -1.0\n')
    with pytest.raises(
        ConfigError, match=r"bad.toml: .*agents\[web\]\.stop_timeout: must be 0\.\.604800"
    ):
        load_config(Daemon, bad, env_prefix="T_", environ={})
