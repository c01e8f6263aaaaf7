"""Protobuf <-> daemon values: pushed specs, defaults for unset fields, clear errors."""

from __future__ import annotations

import os

import pytest

from daemon.convert import host_metrics, resource_metrics, shown_spec
from daemon.sampler import ResourceSample, Sampler
from daemon.supervisor.spec import AgentSpec, BackoffSpec, HealthSpec
from fleet.agentspec import spec_from_proto, spec_to_proto, specs_from_proto
from fleet.errors import InvalidArgument
from fleet.v1 import common_pb2


def test_a_full_spec_survives_the_round_trip() -> None:
    """Every field of an AgentSpec comes back unchanged from its message form."""
    spec = AgentSpec(
        id="web",
        argv=("/bin/sleep", "10"),
        type="process",
        version="1.2",
        env={"A": "1"},
        cwd="/",
        user="",
        autostart=False,
        restart="always",
        expected_exit_codes=(0, 3),
        start_secs=0.5,
        backoff=BackoffSpec(initial=2.0, multiplier=3.0, max=30.0, jitter=0.1),
        max_retries=7,
        stop_signal="SIGINT",
        stop_timeout=4.0,
        log_max_bytes=1024,
        log_backups=2,
        labels={"tier": "web"},
        health=HealthSpec(kind="heartbeat", timeout=12.0),
        config='{"k": "v"}',
        revision=4,
    )
    assert spec_from_proto(spec_to_proto(spec)) == spec


def test_unset_fields_take_the_toml_defaults() -> None:
    """A message with only id and argv gets the spec defaults where zero is not a usable value."""
    spec = spec_from_proto(common_pb2.AgentSpec(id="a", argv=["/bin/true"], autostart=True))
    default = AgentSpec(id="a", argv=("/bin/true",))
    assert spec.restart == "on-failure"
    assert spec.expected_exit_codes == default.expected_exit_codes
    assert spec.stop_signal == "SIGTERM"
    assert spec.stop_timeout == default.stop_timeout
    assert spec.log_max_bytes == default.log_max_bytes
    assert spec.backoff.initial == default.backoff.initial
    assert spec.health == HealthSpec()
    assert spec.start_secs == 0.0  # taken literally: 0 is a valid setting


def test_non_utf8_config_is_refused_naming_the_agent() -> None:
    """Config bytes that are not UTF-8 are INVALID_ARGUMENT naming agents[i] and the field."""
    msgs = [
        common_pb2.AgentSpec(id="ok", argv=["x"]),
        common_pb2.AgentSpec(id="bad", argv=["x"], config=b"\xff\xfe"),
    ]
    with pytest.raises(InvalidArgument, match=r"agents\[1\] \(bad\)\.config: is not UTF-8"):
        specs_from_proto(msgs)


def test_unknown_enum_values_are_refused() -> None:
    """A restart policy number this daemon does not know is INVALID_ARGUMENT, not a default."""
    msg = common_pb2.AgentSpec(id="a", argv=["x"])
    msg.restart = 42  # type: ignore[assignment]  # what a newer manager might send
    with pytest.raises(InvalidArgument, match=r"agent\.restart: unknown restart policy 42"):
        spec_from_proto(msg)


def test_host_cpu_metrics_carry_the_usable_cores_and_agent_ones_do_not() -> None:
    """Placement reads a node's capacity from its host "cpu" metric's cores."""
    sampler = Sampler(disk_path="/")
    host = {m.type: m for m in host_metrics(sampler.host_sample(1_000))}
    assert host["cpu"].values["cores"] == len(os.sched_getaffinity(0))
    sample = ResourceSample(1_000, 5.0, 1, 2, 3, 4, 5, 6, 7)
    agent = {m.type: m for m in resource_metrics("web", sample)}
    assert "cores" not in agent["cpu"].values


@pytest.mark.parametrize("count", [1, 2, 5, 20, 100])
def test_shown_spec_never_carries_an_env_value(count: int) -> None:
    """Every environment value is blanked, however many (a secret must not leave the host)."""
    env = {f"SECRET_{i}": f"value-{i}" for i in range(count)}
    shown = shown_spec(AgentSpec(id="web", argv=("web",), env=env))
    assert dict(shown.env) == dict.fromkeys(env, "")
