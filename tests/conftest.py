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


# --- Manager storage (M1) --------------------------------------------------
# `database_url` runs a test once per backend: a fresh SQLite file, and a fresh
# PostgreSQL database per test (dropped after), so tests never see each
# other's rows. `database` is that URL opened and migrated.


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A URL of an empty database of each backend (sqlite file / fresh PG database)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'manager.db'}"
        return
    import secrets

    import asyncpg
    from sqlalchemy.engine import make_url

    # Not via the postgres_url fixture: an async fixture cannot request
    # another one dynamically; the same skip/fail rule applies.
    url = os.environ.get("FLEET_TEST_POSTGRES_URL", "")
    if not url:
        _postgres_unusable("FLEET_TEST_POSTGRES_URL is not set (make test sets it)")
    server_url = make_url(url)
    name = f"fleet_t_{secrets.token_hex(6)}"
    admin_dsn = server_url.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        admin = await asyncpg.connect(admin_dsn, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        _postgres_unusable(f"PostgreSQL at {server_url!r} is unreachable: {exc}")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield server_url.set(database=name).render_as_string(hide_password=False)
    finally:
        admin = await asyncpg.connect(admin_dsn, timeout=5)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def database(database_url: str) -> Any:
    """An open, migrated manager Database on each backend; closed after the test."""
    from manager.storage.db import Database

    db = await Database.open(database_url)
    try:
        await db.migrate()
        yield db
    finally:
        await db.close()


# --- Scheduling under pytest-xdist -------------------------------------------
# `make test` runs `--dist loadfile`: each file goes to one worker whole. Here the
# layers that run fleets of processes and browsers share two lanes instead, each one
# unit of work, so at most two of those files run at once however many workers there
# are (their waits were sized for that much company), while the other workers take the
# unit, integration and fuzz files. (xdist's own `loadgroup` does not group under
# pytest 9, so the scheduler's unit is set here, through xdist's hook.)
_LANES = {"faults": "fleet-a", "bench": "fleet-a", "browser": "fleet-a", "system": "fleet-b"}


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getvalue("dist") != "loadfile":
        return None  # xdist's own
    from xdist.scheduler import LoadScopeScheduling

    class FilesAndLanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]  # tests/<layer>/test_x.py
            parts = path.split("/")
            return _LANES.get(parts[1], path) if len(parts) > 2 else path

    return FilesAndLanes(config, log)
