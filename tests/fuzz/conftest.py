"""Fuzzing setup: the hypothesis profile, and the harness modules on sys.path.

The profile is registered, not loaded, so it changes no other test's
settings; fuzz tests apply it with `@FUZZ`. FLEET_FUZZ_EXAMPLES overrides
the example count (e.g. 2000 for a soak, 30 while editing).
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, settings

_TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_TESTS / "integration"))  # manager_harness
sys.path.insert(0, str(_TESTS / "security"))  # live_env

from live_env import ModulePki, postgres_database  # noqa: E402  # needs the paths above

from fleet.pki import CertificateAuthority  # noqa: E402

settings.register_profile(
    "fleet-fuzz",
    max_examples=int(os.environ.get("FLEET_FUZZ_EXAMPLES", "300")),
    deadline=None,  # one example is an RPC over mTLS on a shared machine
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
    derandomize=False,
    print_blob=True,
)


@pytest.fixture(scope="module")
def module_pki(tmp_path_factory: pytest.TempPathFactory) -> ModulePki:
    """A CA for the whole module (one server per module, not per example)."""
    return ModulePki(CertificateAuthority.create(), tmp_path_factory.mktemp("pki"))


@pytest_asyncio.fixture(
    scope="module",
    loop_scope="module",
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
async def manager_database(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """The manager's database for a module: "" (a SQLite file) or a fresh PostgreSQL one."""
    if request.param == "sqlite":
        yield ""
        return
    async with postgres_database() as url:
        yield url
