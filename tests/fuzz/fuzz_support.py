"""What every fuzz example checks: the status code, and that a refusal wrote nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc import aio
from hypothesis import event, settings
from live_env import Outcome, invoke, rpc_name
from sqlalchemy import func, select

from daemon.server import DaemonServer
from manager.storage import Database
from manager.storage.schema import (
    agent_states,
    artifact_blobs,
    artifact_chunks,
    artifacts,
    assignments,
    definition_revisions,
    definitions,
    events,
    join_tokens,
    metric_batches,
    metric_samples,
    node_certificates,
    node_desired,
    node_revocations,
    nodes,
    operations_audit,
    rollout_nodes,
    rollouts,
)

FUZZ = settings(settings.get_profile("fleet-fuzz"))
"""The fuzz profile (see conftest) as a decorator."""

NEVER = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
"""Codes a client-caused error must never get (ARCHITECTURE.md §2)."""


async def call_checked(
    channel: aio.Channel,
    method: MethodDescriptor,
    request: Message,
    *,
    deadline: float = 15.0,
    idle: float = 0.3,
) -> Outcome:
    """Call and assert the answer is never UNKNOWN/INTERNAL (a bug, whatever we sent)."""
    outcome = await invoke(channel, method, request, deadline=deadline, idle=idle)
    event(outcome.code.name)  # pytest --hypothesis-show-statistics shows the mix
    assert outcome.code not in NEVER, (
        f"{rpc_name(method)} answered {outcome.code.name}: {outcome.details!r}\n"
        f"request: {request!r}"
    )
    # The status message itself too large for the client: the real error is lost.
    assert "metadata size exceeds" not in outcome.details, (
        f"{rpc_name(method)}: {outcome.details}\nrequest: {request!r}"
    )
    assert outcome.code != grpc.StatusCode.DEADLINE_EXCEEDED, (
        f"{rpc_name(method)} did not answer within {deadline}s\nrequest: {request!r}"
    )
    return outcome


async def db_state(db: Database) -> dict[str, Any]:
    """Everything a call could have written, comparable before/after.

    last_seen_ms and status are left out: the heartbeat buffer flushes
    accepted heartbeats in the background, whatever the call being checked.
    """
    node_cols = [c for c in nodes.c if c.name not in ("last_seen_ms", "status")]
    async with db.engine.connect() as conn:
        state: dict[str, Any] = {
            "nodes": (await conn.execute(select(*node_cols).order_by(nodes.c.node_id))).all(),
            "agent_states": (
                await conn.execute(
                    select(agent_states).order_by(agent_states.c.node_id, agent_states.c.agent_id)
                )
            ).all(),
        }
        for table in (definitions, definition_revisions, assignments, rollouts, rollout_nodes):
            key = list(table.primary_key.columns)
            state[table.name] = (await conn.execute(select(table).order_by(*key))).all()
        state["node_desired"] = (
            await conn.execute(
                select(*[c for c in node_desired.c if c.name != "updated_ms"]).order_by(
                    node_desired.c.node_id
                )
            )
        ).all()
        tables = (metric_samples, metric_batches, events, operations_audit)
        enrollment = (join_tokens, node_certificates, node_revocations)
        for table in (*tables, artifacts, artifact_blobs, artifact_chunks, *enrollment):
            count = (await conn.execute(select(func.count()).select_from(table))).scalar_one()
            state[table.name] = count
    return state


async def settled(db: Database, quiet: float = 0.4, within: float = 20.0) -> dict[str, Any]:
    """The database state once background work (convergence, rollouts) stops writing.

    An accepted definition or label change is acted on after the call returns;
    a later refusal must not be blamed for those writes.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    state = await db_state(db)
    while True:
        await asyncio.sleep(quiet)
        again = await db_state(db)
        if again == state:
            return state
        if loop.time() > deadline:
            raise AssertionError(f"the database kept changing for {within:.0f} s")
        state = again


def supervisor_state(daemon: DaemonServer) -> tuple[int, dict[str, Any]]:
    """A daemon's pushed version and every agent's spec: what a refused call must not change."""
    sup = daemon.supervisor
    return sup.version, {s.id: sup.spec(s.id) for s in sup.list()}
