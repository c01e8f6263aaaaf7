"""The manager's storage: SQLite or PostgreSQL through SQLAlchemy async.

No protobuf here; records are plain dataclasses (`records`). Open a
`Database`, `await db.migrate()` (or `check_schema()`), then use the
repositories. See manager/storage/README.md for the schema and semantics.
"""

from manager.storage.db import Database, Dialect
from manager.storage.events import EventRepository
from manager.storage.nodes import NodeRepository
from manager.storage.records import (
    EVENT_KINDS,
    AgentStateRecord,
    EventRecord,
    MetricBatch,
    MetricSample,
    NodeRecord,
)

__all__ = [
    "EVENT_KINDS",
    "AgentStateRecord",
    "Database",
    "Dialect",
    "EventRecord",
    "EventRepository",
    "MetricBatch",
    "MetricSample",
    "NodeRecord",
    "NodeRepository",
]
