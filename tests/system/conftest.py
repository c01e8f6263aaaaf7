"""Fixtures of the system tests: real processes.

The integration harness (`manager_harness`, `fleet_harness`) lives in
tests/integration, which pytest puts on sys.path only when it collects tests
from there; this conftest adds it so `pytest tests/system` alone works.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import short_tmp
from manager_proc import Manager, free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))


@pytest.fixture
def manager(pki: Any) -> Iterator[Manager]:
    """A real manager process (manager/m1, SQLite) with a 1 s heartbeat interval."""
    with short_tmp() as root:
        tls = pki.issue("manager", "m1")
        m = Manager(root, free_port())
        (root / "manager.toml").write_text(
            f"""
state_dir = "{root}/state"
[server]
listen = "127.0.0.1:{m.port}"
metrics_listen = ""
shutdown_grace_seconds = 2.0
[tls]
ca_file = "{tls.ca_file}"
cert_file = "{tls.cert_file}"
key_file = "{tls.key_file}"
[liveness]
min_ttl_seconds = 1.0
jitter = 0.0
"""
        )
        m.start()
        try:
            yield m
        finally:
            m.stop()
