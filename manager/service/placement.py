"""Placement by count: which nodes run a definition that asks for `count` instances.

A pure function of the candidates (the nodes the definition's selector
matches, with their capacity, measured use and what Fleet already reserved
on them), the instances placed now, and `now`. It keeps instances where they
are whenever it can (moving a running agent is never free), and places the
missing ones on the nodes with the most room:

- A node's free room is its capacity minus the larger of what its host
  metrics say is in use and what the definitions placed on it declared
  (`resources` requests). Taking the larger avoids counting a placed agent
  twice, once by its use and once by its request, while still honouring a
  request its agent does not use yet.
- A new instance goes only where its requests fit. The best node is the one
  with the largest free fraction of its scarcer resource; a node without
  host metrics yet is used last, and only when nothing is requested.
- With `spread = "zone"`, each new instance goes to the zone (label value;
  nodes without the label form their own group) that has the fewest
  instances, then the best node there.
- An instance on a node that has been offline longer than
  `reschedule_after` is placed elsewhere; one offline for less stays.
- With fewer instances wanted than placed, the extra ones go from the most
  crowded group, the node with the least room first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Candidate", "Placement", "PlacementRequest", "Resources", "place", "reservations"]


@dataclass(frozen=True)
class Resources:
    """CPU and memory, as requested by an agent or free on a node."""

    cpu_millicores: int = 0
    """Thousandths of a core."""
    memory_bytes: int = 0
    """Bytes of memory."""


@dataclass(frozen=True)
class Candidate:
    """A node the definition's selector matches, with what is known of its room."""

    node_id: str
    """The node."""
    labels: Mapping[str, str]
    """Its effective labels (for spread)."""
    online: bool = True
    """The node is online."""
    offline_since: float = 0.0
    """When it went offline (when not online)."""
    capacity: Resources | None = None
    """Cores x 1000 and total memory from its host metrics; None before the first report."""
    used: Resources = Resources()
    """What its host metrics say is in use (recent average)."""
    reserved: Resources = Resources()
    """The requests of the other definitions' instances placed on it."""

    def free(self) -> Resources | None:
        """Room left for a new instance; None when the capacity is unknown."""
        if self.capacity is None:
            return None
        return Resources(
            self.capacity.cpu_millicores
            - max(self.used.cpu_millicores, self.reserved.cpu_millicores),
            self.capacity.memory_bytes - max(self.used.memory_bytes, self.reserved.memory_bytes),
        )


@dataclass(frozen=True)
class PlacementRequest:
    """What a `count` definition asks for."""

    count: int
    """Instances wanted."""
    requests: Resources = Resources()
    """Room one instance needs."""
    spread: str = ""
    """Spread the instances over the values of this label; empty: no spread."""
    reschedule_after: float = 300.0
    """Seconds a node may be offline before its instance is placed elsewhere."""


@dataclass(frozen=True)
class Placement:
    """The nodes that should run an instance, and why some could not be placed."""

    nodes: tuple[str, ...]
    """Sorted node ids."""
    added: tuple[str, ...]
    """Nodes that get a new instance."""
    removed: tuple[str, ...]
    """Nodes that lose theirs (moved away, or fewer wanted)."""
    unplaced: int = 0
    """Instances wanted that fit nowhere."""
    reason: str = ""
    """Why `unplaced` is not 0, in words."""


def place(
    request: PlacementRequest,
    candidates: Sequence[Candidate],
    current: Collection[str],
    now: float,
) -> Placement:
    """Where `request.count` instances go (see the module docstring)."""
    if request.count < 0:
        raise ValueError(f"count must be >= 0, got {request.count}")
    by_id = {c.node_id: c for c in candidates}
    keep = [
        n
        for n in sorted(current)
        if n in by_id
        and (by_id[n].online or now - by_id[n].offline_since < request.reschedule_after)
    ]
    groups: Counter[str] = Counter(_group(by_id[n], request.spread) for n in keep)
    while len(keep) > request.count:
        crowded = max(groups.values())
        victim = min(
            (n for n in keep if groups[_group(by_id[n], request.spread)] == crowded),
            key=lambda n: (_score(by_id[n]), n),
        )
        keep.remove(victim)
        groups[_group(by_id[victim], request.spread)] -= 1

    added: list[str] = []
    fits = [
        c for c in candidates if c.online and c.node_id not in keep and _fits(c, request.requests)
    ]
    while len(keep) + len(added) < request.count and fits:
        best = min(
            fits,
            key=lambda c: (
                groups[_group(c, request.spread)] if request.spread else 0,
                -_score(c),
                c.node_id,
            ),
        )
        fits.remove(best)
        added.append(best.node_id)
        groups[_group(best, request.spread)] += 1

    chosen = sorted({*keep, *added})
    unplaced = request.count - len(chosen)
    reason = _why_unplaced(request, candidates, unplaced) if unplaced else ""
    return Placement(
        nodes=tuple(chosen),
        added=tuple(sorted(added)),
        removed=tuple(sorted(set(current) - set(chosen))),
        unplaced=unplaced,
        reason=reason,
    )


def _group(c: Candidate, spread: str) -> str:
    return c.labels.get(spread, "") if spread else ""


def _fits(c: Candidate, want: Resources) -> bool:
    free = c.free()
    if free is None:
        return want.cpu_millicores == 0 and want.memory_bytes == 0
    return free.cpu_millicores >= want.cpu_millicores and free.memory_bytes >= want.memory_bytes


def _score(c: Candidate) -> float:
    """The free fraction of the node's scarcer resource; -1 when unknown (used last)."""
    free = c.free()
    if free is None or c.capacity is None:
        return -1.0
    fractions = [
        f / total
        for f, total in (
            (free.cpu_millicores, c.capacity.cpu_millicores),
            (free.memory_bytes, c.capacity.memory_bytes),
        )
        if total > 0
    ]
    return min(fractions) if fractions else -1.0


def _why_unplaced(request: PlacementRequest, candidates: Sequence[Candidate], unplaced: int) -> str:
    head = f"{unplaced} of {request.count} instance(s) not placed"
    online = [c for c in candidates if c.online]
    if not candidates:
        return f"{head}: no node matches the selector"
    if not online:
        return f"{head}: every matching node is offline"
    lacking = [c for c in online if not _fits(c, request.requests)]
    if lacking:
        want = request.requests
        return (
            f"{head}: {len(lacking)} of {len(online)} online matching node(s) lack room for"
            f" {want.cpu_millicores}m CPU and {want.memory_bytes} bytes of memory"
        )
    return f"{head}: only {len(online)} matching node(s) are online (one instance per node)"


def reservations(
    placed: Iterable[tuple[str, str]], requests: Mapping[str, Resources], *, exclude: str
) -> dict[str, Resources]:
    """Per node, the sum of the requests of the instances placed on it, the definition
    `exclude` left out (its own instances are what is being placed).

    `placed` is (node id, definition name) pairs; `requests` each definition's.
    """
    out: dict[str, Resources] = {}
    for node_id, name in placed:
        want = requests.get(name)
        if name == exclude or want is None or want == Resources():
            continue
        have = out.get(node_id, Resources())
        out[node_id] = Resources(
            have.cpu_millicores + want.cpu_millicores, have.memory_bytes + want.memory_bytes
        )
    return out
