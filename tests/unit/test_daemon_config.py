"""The daemon's config: example file, node id from the certificate, one-line errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from daemon.config import ArtifactsConfig, load_daemon_config
from fleet.errors import ConfigError
from fleet.tls import TLSConfig

REPO = Path(__file__).resolve().parents[2]


def _tls_env(tls: TLSConfig) -> dict[str, str]:
    return {
        "FLEET_DAEMON_TLS_CA_FILE": str(tls.ca_file),
        "FLEET_DAEMON_TLS_CERT_FILE": str(tls.cert_file),
        "FLEET_DAEMON_TLS_KEY_FILE": str(tls.key_file),
    }


def _write(tmp_path: Path, tls: TLSConfig, body: str) -> Path:
    path = tmp_path / "daemon.toml"
    path.write_text(
        body + f'[tls]\nca_file = "{tls.ca_file}"\ncert_file = "{tls.cert_file}"\n'
        f'key_file = "{tls.key_file}"\n'
    )
    return path


def test_example_config_loads_and_takes_the_node_id_from_the_certificate(pki, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """configs/daemon.toml loads (TLS paths from the env) and the node id is the cert's name."""
    # Its SDK agents run `fleet-agent`, found on PATH where fleet is installed.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    tls = pki.issue("node", "web-1")
    cfg = load_daemon_config(REPO / "configs" / "daemon.toml", environ=_tls_env(tls))
    assert cfg.node_id == "web-1"
    assert [a.id for a in cfg.agents] == ["ticker", "sleeper", "probe", "worker"]
    assert {a.id: a.health.kind for a in cfg.agents}["probe"] == "heartbeat"
    assert cfg.agents[0].restart == "always"
    assert cfg.manager.addresses == ("127.0.0.1:7443",)
    assert cfg.stop_agents_on_exit is False
    assert cfg.artifacts == ArtifactsConfig()  # the example shows the defaults


