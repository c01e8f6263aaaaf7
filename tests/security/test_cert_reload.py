"""Certificate reload on the real manager: replaced files are used within a second."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
from live_env import ModulePki, invoke, live_manager, methods, open_channel

from fleet.pki import Identity
from fleet.tls import RELOAD_CHECK_SECONDS
from fleet.v1 import fleet_pb2

LIST_NODES = {m.name: m for m in methods("FleetService")}["ListNodes"]


async def list_nodes(port: int, creds: Any, server_name: str) -> grpc.StatusCode:
    """ListNodes over a fresh connection that insists on `server_name`."""
    channel = open_channel(port, creds, server_name)
    try:
        request = fleet_pb2.FleetServiceListNodesRequest()
        return (await invoke(channel, LIST_NODES, request)).code
    finally:
        await channel.close(None)


async def test_manager_serves_a_replaced_certificate_without_restart(
    pki: Any, tmp_path: Path
) -> None:
    """Writing a newly issued manager certificate over the files changes the handshakes
    from a second later on (the files are looked at that often)."""
    module_pki = ModulePki(pki.ca, tmp_path / "certs")
    operator = pki.issue("operator", "alice")
    m1 = Identity("manager", "m1", pki.trust_domain).server_name
    m2 = Identity("manager", "m2", pki.trust_domain).server_name
    async with live_manager(module_pki, tmp_path) as manager:
        cert_file = manager.config.tls.cert_file
        assert await list_nodes(manager.port, operator, m1) == grpc.StatusCode.OK
        assert await list_nodes(manager.port, operator, m2) == grpc.StatusCode.UNAVAILABLE

        pki.ca.issue("manager", "m2").write(cert_file.parent, stem=cert_file.stem)
        await asyncio.sleep(RELOAD_CHECK_SECONDS + 0.05)

        assert await list_nodes(manager.port, operator, m2) == grpc.StatusCode.OK
        assert await list_nodes(manager.port, operator, m1) == grpc.StatusCode.UNAVAILABLE
        # Every manager certificate carries manager.<td>: daemons and fleetctl keep working.
        name = f"manager.{pki.trust_domain}"
        assert await list_nodes(manager.port, operator, name) == grpc.StatusCode.OK
