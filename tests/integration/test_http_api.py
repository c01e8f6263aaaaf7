"""The JSON/HTTP API against a real manager over HTTPS with client certificates.

Each call runs the gRPC servicer itself, so answers are compared with what
gRPC answers for the same request, and mutations are checked through gRPC
and the audit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from artifact_helpers import push_requests
from fleet_harness import FAST_POOL, selector
from google.protobuf import json_format
from google.protobuf.message import Message
from http_helpers import SERVICE, HttpEnv, http_env, https_client, post
from job_helpers import command, job_daemons
from manager_harness import FakeClock, manager_config, node_stub, running_manager

from fleet.pki import CertificateAuthority
from fleet.v1 import common_pb2, desired_pb2, fleet_pb2, manager_pb2
from manager.config import HttpConfig

_METHODS = fleet_pb2.DESCRIPTOR.services_by_name["FleetService"].methods


def as_json(message: Message) -> Any:
    """What the HTTP API must answer for a gRPC response (the proto3 JSON mapping)."""
    return json_format.MessageToDict(message)


def definition(name: str = "web", sel: str = "env=prod") -> desired_pb2.Definition:
    return desired_pb2.Definition(
        name=name,
        selector=selector(sel),
        agent=common_pb2.AgentSpec(argv=["/usr/bin/web", "--port", "80"], version="1.0"),
        update=desired_pb2.UpdatePolicy(
            min_healthy_time_seconds=0.0,
            healthy_deadline_seconds=60.0,
            progress_deadline_seconds=120.0,
        ),
    )


async def lines(response: httpx.Response) -> list[Any]:
    return [json.loads(line) async for line in response.aiter_lines() if line]


async def test_every_route_reaches_the_servicer(pki: Any, tmp_path: Path) -> None:
    """Each FleetService RPC has its POST route and the handler answers (an empty request)."""
    async with http_env(pki, tmp_path) as env:
        for m in _METHODS:
            async with env.http.stream(
                "POST",
                f"{SERVICE}/{m.name}",
                content="{}",
                headers={"content-type": "application/json"},
            ) as r:
                body = (await r.aread()).decode()
            if m.client_streaming:
                assert r.status_code == 501, m.name
                assert "gRPC" in json.loads(body)["message"]
                continue
            assert r.status_code in (200, 400, 404, 409), (m.name, r.status_code, body)
            assert "no such method" not in body, m.name
            if r.status_code == 200 and m.server_streaming:
                assert r.headers["content-type"] == "application/x-ndjson"
                assert all("result" in json.loads(x) for x in body.splitlines()), m.name
            elif r.status_code != 200:
                assert set(json.loads(body)) >= {"code", "message"}, m.name


async def _seed(env: HttpEnv) -> dict[str, str]:
    """Two nodes, a definition, an artifact and a join token; their ids."""
    await env.add_nodes("n1", "n2", labels={"env": "prod"})
    applied = await env.stub.ApplyDefinitions(
        # On no node: a rollout pushing to the nodes would change what the reads compare.
        fleet_pb2.FleetServiceApplyDefinitionsRequest(
            definitions=[definition(sel="env=nowhere")], message="m"
        )
    )
    await env.stub.PushArtifact(push_requests(b"payload", name="tool", version="2"))
    token = await env.stub.CreateJoinToken(
        fleet_pb2.FleetServiceCreateJoinTokenRequest(name_prefix="web-", ttl_seconds=600)
    )
    rollout_id = applied.changes[0].rollout_id
    for _ in range(200):  # on no node the rollout ends at once; the reads compare it ended
        got = await env.stub.GetRollout(
            fleet_pb2.FleetServiceGetRolloutRequest(name="web", rollout_id=rollout_id)
        )
        if got.rollout.state == desired_pb2.ROLLOUT_STATE_SUCCESSFUL:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"the seed rollout never ended: {got.rollout}")
    bucket = (env.manager.registry.now_ms() // 120_000 - 1) * 120_000
    samples = [
        common_pb2.MetricData(type="cpu", timestamp=bucket + i * 10_000, values={"usage": v})
        for i, v in enumerate([10.0, 20.5, 30.0])
    ]
    async with node_stub(env.pki, "n1", env.manager.port) as node:
        await node.ReportMetrics(
            manager_pb2.ReportMetricsRequest(node_id="n1", sequence=1, metrics=samples)
        )
    return {
        "rollout": str(rollout_id),
        "token": token.info.id,
        "bucket": str(bucket),
    }


async def test_reads_answer_what_grpc_answers(pki: Any, tmp_path: Path) -> None:
    """Every read RPC over HTTP gives the gRPC answer to the same request, as proto3 JSON."""
    async with http_env(pki, tmp_path) as env:
        ids = await _seed(env)
        F = fleet_pb2
        reads: list[tuple[str, Message]] = [
            ("ListNodes", F.FleetServiceListNodesRequest(selector=selector("env=prod"))),
            ("GetNode", F.FleetServiceGetNodeRequest(node_id="n1")),
            ("ListAgents", F.FleetServiceListAgentsRequest(node_id="n1")),
            ("ListMetricTypes", F.FleetServiceListMetricTypesRequest(node_id="n1")),
            (
                "QueryMetrics",
                F.FleetServiceQueryMetricsRequest(
                    node_id="n1",
                    type="cpu",
                    start_time=int(ids["bucket"]),
                    end_time=int(ids["bucket"]) + 120_000,
                    step_seconds=60,
                ),
            ),
            ("ListDefinitions", F.FleetServiceListDefinitionsRequest()),
            ("GetDefinition", F.FleetServiceGetDefinitionRequest(name="web")),
            ("ListDefinitionRevisions", F.FleetServiceListDefinitionRevisionsRequest(name="web")),
            ("ListRollouts", F.FleetServiceListRolloutsRequest(name="web")),
            ("ListArtifacts", F.FleetServiceListArtifactsRequest()),
            ("GetArtifact", F.FleetServiceGetArtifactRequest(name="tool", version="2")),
            ("ListJobs", F.FleetServiceListJobsRequest()),
            ("ListJoinTokens", F.FleetServiceListJoinTokensRequest()),
        ]
        for name, request in reads:
            grpc_answer = await getattr(env.stub, name)(request)
            r = await env.call(name, as_json(request))
            assert r.status_code == 200, (name, r.text)
            assert r.headers["content-type"] == "application/json"
            assert r.json() == as_json(grpc_answer), name
            if name in ("QueryMetrics", "ListMetricTypes"):
                assert r.json()[{"QueryMetrics": "series", "ListMetricTypes": "types"}[name]]
        # int64 as strings, enums as names, lowerCamel names.
        token = (await env.call("ListJoinTokens")).json()["tokens"][0]
        assert token["id"] == ids["token"]
        assert isinstance(token["expireTime"], str)
        assert token["namePrefix"] == "web-"
        node = (await env.call("GetNode", {"nodeId": "n1"})).json()["node"]
        assert node["status"] == "NODE_STATUS_ONLINE"
        rollout = await env.call("GetRollout", {"name": "web", "rolloutId": ids["rollout"]})
        assert rollout.status_code == 200, rollout.text
        assert rollout.json()["rollout"]["id"] == ids["rollout"]


async def test_watch_events_streams_each_event_as_a_line(pki: Any, tmp_path: Path) -> None:
    """A followed WatchEvents answers NDJSON and shows a label change as it happens."""
    async with http_env(pki, tmp_path) as env:
        await env.add_nodes("n1", labels={"env": "prod"})
        body = {"follow": True, "tail": 0, "kinds": ["EVENT_KIND_NODE_LABELS_UPDATED"]}
        async with env.http.stream(
            "POST",
            f"{SERVICE}/WatchEvents",
            json=body,
            headers={"content-type": "application/json"},
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == "application/x-ndjson"
            reading = r.aiter_lines()
            first = asyncio.ensure_future(anext(reading))
            await asyncio.sleep(0.2)
            assert not first.done(), "tail 0: nothing before the change"
            await env.stub.UpdateNodeLabels(
                fleet_pb2.FleetServiceUpdateNodeLabelsRequest(node_id="n1", set={"tier": "web"})
            )
            async with asyncio.timeout(10):
                line = json.loads(await first)
        event = line["result"]["event"]
        assert event["kind"] == "EVENT_KIND_NODE_LABELS_UPDATED"
        assert event["nodeId"] == "n1"
        assert event["actor"] == "operator/alice"


async def test_mutations_change_what_grpc_sees_and_are_audited_as_the_operator(
    pki: Any, tmp_path: Path
) -> None:
    """Labels, a definition, a job run and cancelled, a join token made and revoked: each as
    over gRPC, recorded as operator/alice."""
    async with http_env(pki, tmp_path) as env, job_daemons(pki, env.manager.port) as start:
        await start("j1", hold=True)
        await env.add_nodes("n1", labels={"env": "prod"})

        r = await env.call("UpdateNodeLabels", {"nodeId": "n1", "set": {"tier": "web"}})
        assert r.status_code == 200, r.text
        assert r.json()["node"]["labels"]["tier"] == "web"
        got = await env.stub.GetNode(fleet_pb2.FleetServiceGetNodeRequest(node_id="n1"))
        assert got.node.labels["tier"] == "web"

        r = await env.call(
            "ApplyDefinitions",
            {"definitions": [as_json(definition("api"))], "message": "over http"},
        )
        assert r.status_code == 200, r.text
        history = await env.stub.ListDefinitionRevisions(
            fleet_pb2.FleetServiceListDefinitionRevisionsRequest(name="api")
        )
        assert [(h.actor, h.message) for h in history.revisions] == [
            ("operator/alice", "over http")
        ]

        spec = command("sleep", "1000", node_ids=["j1"])
        r = await env.call("RunJob", {"spec": as_json(spec)})
        assert r.status_code == 200, r.text
        job_id = r.json()["job"]["id"]
        r = await env.call("CancelJob", {"jobId": job_id})
        assert r.status_code == 200, r.text
        job = await env.stub.GetJob(fleet_pb2.FleetServiceGetJobRequest(job_id=job_id))
        assert job.job.actor == "operator/alice"

        r = await env.call("CreateJoinToken", {"nodeName": "web-9", "ttlSeconds": 600})
        assert r.status_code == 200, r.text
        made = r.json()
        assert made["token"]
        assert made["info"]["createdBy"] == "operator/alice"
        r = await env.call("RevokeJoinToken", {"tokenId": made["info"]["id"]})
        assert r.status_code == 200, r.text
        assert r.json()["info"]["revokeTime"]

        events = [
            m.event
            async for m in env.stub.WatchEvents(
                fleet_pb2.FleetServiceWatchEventsRequest(kinds=[fleet_pb2.EVENT_KIND_OPERATION])
            )
        ]
        actions = {(e.actor, e.attributes.get("action", "")) for e in events}
        assert ("operator/alice", "token.created") in actions
        assert ("operator/alice", "token.revoked") in actions
        labels = [
            m.event
            async for m in env.stub.WatchEvents(
                fleet_pb2.FleetServiceWatchEventsRequest(
                    kinds=[fleet_pb2.EVENT_KIND_NODE_LABELS_UPDATED]
                )
            )
        ]
        assert [e.actor for e in labels] == ["operator/alice"]


async def test_errors_are_http_statuses_with_the_grpc_code(pki: Any, tmp_path: Path) -> None:
    """404 for an unknown node (with its resource), 400 for a bad selector or a
    FAILED_PRECONDITION."""
    async with http_env(pki, tmp_path) as env:
        await env.add_nodes("n1", labels={"env": "prod"})
        r = await env.call("GetNode", {"nodeId": "node-9"})
        assert r.status_code == 404
        assert r.json() == {
            "code": "NOT_FOUND",
            "message": "node 'node-9' is not registered",
            "metadata": {"fleet-resource-kind": "node", "fleet-resource-name": "node-9"},
        }
        r = await env.call("ListNodes", {"selector": {"matchLabels": {"bad key!": "x"}}})
        assert r.status_code == 400
        assert r.json()["code"] == "INVALID_ARGUMENT"
        assert "selector" in r.json()["message"]
        # A key only the daemon sets cannot be removed by an operator.
        r = await env.call("UpdateNodeLabels", {"nodeId": "n1", "remove": ["env"]})
        assert (r.status_code, r.json()["code"]) == (400, "FAILED_PRECONDITION")


async def test_other_identities_are_refused_as_over_grpc(pki: Any, tmp_path: Path) -> None:
    """A node or manager certificate is 403 naming it; no certificate or another CA's fails
    the TLS handshake; nothing changes."""
    async with http_env(pki, tmp_path) as env:
        await env.add_nodes("n1", labels={"env": "prod"})
        change = {"nodeId": "n1", "set": {"owned": "yes"}}
        for role, name in (("node", "n1"), ("manager", "m2")):
            async with env.client(role, name) as client:
                r = await post(client, "UpdateNodeLabels", change)
            assert r.status_code == 403
            assert r.json() == {
                "code": "PERMISSION_DENIED",
                "message": f"{role}/{name} may not call this; only operator certificates may",
            }
        port = env.manager.http_port or 0
        async with https_client(pki, port, None) as anonymous:
            # TLS 1.3: the client's side of the handshake is done before the server asks
            # for its certificate; the server then drops the connection, so the client
            # sees it reset while reading the answer. No HTTP status is ever sent.
            with pytest.raises(httpx.ReadError):
                await post(anonymous, "UpdateNodeLabels", change)
        other = CertificateAuthority.create(trust_domain=pki.trust_domain)
        stranger = other.issue("operator", "alice").write(tmp_path / "stranger")
        ctx = ssl.create_default_context(cafile=str(env.pki.issue("operator", "x").ca_file))
        ctx.load_cert_chain(str(stranger.cert_file), str(stranger.key_file))
        async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{port}", verify=ctx) as c:
            with pytest.raises(httpx.TransportError):
                await post(c, "UpdateNodeLabels", change)
        got = await env.stub.GetNode(fleet_pb2.FleetServiceGetNodeRequest(node_id="n1"))
        assert "owned" not in got.node.labels


async def test_bad_requests_name_what_is_wrong_and_change_nothing(pki: Any, tmp_path: Path) -> None:
    """Bad JSON, an unknown field, a wrong content type, a wrong verb, an unknown method, an
    oversized body: 400/405/404/413 with a message saying what was wrong."""
    async with http_env(pki, tmp_path, max_body_bytes=4096) as env:
        await env.add_nodes("n1", labels={"env": "prod"})
        url = f"{SERVICE}/UpdateNodeLabels"
        json_type = {"content-type": "application/json"}

        r = await env.http.post(url, content=b'{"nodeId": "n1", "set": ', headers=json_type)
        assert r.status_code == 400
        assert r.json()["code"] == "INVALID_ARGUMENT"
        assert "not JSON" in r.json()["message"]

        r = await env.call("UpdateNodeLabels", {"nodeId": "n1", "sett": {"a": "b"}})
        assert r.status_code == 400
        assert "sett" in r.json()["message"]

        r = await env.call("UpdateNodeLabels", ["n1"])
        assert r.status_code == 400
        assert "JSON object" in r.json()["message"]

        r = await env.http.post(url, content=b'{"nodeId": "n1", "set": {"a": "b"}}')
        assert r.status_code == 400
        assert "Content-Type must be application/json" in r.json()["message"]

        r = await env.http.get(url)
        assert r.status_code == 405

        r = await env.call("UpdateNodeLabelz", {})
        assert r.status_code == 404
        assert "no such method" in r.json()["message"]

        big = {"nodeId": "n1", "set": {"a": "x" * 5000}}
        r = await env.call("UpdateNodeLabels", big)
        assert r.status_code == 413
        assert r.json()["code"] == "RESOURCE_EXHAUSTED"
        assert "4096 bytes" in r.json()["message"]

        # The same without a Content-Length (chunked): counted as it arrives.
        async def chunks() -> Any:
            yield json.dumps(big).encode()

        r = await env.http.post(url, content=chunks(), headers=json_type)
        assert r.status_code == 413

        r = await env.call("ListNodes", {}, headers={"connect-timeout-ms": "soon"})
        assert r.status_code == 400
        assert "connect-timeout-ms" in r.json()["message"]

        got = await env.stub.GetNode(fleet_pb2.FleetServiceGetNodeRequest(node_id="n1"))
        assert dict(got.node.labels) == {"env": "prod"}


async def test_stopping_the_manager_ends_open_streams(pki: Any, tmp_path: Path) -> None:
    """A followed stream ends with an UNAVAILABLE line when the manager stops, within the grace."""
    config = manager_config(pki, f"sqlite+aiosqlite:///{tmp_path / 'm.db'}", tmp_path / "state")
    config = dataclasses.replace(config, pool=FAST_POOL, http=HttpConfig(listen="127.0.0.1:0"))
    async with running_manager(config, FakeClock()) as manager:
        client = https_client(pki, manager.http_port or 0, pki.issue("operator", "alice"))
        opened = asyncio.Event()

        async def follow() -> list[Any]:
            # As curl -N: read until the server ends the response, then hang up.
            async with client.stream(
                "POST",
                f"{SERVICE}/WatchEvents",
                json={"follow": True},
                headers={"content-type": "application/json"},
            ) as r:
                assert r.status_code == 200
                opened.set()
                return await lines(r)

        async with client:
            reading = asyncio.ensure_future(follow())
            async with asyncio.timeout(10):
                await opened.wait()
            started = time.monotonic()
            await manager.stop(5.0)
            assert time.monotonic() - started < 4.0
            async with asyncio.timeout(5):
                got = await reading
        assert got[-1] == {
            "error": {"code": "UNAVAILABLE", "message": "the manager is shutting down"}
        }
