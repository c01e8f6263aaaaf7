"""fleet-manager CLI: config problems are one line and exit 2; migrate works."""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from manager.cli import app

runner = CliRunner()


def test_missing_config_file_is_one_line_exit_2(tmp_path: Path) -> None:
    """A config path that does not exist: exit 2 and one line, no traceback."""
    result = runner.invoke(app, ["serve", "--config", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert "nope.toml" in lines[0]
    assert "Traceback" not in result.output


def test_bad_value_is_one_line_exit_2(tmp_path: Path) -> None:
    """A bad value names the file and key on one line, exit 2."""
    cfg = tmp_path / "m.toml"
    cfg.write_text('[liveness]\nmin_ttl_seconds = "soon"\n')
    result = runner.invoke(app, ["migrate", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "m.toml" in result.output
    assert "liveness.min_ttl_seconds" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_unusable_certificates_are_one_line_exit_2(tmp_path: Path) -> None:
    """serve with missing certificate files fails at start with one line, exit 2."""
    cfg = tmp_path / "m.toml"
    cfg.write_text(
        f'state_dir = "{tmp_path / "state"}"\n[tls]\nca_file = "{tmp_path / "ca.pem"}"\n'
        '[server]\nlisten = "127.0.0.1:0"\nmetrics_listen = ""\n'
    )
    result = runner.invoke(app, ["serve", "--config", str(cfg)])
    assert result.exit_code == 2, result.output
    assert "ca.pem" in result.output
    assert "Traceback" not in result.output


def test_migrate_creates_the_schema_in_the_default_sqlite(tmp_path: Path) -> None:
    """`fleet-manager migrate` creates <state_dir>/manager.db with the tables."""
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    result = runner.invoke(app, ["migrate", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    with sqlite3.connect(tmp_path / "state" / "manager.db") as conn:
        tables = {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}
    assert {"nodes", "metric_samples", "events"} <= tables


def _config_with_certs(pki: Any, tmp_path: Path, role: str, listen: str) -> Path:
    tls = pki.issue(role, "m1")
    cfg = tmp_path / "m.toml"
    cfg.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[server]\nlisten = "{listen}"\nmetrics_listen = ""\n'
        f'[tls]\nca_file = "{tls.ca_file}"\ncert_file = "{tls.cert_file}"\n'
        f'key_file = "{tls.key_file}"\n'
    )
    return cfg


def test_port_in_use_is_one_line_exit_2(pki: Any, tmp_path: Path) -> None:
    """serve on a port another socket holds: exit 2, one line naming server.listen."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = _config_with_certs(pki, tmp_path, "manager", f"127.0.0.1:{port}")
        result = runner.invoke(app, ["serve", "--config", str(cfg)])
    assert result.exit_code == 2, result.output
    assert "server.listen" in result.output
    assert "Traceback" not in result.output


def test_node_certificate_for_the_manager_is_refused(pki: Any, tmp_path: Path) -> None:
    """A node certificate configured as the manager's: exit 2 saying a manager cert is needed."""
    cfg = _config_with_certs(pki, tmp_path, "node", "127.0.0.1:0")
    result = runner.invoke(app, ["serve", "--config", str(cfg)])
    assert result.exit_code == 2, result.output
    assert "needs a manager certificate" in result.output
