"""Pure storage helpers: transient-error classification, URL normalization, lock keys."""

from __future__ import annotations

import errno
import sqlite3

import pytest
from sqlalchemy import exc as sa_exc

from fleet.errors import ConfigError
from manager.storage.db import SpaceLog, advisory_key, normalize_url
from manager.storage.transient import describe, is_disk_full, is_transient


class _PgError(Exception):
    """Stands in for a driver error carrying a SQLSTATE (asyncpg and SQLAlchemy's adapter do)."""

    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def _wrapped(orig: BaseException) -> sa_exc.DBAPIError:
    return sa_exc.OperationalError("INSERT INTO t VALUES (?)", {"secret": 1}, orig)


@pytest.mark.parametrize(
    "error",
    [
        _wrapped(sqlite3.OperationalError("database is locked")),
        sqlite3.OperationalError("unable to open database file"),  # out of descriptors
        OSError(errno.EMFILE, "Too many open files"),
        _wrapped(_PgError("terminating connection due to administrator command", "57P01")),
        _wrapped(_PgError("the database system is starting up", "57P03")),
        _wrapped(_PgError("canceling statement due to lock timeout", "55P03")),
        _wrapped(_PgError("could not serialize access", "40001")),
        _wrapped(_PgError("connection failure", "08006")),
        ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed ('127.0.0.1', 1)"),
        OSError("Multiple exceptions: [Errno 111] Connect call failed ('::1', 5432, 0, 0)"),
        ConnectionResetError(errno.ECONNRESET, "reset by peer"),
        TimeoutError(),
    ],
)
def test_transient_errors_are_retried(error: BaseException) -> None:
    """Lock contention, an unreachable or restarting server, and a process out of file
    descriptors are transient."""
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        _wrapped(sqlite3.OperationalError("database or disk is full")),
        _wrapped(_PgError("could not extend file: No space left on device", "53100")),
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
    ],
)
def test_disk_full_is_told_apart_and_not_retried(error: BaseException) -> None:
    """A write refused for want of space is its own case: retrying at once cannot help."""
    assert is_disk_full(error)
    assert not is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        _wrapped(sqlite3.OperationalError("database is locked")),
        _wrapped(_PgError("could not serialize access", "40001")),
        _wrapped(sqlite3.OperationalError("no such table: nodes")),
    ],
)
def test_other_errors_are_not_disk_full(error: BaseException) -> None:
    """Only SQLITE_FULL, SQLSTATE 53100 and ENOSPC/EDQUOT count as a full disk."""
    assert not is_disk_full(error)


@pytest.mark.parametrize(
    "error",
    [
        sa_exc.IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE constraint failed")),
        _wrapped(_PgError('password authentication failed for user "x"', "28P01")),
        _wrapped(_PgError('relation "nodes" does not exist', "42P01")),
        _wrapped(sqlite3.OperationalError("no such table: nodes")),
        FileNotFoundError(errno.ENOENT, "missing"),
        ValueError("bug"),
    ],
)
def test_permanent_errors_are_not_retried(error: BaseException) -> None:
    """Bad input, bad credentials, a missing schema and bugs are not transient."""
    assert not is_transient(error)


def test_transient_cause_is_found_through_the_chain() -> None:
    """An error raised while handling a transient one is classified by its cause."""
    outer = RuntimeError("commit failed")
    outer.__cause__ = sqlite3.OperationalError("database is locked")
    assert is_transient(outer)


def test_describe_is_one_line_without_sql_or_parameters() -> None:
    """The operator-facing reason names the driver error, not the statement."""
    text = describe(_wrapped(sqlite3.OperationalError("database is locked\nmore")))
    assert text == "OperationalError: database is locked"
    assert "secret" not in text


@pytest.mark.parametrize(
    ("url", "normalized"),
    [
        ("sqlite:////var/lib/fleet/m.db", "sqlite+aiosqlite:////var/lib/fleet/m.db"),
        ("sqlite+aiosqlite:///rel.db", "sqlite+aiosqlite:///rel.db"),
        ("postgresql://u:p@h:5432/db", "postgresql+asyncpg://u:p@h:5432/db"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
    ],
)
def test_urls_get_the_async_driver(url: str, normalized: str) -> None:
    """Plain sqlite:// and postgresql:// URLs are accepted and mapped to the async drivers."""
    assert normalize_url(url).render_as_string(hide_password=False) == normalized


def test_unsupported_url_error_hides_the_password() -> None:
    """The ConfigError for an unsupported backend does not print the password."""
    with pytest.raises(ConfigError, match="unsupported") as err:
        normalize_url("mysql://root:hunter2@db/fleet")
    assert "hunter2" not in str(err.value)


def test_advisory_keys_are_stable_signed_64_bit() -> None:
    """Lock names map to fixed signed 64-bit keys, distinct per name."""
    key = advisory_key("fleet-sweeper")
    assert key == advisory_key("fleet-sweeper")
    assert -(2**63) <= key < 2**63
    assert key != advisory_key("fleet-rollup")
    # Pinned: replicas running different releases must agree on the key.
    assert key == 7306980219861809034


def test_constraint_violations_are_recognized_from_any_layer() -> None:
    """SQLAlchemy's IntegrityError and a raw driver error of SQLSTATE class 23 are bad input."""
    from manager.storage.transient import is_constraint_violation

    assert is_constraint_violation(sa_exc.IntegrityError("INSERT", {}, ValueError("dup")))
    assert is_constraint_violation(_PgError('null value in column "value"', "23502"))
    assert not is_constraint_violation(_PgError("deadlock detected", "40P01"))
    assert not is_transient(_PgError('null value in column "value"', "23502"))


def test_space_log_says_a_full_disk_once_an_episode_not_per_refusal() -> None:
    """Refusals mixed with successes (a nearly full disk) make one line, a reminder a
    minute on, and one line once writes have gone through for quiet_s."""
    space = SpaceLog(quiet_s=10.0, remind_s=60.0)
    assert space.succeeded(0.0) is None
    first = space.refused(1.0)
    assert first is not None
    assert first.startswith("out of disk space")
    said = [space.succeeded(1.5), space.refused(2.0), space.succeeded(11.0), space.refused(30.0)]
    assert said == [None, None, None, None]
    reminder = space.refused(61.5)
    assert reminder == "still out of disk space after 60 s: 3 writes refused"
    assert space.succeeded(70.0) is None
    assert space.succeeded(71.5) == (
        "writes succeed again (60 s of writes refused for want of disk space)"
    )
    assert space.succeeded(100.0) is None
    again = space.refused(200.0)
    assert again is not None
    assert again.startswith("out of disk space")