def test_a_node_id_that_disagrees_with_the_certificate_is_refused(pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """node_id = "b" with a certificate for node/a fails naming both."""
    tls = pki.issue("node", "a")
    path = _write(tmp_path, tls, "")
    with pytest.raises(ConfigError, match=r"node_id: 'b' disagrees with the certificate.*node/a"):
        load_daemon_config(path, environ={"FLEET_DAEMON_NODE_ID": "b"})


def test_a_manager_certificate_is_not_a_daemon_identity(pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A daemon started with a manager certificate is refused at load."""
    tls = pki.issue("manager", "m1")
    with pytest.raises(ConfigError, match="needs a node certificate"):
        load_daemon_config(_write(tmp_path, tls, ""), environ={})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[manager]\naddresses = []\n", "manager: addresses must name at least one manager"),
        ("[manager]\nbuffer_batches = 0\n", "buffer_batches must be >= 1"),
        ("sample_interval_seconds = -1.0\n", "sample_interval_seconds must be > 0"),
        ('listen = "nope"\n', "listen must be host:port"),
        ("[manager.reconnect]\nmultiplier = 0.5\n", "multiplier must be >= 1"),
        (
            '[[agents]]\nid = "a"\nargv = ["/bin/true"]\n'
            '[[agents]]\nid = "a"\nargv = ["/bin/true"]\n',
            "id 'a' is used twice",
        ),
        ('[[agents]]\nid = "a"\nargv = []\n', "agents[0]"),
        ('[[agents]]\nid = "a"\nargv = ["/bin/true"]\nstop_timeout = -1.0\n', "stop_timeout"),
        ('stop_agents_on_exit = "yes"\n', "stop_agents_on_exit"),
        ("[manager]\nheartbeat_intervall_seconds = 1.0\n", "did you mean"),
        ("[artifacts]\nmax_files = 0\n", "artifacts: max_files must be >= 1"),
        ("[artifacts]\nkeep_recent = -1\n", "keep_recent must be >= 0"),
        ("[artifacts]\nwait_seconds = 61.0\n", "wait_seconds must be 0..60"),
        ("[jobs]\nmax_concurrent = 0\n", "jobs: max_concurrent must be 1..1000"),
        ("[jobs]\nkeep_days = 0.0\n", "jobs: keep_days must be > 0"),
        ("[jobs]\ngrace_seconds = -1.0\n", "jobs: grace_seconds must be > 0"),
        ('[jobs]\ndir = "relative/jobs"\n', "jobs: dir must be an absolute path"),
        ('[jobs]\nenabled = "no"\n', "jobs.enabled"),
        (
            '[[agents]]\nid = "a"\nargv = ["/bin/true"]\n'
            'artifact = {name = "web", version = "1", digest = "sha256:'
            + "0" * 64
            + '", size_bytes = 1}\n',
            "agents[0].artifact: only an agent a manager pushes can use an artifact",
        ),
        # The forms a definition takes: refused for the same reason, not for their shape.
        (
            '[[agents]]\nid = "a"\nargv = ["/bin/true"]\nartifact = "web:1.4.2"\n',
            "agents[0].artifact: only an agent a manager pushes can use an artifact",
        ),
        (
            '[[agents]]\nid = "a"\nargv = ["/bin/true"]\n'
            'artifact = { name = "web", version = "1.4.2" }\n',
            "agents[0].artifact: only an agent a manager pushes can use an artifact",
        ),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_key(  # type: ignore[no-untyped-def]
    pki, tmp_path: Path, body: str, message: str
) -> None:
    """Each bad setting is a one-line ConfigError naming the file and what is wrong."""
    tls = pki.issue("node", "n1")
    path = _write(tmp_path, tls, body)
    with pytest.raises(ConfigError) as info:
        load_daemon_config(path, environ={})
    text = str(info.value)
    assert message in text
    assert str(path) in text
    assert "\n" not in text


def test_a_run_dir_too_deep_for_unix_sockets_is_one_line_naming_the_key_and_limit(  # type: ignore[no-untyped-def]
    pki, tmp_path: Path
) -> None:
    """A run_dir whose sockets would exceed the 107-byte sun_path is refused at load, not bound."""
    tls = pki.issue("node", "n1")
    path = _write(tmp_path, tls, "")
    deep = "/tmp/" + "d" * 90
    with pytest.raises(ConfigError) as info:
        load_daemon_config(path, environ={"FLEET_DAEMON_RUN_DIR": deep})
    text = str(info.value)
    assert "run_dir" in text
    assert "the limit is 107" in text
    assert "\n" not in text
    assert not Path(deep).exists(), "nothing was created"
    fits = "/tmp/" + "d" * 78  # 5 + 78 + len("/private/agent-grpc.sock") = 107
    assert load_daemon_config(path, environ={"FLEET_DAEMON_RUN_DIR": fits}).run_dir == Path(fits)


def test_missing_certificate_files_are_a_config_error(tmp_path: Path) -> None:
    """A TLS file that does not exist fails at load, naming it."""
    path = tmp_path / "daemon.toml"
    path.write_text(
        f'[tls]\nca_file = "{tmp_path}/ca.pem"\ncert_file = "{tmp_path}/n.pem"\n'
        f'key_file = "{tmp_path}/n-key.pem"\n'
    )
    with pytest.raises(ConfigError, match=r"ca\.pem"):
        load_daemon_config(path, environ={})


def test_jobs_table_defaults_and_dir(pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """[jobs] defaults to enabled under <state_dir>/jobs; `dir` moves the job directories."""
    tls = pki.issue("node", "n1")
    cfg = load_daemon_config(_write(tmp_path, tls, 'state_dir = "/var/lib/x"\n'), environ={})
    assert cfg.jobs.enabled
    assert cfg.jobs_dir == Path("/var/lib/x/jobs")
    body = '[jobs]\nenabled = false\nmax_concurrent = 2\ndir = "/srv/jobs"\n'
    cfg = load_daemon_config(_write(tmp_path, tls, body), environ={})
    assert (cfg.jobs.enabled, cfg.jobs.max_concurrent, cfg.jobs_dir) == (
        False,
        2,
        Path("/srv/jobs"),
    )
