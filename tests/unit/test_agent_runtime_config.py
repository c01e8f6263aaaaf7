"""Config checksums, the daemon endpoint from the environment, example settings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from agent_runtime import AgentConfig, ConfigChecksumError, DaemonEndpoint
from agent_runtime._config import verify
from agent_runtime.examples import probe, worker
from agent_runtime.examples._follow import load_json_arg
from fleet.errors import ConfigError
from fleet.v1 import agent_pb2


def test_verified_config_keeps_payload_and_version() -> None:
    """A payload that matches its sha256 becomes an AgentConfig with JSON access."""
    payload = b'{"a": 1}'
    message = agent_pb2.AgentConfig(
        payload=payload, version=7, sha256=hashlib.sha256(payload).hexdigest()
    )
    config = verify(message)
    assert (config.version, config.json()) == (7, {"a": 1})


def test_checksum_mismatch_is_refused_with_a_clear_message() -> None:
    """A corrupt payload raises ConfigChecksumError naming the version and both hashes."""
    message = agent_pb2.AgentConfig(payload=b"{}", version=3, sha256="ab" * 32)
    with pytest.raises(ConfigChecksumError, match=r"config version 3 rejected: .* abababababab"):
        verify(message)


def test_empty_config_reads_as_empty_json() -> None:
    """No config yet (empty payload) is an empty object, not a parse error."""
    assert AgentConfig.of(b"", 0).json() == {}
    assert AgentConfig.of(b"", 0).empty


def test_endpoint_from_env_and_token_metadata() -> None:
    """FLEET_AGENT_ID/FLEET_DAEMON_SOCKET give the unix target; the token becomes metadata."""
    env = {"FLEET_AGENT_ID": "a1", "FLEET_DAEMON_SOCKET": "/run/x.sock", "FLEET_AGENT_TOKEN": "t"}
    endpoint = DaemonEndpoint.from_env(env)
    assert endpoint.target == "unix:/run/x.sock"
    assert endpoint.metadata() == (("x-fleet-agent-token", "t"),)
    assert DaemonEndpoint.from_env({**env, "FLEET_AGENT_TOKEN": ""}).metadata() == ()


@pytest.mark.parametrize("missing", ["FLEET_AGENT_ID", "FLEET_DAEMON_SOCKET"])
def test_missing_env_names_the_variable(missing: str) -> None:
    """Outside a daemon the SDK says which variable is missing and what to do."""
    env = {"FLEET_AGENT_ID": "a1", "FLEET_DAEMON_SOCKET": "/run/x.sock"}
    del env[missing]
    with pytest.raises(ConfigError, match=f"{missing} is not set.*fleet-daemon"):
        DaemonEndpoint.from_env(env)


def test_probe_settings_parse() -> None:
    """A valid probe config yields its targets with resolved addresses."""
    config = probe.parse_config(
        {
            "targets": [
                {"name": "web", "url": "https://example.test/health"},
                {"name": "db", "url": "tcp://127.0.0.1:5432"},
            ],
            "interval_seconds": 2,
        }
    )
    assert [t.address for t in config.targets] == [("example.test", 443), ("127.0.0.1", 5432)]
    assert (config.interval_seconds, config.timeout_seconds) == (2.0, 2.0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"targets": [{"name": "x", "url": "ftp://h/"}]}, r"targets\[0\]\.url: .*scheme"),
        ({"targets": [{"name": "x", "url": "tcp://h"}]}, r"targets\[0\]\.url: .*needs a port"),
        ({"targets": [{"name": "Web", "url": "tcp://h:1"}]}, r"targets\[0\]\.name"),
        ({"interval_seconds": 0}, "interval_seconds: expected a number > 0"),
        ({"intervall_seconds": 1}, "unknown key.*intervall_seconds"),
        ({"targets": [{"name": "a", "url": "tcp://h:1"}] * 2}, "names must be unique"),
    ],
)
def test_bad_probe_settings_name_the_key(data: object, message: str) -> None:
    """Each bad probe setting is one ValueError naming the key."""
    with pytest.raises(ValueError, match=message):
        probe.parse_config(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"batch_size": 0}, "batch_size: expected an integer"),
        ({"pace_seconds": -1}, "pace_seconds"),
        ({"inbox": "a", "outbox": "a"}, "outbox: must differ"),
        ([], "expected a JSON object"),
    ],
)
def test_bad_worker_settings_name_the_key(data: object, message: str) -> None:
    """Each bad worker setting is one ValueError naming the key."""
    with pytest.raises(ValueError, match=message):
        worker.parse_config(data)


def test_config_argument_is_inline_json_or_a_file(tmp_path: Path) -> None:
    """--config accepts inline JSON or a path, and says which failed and why."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"batch_size": 2}))
    assert load_json_arg(str(path)) == {"batch_size": 2}
    assert load_json_arg('{"x": 1}') == {"x": 1}
    with pytest.raises(ValueError, match="cannot read"):
        load_json_arg(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="not JSON"):
        load_json_arg("{nope")
