"""Which metric series a node has: every (agent, type, name) in the store, and its newest time.

A GROUP BY over a node's rows would read all of them (a month of rollups is
about two million rows for a node with a few agents), so this walks the
indexes instead, a few index seeks per series whatever the volume:

- rollups: a loose index scan over the primary key (node_id, type,
  agent_id, name, bucket_ms) — "the next key after this one" until there is
  none — and max(bucket_ms) per key;
- raw samples: the node's types by a loose scan of the (node_id, type,
  ts_ms) index, and per type the series among its rows since the rollup
  watermark. Every sample below the watermark is in the rollups already
  (see `manager.storage.metrics`), so the two together list every series
  while reading only the last minutes of raw rows.

Both SQLite (3.15+ row values) and PostgreSQL use the indexes for these.
"""

from __future__ import annotations

from sqlalchemy import func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from manager.storage.records import MetricSeries
from manager.storage.schema import metric_rollups, metric_samples

__all__ = ["list_series"]

_Key = tuple[str, str, str]  # (type, agent_id, name)


async def list_series(conn: AsyncConnection, node_id: str, watermark: int) -> list[MetricSeries]:
    """Every series of `node_id` in the store, sorted by type, agent, name."""
    newest: dict[_Key, int] = {}
    for key in await _rollup_keys(conn, node_id):
        r = metric_rollups.c
        last = await conn.scalar(
            select(func.max(r.bucket_ms)).where(
                r.node_id == node_id, r.type == key[0], r.agent_id == key[1], r.name == key[2]
            )
        )
        newest[key] = int(last or 0)
    s = metric_samples.c
    for type_ in await _raw_types(conn, node_id):
        recent = await conn.execute(
            select(s.agent_id, s.name, func.max(s.ts_ms))
            .where(s.node_id == node_id, s.type == type_, s.ts_ms >= watermark)
            .group_by(s.agent_id, s.name)
        )
        for agent_id, name, last in recent:
            key = (type_, agent_id, name)
            newest[key] = max(newest.get(key, 0), int(last))
    return [
        MetricSeries(agent_id=a, type=t, name=n, newest_ms=ms)
        for (t, a, n), ms in sorted(newest.items())
    ]


async def _rollup_keys(conn: AsyncConnection, node_id: str) -> list[_Key]:
    r = metric_rollups.c
    keys: list[_Key] = []
    while True:
        query = select(r.type, r.agent_id, r.name).where(r.node_id == node_id)
        if keys:
            query = query.where(tuple_(r.type, r.agent_id, r.name) > tuple_(*keys[-1]))
        row = (await conn.execute(query.order_by(r.type, r.agent_id, r.name).limit(1))).first()
        if row is None:
            return keys
        keys.append((row.type, row.agent_id, row.name))


async def _raw_types(conn: AsyncConnection, node_id: str) -> list[str]:
    s = metric_samples.c
    types: list[str] = []
    while True:
        query = select(s.type).where(s.node_id == node_id)
        if types:
            query = query.where(s.type > types[-1])
        found = await conn.scalar(query.order_by(s.type).limit(1))
        if found is None:
            return types
        types.append(str(found))
