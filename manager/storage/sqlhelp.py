"""Small SQL helpers shared by the repositories (dialect-specific constructs)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite

from manager.storage.db import Dialect

__all__ = ["IN_CHUNK", "chunks", "dialect_insert", "grouped"]

T = TypeVar("T")
K = TypeVar("K")

# Bound parameters per IN (...) list: far below SQLite's 32766 and asyncpg's
# 32767 limits, and small enough that the planner uses the index.
IN_CHUNK = 500


def chunks(items: Sequence[T], size: int = IN_CHUNK) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def grouped(pairs: Iterable[tuple[K, T]]) -> dict[K, set[T]]:
    """The second items of `pairs` by their first (keys to query one IN list each)."""
    out: dict[K, set[T]] = {}
    for key, item in pairs:
        out.setdefault(key, set()).add(item)
    return out


def dialect_insert(dialect: Dialect, table: Table) -> sqlite.Insert | postgresql.Insert:
    """An INSERT supporting ON CONFLICT for the given backend."""
    if dialect == "sqlite":
        return sqlite.insert(table)
    return postgresql.insert(table)
