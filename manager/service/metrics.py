"""Metric ingestion (ReportMetrics) and the query the operator API exposes."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from fleet.errors import InvalidArgument
from fleet.labels import validate_label_value, validate_node_id
from manager.service.model import MetricPoint
from manager.service.registry import NodeRegistry
from manager.service.validation import metric_batch
from manager.storage.metrics import MetricStore
from manager.storage.writer import MetricWriter

__all__ = ["IngestResult", "MetricsService"]

Aggregate = Literal["avg", "min", "max"]
_AGGREGATES = ("avg", "min", "max")
_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,62}")
MAX_POINTS_PER_SERIES = 11_000
"""A query may not ask for more buckets than this per series."""


@dataclass(frozen=True)
class IngestResult:
    """The answer to one ReportMetrics."""

    stored: bool
    """False when the (node, sequence) batch had been stored before."""
    accepted: int
    """Samples in the batch (0 for a duplicate)."""


class MetricsService:
    """Validates metric batches, hands them to the writer, answers queries."""

    def __init__(
        self,
        registry: NodeRegistry,
        writer: MetricWriter,
        store: MetricStore,
        *,
        raw_retention_ms: int,
        max_samples: int,
        clock: Callable[[], float],
    ) -> None:
        self._registry = registry
        self._writer = writer
        self._store = store
        self._raw_ms = raw_retention_ms
        self._max_samples = max_samples
        self._clock = clock

    async def ingest(
        self, node_id: str, sequence: int, points: Sequence[MetricPoint]
    ) -> IngestResult:
        """Validate, then wait until the batch is committed (or was before).

        ResourceExhausted (queue full) propagates and nothing is stored.
        """
        batch = metric_batch(
            node_id,
            sequence,
            points,
            now_ms=int(self._clock() * 1000),
            max_past_ms=self._raw_ms,
            max_samples=self._max_samples,
        )
        await self._registry.require_known(node_id)
        stored = await self._writer.submit(batch)
        return IngestResult(stored, len(batch.samples) if stored else 0)

    async def query(
        self,
        *,
        node_id: str,
        agent_id: str = "",
        type: str,
        name: str = "",
        start_ms: int,
        end_ms: int,
        step_s: int,
        aggregate: str = "avg",
    ) -> dict[str, list[tuple[int, float]]]:
        """Bucketed series per value name; rollups are used when the step allows."""
        validate_node_id(node_id)
        if agent_id:
            validate_label_value(agent_id, field="agent_id")
        if not _NAME.fullmatch(type):
            raise InvalidArgument(f"{type[:80]!r} is not a metric type", field="type")
        if name and not _NAME.fullmatch(name):
            raise InvalidArgument(f"{name[:80]!r} is not a value name", field="name")
        if start_ms < 0 or end_ms <= start_ms:
            raise InvalidArgument(f"range [{start_ms}, {end_ms}) is empty or negative", field="end")
        if step_s <= 0:
            raise InvalidArgument(
                f"must be a positive number of seconds, got {step_s}", field="step_seconds"
            )
        if (end_ms - start_ms) // (step_s * 1000) > MAX_POINTS_PER_SERIES:
            raise InvalidArgument(
                f"range/step gives more than {MAX_POINTS_PER_SERIES} points; use a larger step",
                field="step_seconds",
            )
        if aggregate not in _AGGREGATES:
            raise InvalidArgument(
                f"must be one of avg, min, max, got {aggregate!r}", field="aggregate"
            )
        agg: Aggregate = "avg" if aggregate == "avg" else "min" if aggregate == "min" else "max"
        return await self._store.query(
            node_id=node_id,
            agent_id=agent_id,
            type=type,
            name=name,
            start_ms=start_ms,
            end_ms=end_ms,
            step_s=step_s,
            aggregate=agg,
        )
