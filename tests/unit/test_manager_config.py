"""The manager's config: the shipped example loads, bad values are one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.config import load_config
from fleet.errors import ConfigError
from manager.config import ENV_PREFIX, ManagerConfig

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "configs" / "manager.toml"
UNIT = ROOT / "configs" / "systemd" / "fleet-manager.service"


def test_example_config_loads_with_the_documented_defaults() -> None:
    """configs/manager.toml loads and equals the built-in defaults (so the docs are true)."""
    assert load_config(ManagerConfig, EXAMPLE, env_prefix=ENV_PREFIX, environ={}) == ManagerConfig()


def test_default_database_is_sqlite_under_the_state_dir(tmp_path: Path) -> None:
    """With no database.url the manager uses <state_dir>/manager.db."""
    cfg = load_config(
        ManagerConfig,
        None,
        env_prefix=ENV_PREFIX,
        environ={"FLEET_MANAGER_STATE_DIR": str(tmp_path)},
    )
    assert cfg.database_url == f"sqlite+aiosqlite:///{tmp_path}/manager.db"


def test_env_overrides_a_nested_key() -> None:
    """FLEET_MANAGER_DATABASE_URL overrides [database] url."""
    url = "postgresql+asyncpg://fleet@db:5432/fleet"
    cfg = load_config(
        ManagerConfig, EXAMPLE, env_prefix=ENV_PREFIX, environ={"FLEET_MANAGER_DATABASE_URL": url}
    )
    assert cfg.database_url == url


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[liveness]\njitter = 2.0\n", "liveness.jitter"),
        ("[liveness]\nflush_interval_seconds = 5.0\n", "flush_interval_seconds"),
        ('[server]\nlisten = "nowhere"\n', "server.listen"),
        ('[database]\nurl = "mysql://x"\n', "database.url"),
        (
            "[metrics]\nraw_retention_hours = 48.0\nrollup_retention_days = 1.0\n",
            "rollup_retention_days",
        ),
        ("[metrics]\ncommit_linger_seconds = 2.0\n", "metrics.commit_linger_seconds"),
        ("[metrics]\ncommit_linger_seconds = -1.0\n", "metrics.commit_linger_seconds"),
        ('[logging]\nlevel = "loud"\n', "logging.level"),
        ('[server]\nlisen = "0.0.0.0:1"\n', "listen"),
        ("[artifacts]\nmax_bytes = 0\n", "artifacts.max_bytes"),
        ("[server]\nmax_receive_message_bytes = 1048576\n", "a 1 MiB artifact chunk"),
        ("[artifacts]\nstale_upload_seconds = 0.0\n", "stale_upload_seconds"),
        ('[enroll]\nlisten = "0.0.0.0:7445"\n', "enrollment needs an issuing CA"),
        ('[enroll]\nissuer_cert_file = "/x.pem"\n', "both issuer_cert_file and issuer_key_file"),
        ('[enroll]\nadvertise_address = "m1"\n', "enroll.advertise_address"),
        ("[enroll]\nnode_cert_days = 0.0\n", "enroll.node_cert_days"),
        ("[enroll]\nburst = 0\n", "burst in 1..100000"),
        ("[enroll]\nmax_token_ttl_days = -1.0\n", "enroll.max_token_ttl_days"),
        ('[cluster]\nadvertise_address = "0.0.0.0:7443"\n', "cluster.advertise_address"),
        ('[cluster]\nadvertise_address = "m1:0"\n', "cluster.advertise_address"),
        ('[cluster]\nadvertise_address = "m1"\n', "cluster.advertise_address"),
        # Replicas share PostgreSQL; the default database is a SQLite file.
        ('[cluster]\nadvertise_address = "m1:7443"\n', "PostgreSQL"),
        (
            "[cluster]\nheartbeat_seconds = 5.0\nstale_after_seconds = 10.0\n",
            "cluster.stale_after_seconds",
        ),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, toml: str, needle: str) -> None:
    """Every bad value is a one-line ConfigError that names the key."""
    path = tmp_path / "manager.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(ManagerConfig, path, env_prefix=ENV_PREFIX, environ={})
    assert needle in info.value.message
    assert "\n" not in info.value.message


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts configs/systemd/fleet-manager.service."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # verify checks that ExecStart exists: point it at this venv's fleet-manager.
    script = Path(sys.executable).with_name("fleet-manager")
    if not script.exists():
        pytest.skip("fleet-manager is not installed in this venv (pip install -e .)")
    unit = tmp_path / "fleet-manager.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/fleet-manager", str(script)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, check=False, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "fleet-manager.service" not in result.stderr, result.stderr
