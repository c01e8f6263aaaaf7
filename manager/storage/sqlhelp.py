"""Small SQL helpers shared by the repositories (dialect-specific constructs)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite

from manager.storage.db import Dialect

__all__ = ["IN_CHUNK", "chunks", "dialect_insert"]

T = TypeVar("T")

# Bound parameters per IN (...) list: far below SQLite's 32766 and asyncpg's
# 32767 limits, and small enough that the planner uses the index.
IN_CHUNK = 500


def chunks(items: Sequence[T], size: int = IN_CHUNK) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def dialect_insert(dialect: Dialect, table: Table) -> sqlite.Insert | postgresql.Insert:
    """An INSERT supporting ON CONFLICT for the given backend."""
    if dialect == "sqlite":
        return sqlite.insert(table)
    return postgresql.insert(table)
