"""Fixtures shared by every test layer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fleet.pki import CertificateAuthority, Role
from fleet.tls import TLSConfig

# --- PostgreSQL ------------------------------------------------------------
# `make test` exports FLEET_TEST_POSTGRES_URL. Without it (or with the server
# down) the tests that need PostgreSQL skip with the reason, so a developer
# without a server can run the rest; under CI (CI=true) that is a failure.


def _postgres_unusable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"PostgreSQL is required under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture
async def postgres_url() -> str:
    """The URL of a reachable PostgreSQL (postgresql+asyncpg://...)."""
    url = os.environ.get("FLEET_TEST_POSTGRES_URL", "")
    if not url:
        _postgres_unusable("FLEET_TEST_POSTGRES_URL is not set (make test sets it)")
    import asyncpg  # local: only PostgreSQL tests pay for it

    dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1)
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        _postgres_unusable(f"PostgreSQL at {dsn} is unreachable: {exc}")
    else:
        await conn.close()
    return url


# --- PKI -------------------------------------------------------------------
# A fresh CA per test, so no test depends on certificates another one made.


@dataclass(frozen=True)
class PkiFixture:
    """A per-test CA and a helper writing its certificates under tmp_path."""

    ca: CertificateAuthority
    """The test's own CA."""
    root: Path
    """Where `issue` writes: <root>/<role>-<name>/."""

    @property
    def trust_domain(self) -> str:
        """The CA's trust domain (fleet.local)."""
        return self.ca.trust_domain

    def issue(self, role: Role, name: str, **kw: Any) -> TLSConfig:
        """Issue <role>/<name> (kwargs as CertificateAuthority.issue) and return its TLSConfig."""
        issued = self.ca.issue(role, name, **kw)
        return issued.write(self.root / f"{role}-{name}")


@pytest.fixture
def pki(tmp_path: Path) -> PkiFixture:
    """A fresh CertificateAuthority for this test, issuing into tmp_path."""
    return PkiFixture(ca=CertificateAuthority.create(), root=tmp_path)
