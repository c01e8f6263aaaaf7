"""Metric ingestion (ReportMetrics), the query the operator API exposes, and what a
node has reported (ListMetricTypes).

`metric_types` and `missing_metric` are pure: they summarise a node's
series, and say in words what a query asked for that the node never
reported, so a typo in a type is not "no data in this range".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Literal

from fleet.clockskew import METRICS_MAX_FUTURE_MS, offset_words
from fleet.errors import InvalidArgument
from fleet.labels import validate_label_value, validate_node_id
from manager.service.model import MetricPoint
from manager.service.registry import NodeRegistry
from manager.service.validation import metric_batch
from manager.storage.metrics import MetricStore
from manager.storage.records import MetricSeries
from manager.storage.writer import MetricWriter

__all__ = ["IngestResult", "MetricType", "MetricsService", "metric_types", "missing_metric"]

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


@dataclass(frozen=True)
class MetricType:
    """One metric type a node has reported, over the host and all its agents."""

    type: str
    """cpu, memory, disk, network or a custom type."""
    names: tuple[str, ...]
    """Its value names, sorted."""
    agent_ids: tuple[str, ...]
    """Agents that reported it, sorted (the host is `host`)."""
    host: bool
    """Whether the host itself (agent_id "") reported it."""
    newest_ms: int
    """Its newest sample's time."""


def metric_types(series: Sequence[MetricSeries]) -> list[MetricType]:
    """`series` summarised per type, sorted by type (pure)."""
    out = []
    for type_, group in groupby(sorted(series, key=lambda s: s.type), key=lambda s: s.type):
        items = list(group)
        agents = {s.agent_id for s in items}
        out.append(
            MetricType(
                type=type_,
                names=tuple(sorted({s.name for s in items})),
                agent_ids=tuple(sorted(agents - {""})),
                host="" in agents,
                newest_ms=max(s.newest_ms for s in items),
            )
        )
    return out


def missing_metric(
    series: Sequence[MetricSeries],
    *,
    node_id: str,
    agent_id: str,
    type: str,
    name: str,
    clock_offset_ms: int | None = None,
) -> str | None:
    """Why a query of (agent_id, type, name) on `node_id` found no data, or None (pure).

    None when the node has (had) that series and its clock agrees with ours: an empty
    answer then just means nothing fell in the range. A node whose clock is far ahead
    (`clock_offset_ms`) has its samples refused; one far behind stores them in the past.
    """
    off = clock_offset_ms or 0
    if off > METRICS_MAX_FUTURE_MS:
        return (
            f"{node_id}'s clock is {offset_words(off)}: its samples are refused (more than"
            f" {METRICS_MAX_FUTURE_MS // 60000} min ahead) and its daemon drops them; run NTP"
            " on the host (`fleetctl nodes show` says more)"
        )
    if not series:
        return f"{node_id} has no metrics stored (none reported yet, or all past retention)"
    mine = [s for s in series if s.agent_id == agent_id]
    if agent_id and not mine:
        agents = sorted({s.agent_id for s in series} - {""})
        return (
            f"agent {agent_id!r} on {node_id} has reported no metrics;"
            f" agents with metrics: {', '.join(agents) or 'none'}"
        )
    subject = f"agent {agent_id!r} on {node_id}" if agent_id else node_id
    types = sorted({s.type for s in mine})
    if type not in types:
        return f"{subject} has no metric type {type!r}; it has: {', '.join(types)}"
    names = sorted({s.name for s in mine if s.type == type})
    if name and name not in names:
        return f"{subject} has no {type} value {name!r}; it has: {', '.join(names)}"
    if off < -60_000:
        return (
            f"no samples in that range: {node_id}'s clock is {offset_words(off)}, so its"
            " samples are stored that far in the past; query a wider range, and run NTP"
            " on the host"
        )
    return None


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

    async def series(self, node_id: str) -> list[MetricSeries]:
        """Every series `node_id` has in the store (raw or rolled up)."""
        validate_node_id(node_id)
        return await self._store.series(node_id)

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
