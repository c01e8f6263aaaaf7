"""fleetctl ui's API: FleetService over the operator's gRPC connection, in the HTTP API's dialect.

A real manager (SQLite, mTLS) with simulated daemons; the console's app on a
real uvicorn socket on 127.0.0.1, its stub dialing the manager as alice;
httpx as the browser (logged in with the one-time secret, sending the
console's Origin). The console's own guards (secret, Host, Origin, CSP) are
tested in tests/browser/.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fleet_harness import Env, fleet_env, operator_stub
from google.protobuf import json_format

from fleet.listen import listen_sockets
from fleet.v1 import fleet_pb2
from fleetctl.client import Connection
from fleetctl.ui.app import ConsoleApp
from fleetctl.ui.command import allowed_hosts, start_server

SERVICE = "/v1/fleet.v1.FleetService"


@dataclass
class Console:
    env: Env
    app: ConsoleApp
    http: httpx.AsyncClient

    async def call(self, method: str, body: Any = None, **kw: Any) -> httpx.Response:
        return await self.http.post(
            f"{SERVICE}/{method}",
            content=json.dumps({} if body is None else body),
            headers={"content-type": "application/json", **kw.pop("headers", {})},
            **kw,
        )


@asynccontextmanager
async def serve(env: Env, manager_address: str, pki: Any) -> AsyncIterator[Console]:
    """The console's app serving on 127.0.0.1:0, calling `manager_address` as alice."""
    alice = pki.issue("operator", "alice")
    conn = Connection(
        address=manager_address,
        tls=alice,
        server_name=f"manager.{pki.trust_domain}",
        timeout=5.0,
        identity="operator/alice",
    )
    sockets = listen_sockets("--listen", "127.0.0.1:0")
    for sock in sockets:
        sock.setblocking(False)
    port = sockets[0].getsockname()[1]
    async with operator_stub(pki, int(manager_address.rpartition(":")[2])) as stub:
        app = ConsoleApp(stub, conn, port=port, allowed_hosts=allowed_hosts("127.0.0.1", port))
        server = await start_server(app, sockets)
        base = f"http://127.0.0.1:{port}"
        http = httpx.AsyncClient(base_url=base, headers={"origin": base}, timeout=30)
        try:
            login = await http.get(f"/login?secret={app.sessions.secret}")
            assert login.status_code == 303, login.text
            yield Console(env, app, http)
        finally:
            await http.aclose()
            await server.shutdown(sockets=sockets)
            for sock in sockets:
                sock.close()


@asynccontextmanager
async def console(pki: Any, tmp_path: Path) -> AsyncIterator[Console]:
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("n1", "n2", labels={"env": "prod"})
        async with serve(env, env.address, pki) as c:
            yield c


async def test_a_unary_call_answers_what_grpc_answers_as_proto3_json(
    pki: Any, tmp_path: Path
) -> None:
    async with console(pki, tmp_path) as c:
        resp = await c.call("GetNode", {"nodeId": "n1"})
        assert resp.status_code == 200, resp.text
        direct = await c.env.stub.GetNode(fleet_pb2.FleetServiceGetNodeRequest(node_id="n1"))
        got, want = resp.json()["node"], json_format.MessageToDict(direct)["node"]
        # The heartbeat moves between the two calls; everything else is the same.
        assert {k: v for k, v in got.items() if k != "lastHeartbeat"} == {
            k: v for k, v in want.items() if k != "lastHeartbeat"
        }


async def test_errors_keep_their_status_message_and_resource(pki: Any, tmp_path: Path) -> None:
    async with console(pki, tmp_path) as c:
        missing = await c.call("GetNode", {"nodeId": "ghost"})
        assert missing.status_code == 404
        body = missing.json()
        assert body["code"] == "NOT_FOUND"
        assert "ghost" in body["message"]
        assert body["metadata"]["fleet-resource-kind"] == "node"

        unknown_field = await c.call("GetNode", {"nodeID": "n1"})
        assert unknown_field.status_code == 400
        assert "nodeID" in unknown_field.json()["message"]

        not_json = await c.http.post(
            f"{SERVICE}/ListNodes", content="{}", headers={"content-type": "text/plain"}
        )
        assert not_json.status_code == 400
        assert "Content-Type" in not_json.json()["message"]


async def test_a_label_change_is_made_and_audited_as_the_operator(pki: Any, tmp_path: Path) -> None:
    async with console(pki, tmp_path) as c:
        resp = await c.call("UpdateNodeLabels", {"nodeId": "n1", "set": {"team": "core"}})
        assert resp.status_code == 200, resp.text
        node = await c.env.stub.GetNode(fleet_pb2.FleetServiceGetNodeRequest(node_id="n1"))
        assert node.node.labels["team"] == "core"
        events = c.env.stub.WatchEvents(
            fleet_pb2.FleetServiceWatchEventsRequest(
                kinds=[fleet_pb2.EVENT_KIND_NODE_LABELS_UPDATED], tail=1
            )
        )
        (event,) = [m.event async for m in events]
        assert event.actor == "operator/alice"


async def test_a_followed_stream_delivers_events_as_they_happen(pki: Any, tmp_path: Path) -> None:
    async with (
        console(pki, tmp_path) as c,
        c.http.stream(
            "POST",
            f"{SERVICE}/WatchEvents",
            content=json.dumps({"follow": True, "tail": 0}),
            headers={"content-type": "application/json"},
        ) as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        lines = resp.aiter_lines()
        await c.env.stub.UpdateNodeLabels(
            fleet_pb2.FleetServiceUpdateNodeLabelsRequest(node_id="n2", set={"tier": "db"})
        )
        line = await asyncio.wait_for(anext(lines), 10)
        event = json.loads(line)["result"]["event"]
        assert event["kind"] == "EVENT_KIND_NODE_LABELS_UPDATED"
        assert event["nodeId"] == "n2"


async def test_a_stream_refused_before_its_first_message_is_an_http_status(
    pki: Any, tmp_path: Path
) -> None:
    async with console(pki, tmp_path) as c:
        resp = await c.call("ReadAgentLog", {"nodeId": "ghost", "agentId": "a"})
        assert resp.status_code == 404, resp.text
        assert resp.json()["code"] == "NOT_FOUND"


async def test_a_manager_that_went_away_is_said_in_words(pki: Any, tmp_path: Path) -> None:
    async with fleet_env(pki, tmp_path) as env:
        address = env.address
        async with serve(env, address, pki) as c:
            await env.manager.stop(0.1)
            resp = await c.call("ListNodes", headers={"connect-timeout-ms": "3000"})
            assert resp.status_code in (503, 504), resp.text
            body = resp.json()
            assert f"manager at {address}" in body["message"], body
