"""Fixtures of the security matrix: a module-wide CA; the matrix in the terminal summary.

The integration harness (`manager_harness`) lives in tests/integration, which
pytest puts on sys.path only when it collects tests from there; this conftest
adds it so `pytest tests/security` alone works.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from live_env import MATRIX_REPORT, ModulePki  # needs the path above

from fleet.pki import CertificateAuthority


@pytest.fixture(scope="module")
def module_pki(tmp_path_factory: pytest.TempPathFactory) -> ModulePki:
    """A CA for the whole module (servers started once per module need one)."""
    return ModulePki(CertificateAuthority.create(), tmp_path_factory.mktemp("pki"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Show the security matrix (as run) at the end of the session."""
    tables = terminalreporter.config.stash.get(MATRIX_REPORT, [])
    if tables:
        terminalreporter.section("security matrix")
        for table in tables:
            terminalreporter.write_line(table)
            terminalreporter.write_line("")
