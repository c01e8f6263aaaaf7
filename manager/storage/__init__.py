"""The manager's storage: SQLite or PostgreSQL through SQLAlchemy async.

No protobuf here; records are plain dataclasses (`records`). Open a
`Database`, `await db.migrate()` (or `check_schema()`), then use the
repositories. See manager/storage/README.md for the schema and semantics.
"""

from manager.storage.agents import AgentStateRepository
from manager.storage.audit import AuditRecord, AuditRepository
from manager.storage.db import Database, Dialect
from manager.storage.events import EventRepository
from manager.storage.metrics import MetricStore
from manager.storage.nodes import NodeRepository
from manager.storage.records import (
    EVENT_KINDS,
    AgentStateRecord,
    EventRecord,
    MetricBatch,
    MetricSample,
    MetricSeries,
    NodeLabels,
    NodeReach,
    NodeRecord,
)
from manager.storage.writer import MetricWriter

__all__ = [
    "EVENT_KINDS",
    "AgentStateRecord",
    "AgentStateRepository",
    "AuditRecord",
    "AuditRepository",
    "Database",
    "Dialect",
    "EventRecord",
    "EventRepository",
    "MetricBatch",
    "MetricSample",
    "MetricSeries",
    "MetricStore",
    "MetricWriter",
    "NodeLabels",
    "NodeReach",
    "NodeRecord",
    "NodeRepository",
]
