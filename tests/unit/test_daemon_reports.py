"""`reports.reported_row`: what a daemon's report changes on its node_desired row (pure).

A hello carries one; a reconnecting fleet sends thousands, and the manager
writes only those that change something (the rest are a read).
"""

from __future__ import annotations

from manager.service.reports import reported_row
from manager.storage.records import NodeDesiredRecord, UpdateErrorRecord

NOW = 1_000_000
ERR = UpdateErrorRecord("web", 3, "port in use")


def test_a_never_managed_node_reporting_nothing_changes_nothing() -> None:
    row, changed = reported_row(None, "n1", 0, None, True, NOW)
    assert not changed
    assert row == NodeDesiredRecord("n1")


def test_a_reconnect_with_the_same_set_changes_nothing() -> None:
    stored = NodeDesiredRecord("n1", version=4, reported_version=4, updated_ms=5)
    assert reported_row(stored, "n1", 4, None, True, NOW) == (stored, False)
    assert reported_row(stored, "n1", 4, (), False, NOW) == (stored, False)


def test_a_new_version_or_new_errors_are_recorded() -> None:
    stored = NodeDesiredRecord("n1", version=4, reported_version=3)
    row, changed = reported_row(stored, "n1", 4, None, False, NOW)
    assert changed
    assert (row.reported_version, row.updated_ms) == (4, NOW)
    row, changed = reported_row(stored, "n1", 3, (ERR,), False, NOW)
    assert changed
    assert row.update_errors == (ERR,)
    # None keeps the stored errors (a hello does not carry them).
    with_errors = NodeDesiredRecord("n1", reported_version=3, update_errors=(ERR,))
    assert reported_row(with_errors, "n1", 3, None, False, NOW) == (with_errors, False)


def test_a_returning_node_gets_its_failed_push_retried_at_once() -> None:
    stored = NodeDesiredRecord(
        "n1", version=4, reported_version=4, push_attempts=3, next_push_ms=NOW + 60_000
    )
    row, changed = reported_row(stored, "n1", 4, None, True, NOW)
    assert changed
    assert (row.push_attempts, row.next_push_ms) == (0, 0)
    # Not on a plain sync: only a (re)registration resets the backoff.
    assert reported_row(stored, "n1", 4, None, False, NOW) == (stored, False)
