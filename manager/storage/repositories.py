"""Every repository in one import (they live in one module per concern)."""

from manager.storage.agents import AgentStateRepository
from manager.storage.audit import AuditRecord, AuditRepository
from manager.storage.events import EventRepository
from manager.storage.metrics import MetricStore
from manager.storage.nodes import NodeRepository
from manager.storage.writer import MetricWriter

__all__ = [
    "AgentStateRepository",
    "AuditRecord",
    "AuditRepository",
    "EventRepository",
    "MetricStore",
    "MetricWriter",
    "NodeRepository",
]
