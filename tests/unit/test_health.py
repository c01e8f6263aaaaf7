"""Health checks: the spec (validation, TOML, proto both ways) and the pure decision.

`judge` is a function of the check, the probe results so far and `now`;
these tests drive it on a manual clock (plain floats), no I/O.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from daemon.supervisor.clock import ManualClock
from daemon.supervisor.health import ProbeResult, Probes, Verdict, judge, next_probe_at, record
from daemon.supervisor.policy import restarts_when_unhealthy
from daemon.supervisor.spec import AgentSpec, HealthSpec, SpecError, spec_from_dict, spec_to_dict
from fleet.agentspec import spec_from_proto, spec_to_proto, split_host_port
from fleet.config import load_config
from fleet.errors import ConfigError, InvalidArgument
from fleet.v1 import common_pb2

HTTP = HealthSpec(kind="http", url="http://127.0.0.1:8080/healthz", interval=5, timeout=1)


def _spec(health: HealthSpec, **kw: object) -> AgentSpec:
    return AgentSpec(id="web", argv=(sys.executable, "-c", "pass"), health=health, **kw)  # type: ignore[arg-type]


# --- the spec ----------------------------------------------------------------


@pytest.mark.parametrize(
    "health",
    [
        HTTP,
        HealthSpec(kind="http", url="https://example.com/ready?x=1", expected_status_max=299),
        HealthSpec(kind="http", url="http://[::1]:9000/"),
        HealthSpec(kind="tcp", address="127.0.0.1:5432", failure_threshold=3),
        HealthSpec(kind="tcp", address="[::1]:80"),
        HealthSpec(kind="tcp", address="db.internal:5432", initial_delay=30),
        HealthSpec(kind="command", command=("pg_isready", "-q"), restart_when_unhealthy=True),
    ],
)
def test_good_checks_validate(health: HealthSpec) -> None:
    """Well-formed http, tcp and command checks pass the manager's and the daemon's check."""
    _spec(health).validate()


@pytest.mark.parametrize(
    ("health", "needle"),
    [
        (HealthSpec(kind="grpc"), "health.kind: must be one of none, heartbeat, http"),  # type: ignore[arg-type]
        (HealthSpec(kind="http"), 'health.url: must be set for kind = "http"'),
        (HealthSpec(kind="http", url="ftp://h:21/"), "health.url: scheme must be http or https"),
        (HealthSpec(kind="http", url="127.0.0.1:8080/x"), "scheme must be http or https"),
        (HealthSpec(kind="http", url="http:///healthz"), "health.url: has no host"),
        (HealthSpec(kind="http", url="http://h:99999/"), "health.url: 'http://h:99999/'"),
        (HealthSpec(kind="http", url="http://h/a b"), "must not contain spaces"),
        (HealthSpec(kind="http", url="http://u:p@h/"), "must not carry credentials"),
        (
            dataclasses.replace(HTTP, expected_status_min=500, expected_status_max=200),
            "expected status range must lie in 100..599 with min <= max, got 500..200",
        ),
        (dataclasses.replace(HTTP, expected_status_max=700), "got 200..700"),
        (HealthSpec(kind="tcp"), "health.address: must be host:port, got ''"),
        (HealthSpec(kind="tcp", address="localhost"), "must be host:port, got 'localhost'"),
        (HealthSpec(kind="tcp", address="h:0"), "port must be 1..65535"),
        (HealthSpec(kind="tcp", address="h:http"), "port must be 1..65535"),
        (HealthSpec(kind="tcp", address="::1:80"), "write an IPv6 address as [addr]:port"),
        (HealthSpec(kind="command"), "health.command: must not be empty"),
        (HealthSpec(kind="command", command=("",)), "health.command: must not be empty"),
        (HealthSpec(kind="command", command=("a\0",)), "without NUL bytes"),
        (dataclasses.replace(HTTP, interval=0), "health.interval: must be > 0"),
        (dataclasses.replace(HTTP, interval=-1), "health.interval: must be > 0"),
        (dataclasses.replace(HTTP, timeout=0), "health.timeout: must be > 0"),
        (dataclasses.replace(HTTP, timeout=float("nan")), "health.timeout: must be > 0"),
        (dataclasses.replace(HTTP, failure_threshold=0), "health.failure_threshold: must be 1"),
        (dataclasses.replace(HTTP, initial_delay=-1), "health.initial_delay: must be 0.."),
        (HealthSpec(kind="tcp", url="http://h/"), 'health.url: is only for kind = "http"'),
        (HealthSpec(kind="heartbeat", command=("x",)), 'health.command: is only for kind = "c'),
    ],
)
def test_bad_checks_are_refused_naming_the_field(health: HealthSpec, needle: str) -> None:
    """Each bad check is a one-line SpecError (INVALID_ARGUMENT) naming agents[web].health.*."""
    with pytest.raises(SpecError) as info:
        _spec(health).validate()
    message = str(info.value)
    assert needle in message
    assert "agents[web].health." in message
    assert "\n" not in message
    assert isinstance(info.value, InvalidArgument)


def test_split_host_port() -> None:
    """host:port and [v6]:port split; the port is an int."""
    assert split_host_port("127.0.0.1:80") == ("127.0.0.1", 80)
    assert split_host_port("[::1]:443") == ("::1", 443)
    assert split_host_port("db.internal:5432") == ("db.internal", 5432)


def test_checks_load_from_toml(tmp_path: Path) -> None:
    """`health = { kind = "http", ... }` in an [[agents]] table loads; a bad one names the field."""

    @dataclasses.dataclass(frozen=True)
    class Daemon:
        agents: tuple[AgentSpec, ...] = ()

    good = tmp_path / "good.toml"
    good.write_text(
        '[[agents]]\nid = "web"\nargv = ["sleep", "100"]\n'
        'health = { kind = "http", url = "http://127.0.0.1:8080/healthz", interval = 5,'
        " timeout = 2, failure_threshold = 3, expected_status_min = 200,"
        " expected_status_max = 299, initial_delay = 10, restart_when_unhealthy = true }\n"
        '[[agents]]\nid = "db"\nargv = ["sleep", "100"]\n'
        'health = { kind = "command", command = ["pg_isready", "-q"] }\n'
    )
    web, db = load_config(Daemon, good, env_prefix="T_", environ={}).agents
    assert web.health == HealthSpec(
        kind="http",
        url="http://127.0.0.1:8080/healthz",
        interval=5,
        timeout=2,
        failure_threshold=3,
        expected_status_min=200,
        expected_status_max=299,
        initial_delay=10,
        restart_when_unhealthy=True,
    )
    assert db.health.command == ("pg_isready", "-q")
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[agents]]\nid = "web"\nargv = ["sleep"]\nhealth = { kind = "tcp", address = "x" }\n'
    )
    with pytest.raises(ConfigError, match=r"bad.toml: .*agents\[web\]\.health\.address: must be"):
        load_config(Daemon, bad, env_prefix="T_", environ={})


@pytest.mark.parametrize(
    "health",
    [
        HealthSpec(),
        HealthSpec(kind="heartbeat", timeout=12),
        dataclasses.replace(HTTP, failure_threshold=3, expected_status_min=204, initial_delay=2),
        HealthSpec(kind="tcp", address="127.0.0.1:1", restart_when_unhealthy=True),
        HealthSpec(kind="command", command=("true", "x"), interval=0.5, timeout=0.25),
    ],
)
def test_checks_survive_proto_and_state_file_round_trips(health: HealthSpec) -> None:
    """spec_to_proto/spec_from_proto and the state-file dict keep every field of the check."""
    spec = _spec(health)
    assert spec_from_proto(spec_to_proto(spec)) == spec
    assert spec_from_dict(spec_to_dict(spec)) == spec


def test_unset_probe_fields_take_the_defaults() -> None:
    """A pushed check with only kind and url: interval, timeout, threshold, status range default."""
    msg = common_pb2.AgentSpec(
        id="a",
        argv=["/bin/true"],
        health=common_pb2.HealthCheck(
            kind=common_pb2.HEALTH_CHECK_KIND_HTTP, url="http://127.0.0.1:1/"
        ),
    )
    health = spec_from_proto(msg).health
    assert health == HealthSpec(kind="http", url="http://127.0.0.1:1/")
    assert (health.failure_threshold, health.expected_status_min, health.expected_status_max) == (
        1,
        200,
        399,
    )


def test_a_probe_in_checks_is_the_one_check_and_more_are_refused() -> None:
    """fleetctl puts probes in `checks`: one is taken; two checks are INVALID_ARGUMENT."""
    tcp = common_pb2.HealthCheck(kind=common_pb2.HEALTH_CHECK_KIND_TCP, address="h:1")
    one = common_pb2.AgentSpec(id="a", argv=["/bin/true"], checks=[tcp])
    assert spec_from_proto(one).health == HealthSpec(kind="tcp", address="h:1")
    heartbeat = common_pb2.HealthCheck(kind=common_pb2.HEALTH_CHECK_KIND_HEARTBEAT)
    two = common_pb2.AgentSpec(id="a", argv=["/bin/true"], health=heartbeat, checks=[tcp])
    with pytest.raises(InvalidArgument, match="one health check per agent is supported") as info:
        spec_from_proto(two, where="agents[0]")
    assert info.value.field == "agents[0].checks"
    assert info.value.message.endswith("got 2: heartbeat, tcp"), "named as the file has them"
    odd = common_pb2.AgentSpec(id="a", argv=["/bin/true"], checks=[common_pb2.HealthCheck(kind=9)])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="unknown health kind 9") as info:
        spec_from_proto(odd, where="agents[0]")
    assert info.value.field == "agents[0].checks[0].kind"


def test_restart_when_unhealthy_follows_the_check_and_the_restart_policy() -> None:
    """Heartbeat: restart unless "never"; probes: only with restart_when_unhealthy, not "never"."""
    restarting = dataclasses.replace(HTTP, restart_when_unhealthy=True)
    assert restarts_when_unhealthy(_spec(HealthSpec(kind="heartbeat")))
    assert not restarts_when_unhealthy(_spec(HealthSpec(kind="heartbeat"), restart="never"))
    assert not restarts_when_unhealthy(_spec(HTTP))
    assert restarts_when_unhealthy(_spec(restarting))
    assert restarts_when_unhealthy(_spec(restarting, restart="always"))
    assert not restarts_when_unhealthy(_spec(restarting, restart="never"))


# --- the decision ------------------------------------------------------------


def _probe(clock: ManualClock, probes: Probes, ok: bool, detail: str = "") -> Probes:
    return record(probes, ProbeResult(ok, detail or ("ok" if ok else "status 500"), clock.now()))


def test_probe_schedule_initial_delay_then_every_interval() -> None:
    """The first probe waits initial_delay from the start of probing, each next one interval."""
    check = dataclasses.replace(HTTP, initial_delay=3.0, interval=5.0)
    clock = ManualClock(1000.0)
    probes = Probes()
    assert next_probe_at(check, probes, probing_since=1000.0) == 1003.0
    clock.advance(3.2)  # the probe took 0.2 s
    probes = _probe(clock, probes, True)
    assert next_probe_at(check, probes, probing_since=1000.0) == 1008.2


def test_pending_until_the_first_pass_then_healthy() -> None:
    """No probe yet, or only failures below the threshold: pending (with the failure)."""
    check = dataclasses.replace(HTTP, failure_threshold=2)
    clock = ManualClock(1000.0)
    probes = Probes()
    assert judge(check, live=True, now=clock.now(), probes=probes) == Verdict("pending", "")
    probes = _probe(clock, probes, False, "GET x: status 503")
    assert judge(check, live=True, now=clock.now(), probes=probes) == Verdict(
        "pending", "GET x: status 503"
    )
    clock.advance(5)
    probes = _probe(clock, probes, True)
    assert judge(check, live=True, now=clock.now(), probes=probes) == Verdict("healthy", "")


def test_unhealthy_after_threshold_failures_in_a_row_and_healthy_after_one_pass() -> None:
    """failure_threshold failures in a row: unhealthy with the last reason; one pass heals."""
    check = dataclasses.replace(HTTP, failure_threshold=3)
    clock = ManualClock(1000.0)
    probes = _probe(clock, Probes(), True)
    for n, expected in ((1, "healthy"), (2, "healthy"), (3, "unhealthy")):
        clock.advance(5)
        probes = _probe(clock, probes, False, f"GET x: status 50{n}")
        assert judge(check, live=True, now=clock.now(), probes=probes).health == expected
    verdict = judge(check, live=True, now=clock.now(), probes=probes)
    assert verdict == Verdict("unhealthy", "GET x: status 503 (3 times in a row)")
    clock.advance(5)
    probes = _probe(clock, probes, True)
    assert judge(check, live=True, now=clock.now(), probes=probes) == Verdict("healthy", "")
    assert probes.failures == 0
    clock.advance(5)
    probes = _probe(clock, probes, False)
    assert judge(check, live=True, now=clock.now(), probes=probes).health == "healthy"


def test_threshold_one_fails_on_the_first_failure() -> None:
    """With the default threshold (1) one failure is enough, and the reason has no count."""
    clock = ManualClock(1000.0)
    probes = _probe(clock, _probe(clock, Probes(), True), False, "connect h:1: connection refused")
    assert judge(HTTP, live=True, now=clock.now(), probes=probes) == Verdict(
        "unhealthy", "connect h:1: connection refused"
    )


def test_no_live_process_or_no_check_is_none() -> None:
    """Health is "none" without a live process (whatever the probes said) or without a check."""
    failed = _probe(ManualClock(1.0), Probes(), False)
    assert judge(HTTP, live=False, now=5.0, probes=failed) == Verdict("none", "")
    assert judge(HealthSpec(), live=True, now=5.0, probes=failed) == Verdict("none", "")


def test_heartbeat_is_judged_by_the_same_function() -> None:
    """One notion of health: the heartbeat check goes through judge too."""
    check = HealthSpec(kind="heartbeat", timeout=5.0)
    at = {"watched_since": 100.0}
    assert judge(check, live=True, now=101.0, last_heartbeat=0.0, **at).health == "pending"
    assert judge(check, live=True, now=104.0, last_heartbeat=102.0, **at).health == "healthy"
    assert judge(check, live=True, now=107.5, last_heartbeat=102.0, **at) == Verdict(
        "unhealthy", "no heartbeat for 5.5s (timeout 5s)"
    )


def test_the_manager_checks_definitions_with_the_same_code() -> None:
    """A definition's check is validated by the manager: a good one passes, a bad one names it."""
    from fleet.v1 import desired_pb2
    from manager.service.definitions import check_definition

    def definition(check: common_pb2.HealthCheck) -> desired_pb2.Definition:
        return desired_pb2.Definition(
            name="web", agent=common_pb2.AgentSpec(argv=["/bin/sleep", "100"], health=check)
        )

    good = common_pb2.HealthCheck(
        kind=common_pb2.HEALTH_CHECK_KIND_HTTP, url="http://127.0.0.1:8080/healthz"
    )
    assert check_definition(definition(good)).spec.health.url == "http://127.0.0.1:8080/healthz"
    bad = common_pb2.HealthCheck(kind=common_pb2.HEALTH_CHECK_KIND_HTTP, url="gopher://h/")
    with pytest.raises(InvalidArgument) as info:
        check_definition(definition(bad))
    assert info.value.field == "definitions[web].agent.health.url"
    assert "scheme must be http or https" in info.value.message


