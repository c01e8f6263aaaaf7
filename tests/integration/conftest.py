"""Fixtures shared by integration test modules."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from test_pool_support import MakePool, StartDaemon, pools, running_daemons

from fleet.tls import TLSConfig

# --- the daemon pool's tests (test_pool*.py) ---------------------------------


@pytest.fixture
async def start_daemon(pki: Any) -> AsyncIterator[StartDaemon]:
    """Simulated daemons, each with its own node certificate; stopped after the test."""
    async with running_daemons(pki) as start:
        yield start


@pytest.fixture
def manager_tls(pki: Any) -> TLSConfig:
    """The manager's certificate files (manager/m1)."""
    tls: TLSConfig = pki.issue("manager", "m1")
    return tls


@pytest.fixture
async def make_pool(pki: Any, manager_tls: TLSConfig) -> AsyncIterator[MakePool]:
    """Pools holding the manager's certificate; closed after the test."""
    async with pools(pki, manager_tls) as make:
        yield make
