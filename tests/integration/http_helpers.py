"""Helpers for the JSON/HTTP API tests: a real manager serving [http], HTTPS clients."""

from __future__ import annotations

import dataclasses
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fleet_harness import FAST_POOL, operator_stub
from manager_harness import FakeClock, manager_config, running_manager

from bench.sim import SimFleet
from fleet.tls import TLSConfig
from fleet.v1 import fleet_pb2_grpc
from manager.config import HttpConfig
from manager.server import ManagerServer

SERVICE = "/v1/fleet.v1.FleetService"
"""Every FleetService route starts with this."""


def https_client(pki: Any, port: int, tls: TLSConfig | None) -> httpx.AsyncClient:
    """An httpx client for the manager's HTTP port, with `tls`'s client certificate (or none)."""
    ca = pki.issue("operator", "ca-reader").ca_file if tls is None else tls.ca_file
    ctx = ssl.create_default_context(cafile=str(ca))
    if tls is not None:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return httpx.AsyncClient(
        base_url=f"https://127.0.0.1:{port}", verify=ctx, timeout=httpx.Timeout(30.0)
    )


@dataclass
class HttpEnv:
    """A manager with the HTTP API on, simulated daemons, alice over HTTPS and over gRPC."""

    manager: ManagerServer
    fleet: SimFleet
    http: httpx.AsyncClient
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

    async def call(self, method: str, body: Any = None, **kw: Any) -> httpx.Response:
        """POST `body` (JSON) to the method's route as alice."""
        return await post(self.http, method, body, **kw)

    def client(self, role: str, name: str) -> httpx.AsyncClient:
        """Another HTTPS client speaking as <role>/<name>."""
        return https_client(self.pki, self.manager.http_port or 0, self.pki.issue(role, name))


async def post(
    client: httpx.AsyncClient, method: str, body: Any = None, **kw: Any
) -> httpx.Response:
    """POST `body` as JSON to FleetService's `method` route."""
    content = json.dumps({} if body is None else body)
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return await client.post(f"{SERVICE}/{method}", content=content, headers=headers, **kw)


@asynccontextmanager
async def http_env(pki: Any, tmp_path: Path, **http: Any) -> AsyncIterator[HttpEnv]:
    """A manager on SQLite with [http] on 127.0.0.1:0 (`http`: more [http] keys)."""
    config = manager_config(
        pki,
        f"sqlite+aiosqlite:///{tmp_path / 'm.db'}",
        tmp_path / "state",
        # Join tokens need somewhere to enroll; nothing listens there in these tests.
        enroll={"advertise_address": "manager.example:7445"},
    )
    config = dataclasses.replace(
        config, pool=FAST_POOL, http=HttpConfig(listen="127.0.0.1:0", **http)
    )
    async with running_manager(config, FakeClock()) as manager:
        assert manager.http_port
        fleet = await SimFleet.start(pki.ca, tmp_path / "sims")
        client = https_client(pki, manager.http_port, pki.issue("operator", "alice"))
        try:
            async with operator_stub(pki, manager.port) as stub:
                yield HttpEnv(manager, fleet, client, stub, pki)
        finally:
            await client.aclose()
            await fleet.close()
