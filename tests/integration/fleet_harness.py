"""Helpers for FleetService tests: a real manager, simulated daemons, an operator client."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpc import aio
from manager_harness import FakeClock, manager_config, running_manager

from bench.sim import SimFleet
from fleet.retry import Backoff
from fleet.selectors import parse, to_proto
from fleet.tls import channel_credentials, channel_options
from fleet.v1 import common_pb2, fleet_pb2, fleet_pb2_grpc
from manager.pool import PoolConfig
from manager.server import ManagerServer

FAST_POOL = PoolConfig(
    call_timeout=3.0,
    connect_timeout=1.0,
    retry=Backoff(initial=0.05, multiplier=2.0, maximum=0.2),
    max_attempts=2,
)
"""Short deadlines so a dead daemon fails its target quickly in tests."""

PROD = {"env": "prod"}
"""Labels of the production nodes most tests select."""


@dataclass
class Env:
    """A running manager, its simulated daemons and an operator's FleetService stub."""

    manager: ManagerServer
    fleet: SimFleet
    stub: fleet_pb2_grpc.FleetServiceStub
    pki: Any

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.manager.port}"

    async def add_nodes(self, *names: str, labels: dict[str, str], **behaviour: Any) -> None:
        """Start and register simulated daemons."""
        for name in names:
            node = await self.fleet.add(name, labels=labels, **behaviour)
            await node.register(self.address, self.pki.trust_domain)


@asynccontextmanager
async def operator_stub(
    pki: Any, port: int, *, role: str = "operator", name: str = "alice"
) -> AsyncIterator[fleet_pb2_grpc.FleetServiceStub]:
    """A FleetService stub speaking as <role>/<name> over mTLS."""
    tls = pki.issue(role, name)
    channel = aio.secure_channel(
        f"127.0.0.1:{port}",
        channel_credentials(tls),
        options=channel_options(f"manager.{pki.trust_domain}"),
    )
    try:
        yield fleet_pb2_grpc.FleetServiceStub(channel)
    finally:
        await channel.close(None)


@asynccontextmanager
async def fleet_env(
    pki: Any, tmp_path: Path, *, pool: PoolConfig = FAST_POOL
) -> AsyncIterator[Env]:
    """A manager on SQLite with a fast pool, an empty SimFleet, and alice's stub."""
    config = manager_config(pki, f"sqlite+aiosqlite:///{tmp_path / 'm.db'}", tmp_path / "state")
    config = dataclasses.replace(config, pool=pool)
    async with running_manager(config, FakeClock()) as manager:
        fleet = await SimFleet.start(pki.ca, tmp_path / "sims")
        try:
            async with operator_stub(pki, manager.port) as stub:
                yield Env(manager, fleet, stub, pki)
        finally:
            await fleet.close()


def selector(text: str) -> common_pb2.LabelSelector:
    """The LabelSelector message for Kubernetes selector text."""
    return to_proto(parse(text))


async def operate(
    stub: fleet_pb2_grpc.FleetServiceStub, **fields: Any
) -> tuple[list[fleet_pb2.TargetResult], fleet_pb2.OperationSummary]:
    """Run OperateAgents; its per-target results and the summary (always last).

    Checks the message shapes: `result` one per message, or with
    batch_results non-empty `results` lists (never both).
    """
    results, summary, _ = await operate_messages(stub, **fields)
    return results, summary


async def operate_messages(
    stub: fleet_pb2_grpc.FleetServiceStub, **fields: Any
) -> tuple[list[fleet_pb2.TargetResult], fleet_pb2.OperationSummary, list[int]]:
    """`operate`, plus how many results each message before the summary carried."""
    fields.setdefault("operation", common_pb2.AGENT_OPERATION_RESTART)
    batched = bool(fields.get("batch_results"))
    results: list[fleet_pb2.TargetResult] = []
    sizes: list[int] = []
    summary = None
    async for msg in stub.OperateAgents(fleet_pb2.FleetServiceOperateAgentsRequest(**fields)):
        assert summary is None, "nothing may follow the summary"
        if msg.HasField("summary"):
            assert not msg.results
            summary = msg.summary
        elif batched:
            assert msg.WhichOneof("item") is None
            assert msg.results, "a batch is never empty"
            results.extend(msg.results)
            sizes.append(len(msg.results))
        else:
            assert msg.HasField("result")
            assert not msg.results, "results only for clients that asked for batches"
            results.append(msg.result)
            sizes.append(1)
    assert summary is not None, "the stream must end with a summary"
    return results, summary, sizes


def outcomes(results: list[fleet_pb2.TargetResult]) -> dict[str, str]:
    """node_id -> outcome name (OK, FAILED, SKIPPED, PLANNED)."""
    return {
        r.node_id: fleet_pb2.TargetOutcome.Name(r.outcome).removeprefix("TARGET_OUTCOME_")
        for r in results
    }
