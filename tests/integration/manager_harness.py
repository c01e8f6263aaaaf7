"""Helpers for manager tests: a real ManagerServer over mTLS and node clients."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from fleet.tls import TLSConfig, channel_credentials, channel_options
from fleet.v1 import manager_pb2, manager_pb2_grpc
from manager.config import (
    ControlConfig,
    DatabaseConfig,
    EnrollConfig,
    LivenessConfig,
    ManagerConfig,
    MetricsConfig,
    ServerConfig,
    TLSFiles,
)
from manager.server import ManagerServer
from manager.storage import NodeRecord


class FakeClock:
    """A settable wall clock (seconds); starts at the real time.

    `monotonic` is its monotonic clock: `advance` moves both (time passes), `step`
    only the wall clock (an NTP correction, `date -s`). Give it to the manager as
    `monotonic=clock.monotonic` to let it see steps.
    """

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now
        self.mono = 1000.0

    def __call__(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds

    def step(self, seconds: float) -> None:
        self.now += seconds

    def ms(self) -> int:
        return int(self.now * 1000)


def manager_config(
    pki: Any,
    database_url: str,
    state_dir: Path,
    *,
    liveness: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    control: dict[str, Any] | None = None,
    enroll: dict[str, Any] | None = None,
) -> ManagerConfig:
    """A config for a test manager on 127.0.0.1:0 with a fresh manager cert
    (`enroll`: [enroll] keys, e.g. from enroll_helpers.enroll_settings)."""
    tls: TLSConfig = pki.issue("manager", "m1", hostnames=("localhost",), ips=("127.0.0.1",))
    liv = LivenessConfig(sweep_interval_seconds=3600.0, failover_grace_seconds=60.0)
    return ManagerConfig(
        state_dir=state_dir,
        server=dataclasses.replace(
            ServerConfig(listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"), **(server or {})
        ),
        tls=TLSFiles(ca_file=tls.ca_file, cert_file=tls.cert_file, key_file=tls.key_file),
        database=DatabaseConfig(url=database_url),
        liveness=dataclasses.replace(liv, **(liveness or {})),
        metrics=dataclasses.replace(MetricsConfig(), **(metrics or {})),
        control=dataclasses.replace(ControlConfig(), **(control or {})),
        enroll=EnrollConfig(**(enroll or {})),
    )


@asynccontextmanager
async def running_manager(
    config: ManagerConfig, clock: Callable[[], float] | None = None, **options: Any
) -> AsyncIterator[ManagerServer]:
    """A started ManagerServer (`options`: its keyword options), stopped afterwards."""
    server = ManagerServer(config, clock=clock or FakeClock(), **options)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(1.0)


@asynccontextmanager
async def node_stub(
    pki: Any, name: str, port: int, *, role: str = "node"
) -> AsyncIterator[manager_pb2_grpc.ManagerServiceStub]:
    """A ManagerService stub speaking as <role>/<name> over mTLS."""
    tls: TLSConfig = pki.issue(role, name)
    channel = aio.secure_channel(
        f"127.0.0.1:{port}",
        channel_credentials(tls),
        options=channel_options(f"manager.{pki.trust_domain}"),
    )
    try:
        yield manager_pb2_grpc.ManagerServiceStub(channel)
    finally:
        await channel.close()


def node_record(node_id: str = "node-1", **changes: Any) -> NodeRecord:
    """A NodeRecord as a daemon would register it, with fields changed."""
    base = NodeRecord(
        node_id=node_id,
        hostname=f"{node_id}.example",
        ip="10.0.0.1",
        os="linux",
        arch="x86_64",
        labels={"zone": "a"},
        daemon_version="1.0.0",
        agent_version="1.0.0",
        daemon_address="10.0.0.1:7443",
    )
    return dataclasses.replace(base, **changes)


def registration(node_id: str, **overrides: Any) -> manager_pb2.RegisterNodeRequest:
    """A valid RegisterNodeRequest with fields overridden."""
    fields: dict[str, Any] = {
        "node_id": node_id,
        "hostname": f"{node_id}.example.com",
        "ip": "10.0.0.7",
        "os": "linux",
        "arch": "x86_64",
        "labels": {"env": "prod", "example.com/tier": "web"},
        "daemon_version": "0.1.0",
        "agent_version": "0.1.0",
        "daemon_address": "10.0.0.7:7444",
    }
    fields.update(overrides)
    return manager_pb2.RegisterNodeRequest(**fields)


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    """Await `call` and return the AioRpcError it must raise."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call succeeded but an error was expected")
