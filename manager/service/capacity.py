"""Placement candidates with their room, from the host metrics the daemons report.

A daemon reports its host every metrics interval (daemon/convert.py): type
"cpu" with `usage_percent` (of all cores) and `cores`, type "memory" with
`total_bytes` and `used_bytes`. A node's capacity is cores x 1000
millicores and its total memory; what is in use is the average over the
last `window` seconds. A node with no host sample in that window has no
known capacity (placement uses it last, and never for an instance that
requests resources).

`HostCapacity` reads them with one grouped query over the recent end of the
metric_samples time index for all the nodes at once, and from the database
rather than from what this replica's ReportMetrics saw: with several
replicas, the one converging does not receive every node's metrics.
`candidates` turns the figures into Candidates (pure).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from manager.service.placement import Candidate, Resources
from manager.storage import NodeRecord
from manager.storage.metrics import MetricStore

__all__ = ["HOST_VALUES", "HostCapacity", "HostFigures", "candidates"]

CPU_USAGE = ("cpu", "usage_percent")
CPU_CORES = ("cpu", "cores")
MEMORY_TOTAL = ("memory", "total_bytes")
MEMORY_USED = ("memory", "used_bytes")
HOST_VALUES = (CPU_USAGE, CPU_CORES, MEMORY_TOTAL, MEMORY_USED)
"""The host (type, value name) pairs placement reads."""

HostFigures = Mapping[tuple[str, str], tuple[float, float]]
"""(type, name) -> (average, largest) over the window, for one node."""


def candidates(
    matching: Sequence[NodeRecord], figures: Mapping[str, HostFigures]
) -> list[Candidate]:
    """The matching nodes as placement candidates, with room where their figures say (pure).

    Capacity takes the largest `cores` and `total_bytes` of the window (they
    only change with the hardware); use is the window's average. A node
    needs both a cpu and a memory capacity to have one.
    """
    out = []
    for n in matching:
        f = figures.get(n.node_id, {})
        capacity, used = None, Resources()
        if CPU_CORES in f and MEMORY_TOTAL in f:
            millicores = round(f[CPU_CORES][1] * 1000)
            capacity = Resources(millicores, round(f[MEMORY_TOTAL][1]))
            used = Resources(
                round(f.get(CPU_USAGE, (0.0, 0.0))[0] / 100 * millicores),
                round(f.get(MEMORY_USED, (0.0, 0.0))[0]),
            )
        out.append(
            Candidate(
                n.node_id,
                n.labels,
                n.status == "online",
                offline_since=n.last_seen_ms / 1000,
                capacity=capacity,
                used=used,
            )
        )
    return out


class HostCapacity:
    """The manager's candidates provider: host figures of the last `window` seconds."""

    def __init__(
        self, store: MetricStore, *, clock: Callable[[], float], window: float = 60.0
    ) -> None:
        self._store = store
        self._clock = clock
        self._window = window

    async def __call__(self, matching: Sequence[NodeRecord]) -> list[Candidate]:
        """Candidates for `matching`, their room from one query."""
        if not matching:
            return []
        since_ms = int((self._clock() - self._window) * 1000)
        figures = await self._store.host_figures(since_ms=since_ms, names=HOST_VALUES)
        return candidates(matching, figures)