def test_health_reason_and_since_reach_agent_info_and_agent_state() -> None:
    """ListAgents (AgentInfo) and SyncAgentStates (AgentState) carry health_message/health_since."""
    from daemon.convert import agent_info, agent_state
    from daemon.supervisor.agent import AgentSnapshot
    from daemon.supervisor.states import AgentStatus

    snap = AgentSnapshot(
        id="web",
        type="process",
        status=AgentStatus.RUNNING,
        pid=42,
        version="1",
        start_time_ms=1000,
        restart_count=0,
        last_heartbeat_ms=0,
        exit_code=0,
        last_exit=None,
        message="unhealthy: GET http://h:1/: status 503; restarting",
        labels={},
        health="unhealthy",
        backoff_until_ms=0,
        config_version=1,
        health_message="GET http://h:1/: status 503",
        health_since_ms=5000,
    )
    for msg in (agent_info(snap), agent_state(snap)):
        assert msg.health == common_pb2.AGENT_HEALTH_UNHEALTHY
        assert msg.health_message == "GET http://h:1/: status 503"
        assert msg.health_since == 5000


def test_a_definition_file_check_reaches_the_daemon_spec() -> None:
    """fleetctl's definition file -> the manager's check -> the spec the daemon runs."""
    from fleetctl.deffile import load_text
    from manager.service.definitions import check_definition

    text = (
        '[[definitions]]\nname = "web"\n[definitions.agent]\nargv = ["/opt/web"]\n'
        'health = { kind = "http", url = "http://127.0.0.1:8080/healthz", interval = "5s",'
        " failure_threshold = 3, restart_when_unhealthy = true }\n"
    )
    (loaded,) = load_text("web.toml", text)
    spec = check_definition(loaded.definition).spec
    assert spec.health == HealthSpec(
        kind="http",
        url="http://127.0.0.1:8080/healthz",
        interval=5,
        failure_threshold=3,
        restart_when_unhealthy=True,
    )


def test_artifact_placeholder_reaches_the_check_command() -> None:
    """`{artifact}` in a command check becomes the artifact's path, as in argv."""
    from daemon.artifacts import substitute

    check = HealthSpec(kind="command", command=("{artifact}/bin/check", "--dir={artifact}"))
    spec = substitute(_spec(check), "/var/lib/fleet/artifacts/sha256-ab")
    assert spec.health.command == (
        "/var/lib/fleet/artifacts/sha256-ab/bin/check",
        "--dir=/var/lib/fleet/artifacts/sha256-ab",
    )
