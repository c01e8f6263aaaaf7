"""FleetService over real mTLS: who may call it, nodes, labels, agents, passthroughs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from fleet_harness import PROD, fleet_env, operator_stub, selector
from manager_harness import node_stub, rpc_error

from fleet.errors import Resource, from_rpc_error
from fleet.v1 import common_pb2, fleet_pb2, manager_pb2
from manager.storage import AuditRepository

STAGING = {"env": "staging", "tier": "web"}


@pytest.mark.parametrize(("role", "name"), [("node", "n1"), ("manager", "m2")])
async def test_only_operators_may_call(pki: Any, tmp_path: Path, role: str, name: str) -> None:
    """A node or manager certificate gets PERMISSION_DENIED naming the caller."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("n1", labels=PROD)
        async with operator_stub(pki, env.manager.port, role=role, name=name) as stub:
            err = await rpc_error(stub.ListNodes(fleet_pb2.FleetServiceListNodesRequest()))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert f"{role}/{name}" in (err.details() or "")
            err = await rpc_error(
                stub.UpdateNodeLabels(
                    fleet_pb2.FleetServiceUpdateNodeLabelsRequest(node_id="n1", set={"a": "b"})
                )
            )
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        node = await env.stub.GetNode(fleet_pb2.FleetServiceGetNodeRequest(node_id="n1"))
        assert dict(node.node.labels) == PROD  # the refused call changed nothing


async def test_list_nodes_by_selector(pki: Any, tmp_path: Path) -> None:
    """ListNodes returns exactly the nodes whose labels match, ordered by id."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("p2", "p1", labels=PROD)
        await env.add_nodes("s1", labels=STAGING)

        async def names(text: str) -> list[str]:
            req = fleet_pb2.FleetServiceListNodesRequest(selector=selector(text))
            return [n.node_id for n in (await env.stub.ListNodes(req)).nodes]

        assert await names("") == ["p1", "p2", "s1"]
        assert await names("env=prod") == ["p1", "p2"]
        assert await names("env!=prod") == ["s1"]
        assert await names("tier") == ["s1"]
        assert await names("!tier,env in (prod,staging)") == ["p1", "p2"]
        assert await names("env=qa") == []


async def test_invalid_selector_is_invalid_argument(pki: Any, tmp_path: Path) -> None:
    """A selector the proto cannot mean (GT with a word) is INVALID_ARGUMENT naming the field."""
    async with fleet_env(pki, tmp_path) as env:
        bad = common_pb2.LabelSelector(
            match_expressions=[
                common_pb2.LabelSelectorRequirement(
                    key="cores", operator=common_pb2.SELECTOR_OPERATOR_GT, values=["many"]
                )
            ]
        )
        err = await rpc_error(
            env.stub.ListNodes(fleet_pb2.FleetServiceListNodesRequest(selector=bad))
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "selector.match_expressions[0]" in (err.details() or "")


async def test_get_node_shows_status_counts_and_connection(pki: Any, tmp_path: Path) -> None:
    """GetNode has labels, versions, heartbeat, agent counts and the pool's connection state."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("n1", labels=PROD)
        req = fleet_pb2.FleetServiceGetNodeRequest(node_id="n1")
        node = (await env.stub.GetNode(req)).node
        assert node.status == common_pb2.NODE_STATUS_ONLINE
        assert node.daemon_version == "sim"
        assert node.last_heartbeat > 0
        assert node.daemon_address == env.fleet["n1"].address
        assert node.connection_state == fleet_pb2.CONNECTION_STATE_IDLE  # never called yet
        assert [(c.status, c.count) for c in node.agent_counts] == [
            (common_pb2.AGENT_STATUS_RUNNING, 2)
        ]
        await env.stub.ListAgents(fleet_pb2.FleetServiceListAgentsRequest(node_id="n1", live=True))
        node = (await env.stub.GetNode(req)).node
        assert node.connection_state == fleet_pb2.CONNECTION_STATE_READY
        err = await rpc_error(env.stub.GetNode(fleet_pb2.FleetServiceGetNodeRequest(node_id="nx")))
        assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_unknown_node_is_said_for_any_client_and_names_the_resource(
    pki: Any, tmp_path: Path
) -> None:
    """NOT_FOUND for operators names no RPC or command; the node travels as metadata."""
    async with fleet_env(pki, tmp_path) as env:
        err = await rpc_error(
            env.stub.GetNode(fleet_pb2.FleetServiceGetNodeRequest(node_id="node-9"))
        )
        assert err.details() == "node 'node-9' is not registered"
        assert from_rpc_error(err).resource == Resource("node", "node-9")


async def test_update_labels_is_audited_evented_and_selectable(pki: Any, tmp_path: Path) -> None:
    """Labels change, the audit names operator/alice, an OPERATION event is written."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("n1", labels={"env": "prod"})
        resp = await env.stub.UpdateNodeLabels(
            fleet_pb2.FleetServiceUpdateNodeLabelsRequest(
                node_id="n1", set={"example.com/tier": "web"}, remove=["old"]
            )
        )
        assert dict(resp.node.labels) == {"env": "prod", "example.com/tier": "web"}
        listed = await env.stub.ListNodes(
            fleet_pb2.FleetServiceListNodesRequest(selector=selector("example.com/tier=web"))
        )
        assert [n.node_id for n in listed.nodes] == ["n1"]
        (entry,) = await AuditRepository(env.manager.db).list_recent()
        assert (entry.actor, entry.action, entry.target) == ("operator/alice", "nodes.label", "n1")
        events = env.stub.WatchEvents(
            fleet_pb2.FleetServiceWatchEventsRequest(
                kinds=[fleet_pb2.EVENT_KIND_OPERATION, fleet_pb2.EVENT_KIND_NODE_LABELS_UPDATED]
            )
        )
        got = [(m.event.kind, m.event.actor) async for m in events]
        assert got == [
            (fleet_pb2.EVENT_KIND_NODE_LABELS_UPDATED, "operator/alice"),
            (fleet_pb2.EVENT_KIND_OPERATION, "operator/alice"),
        ]


async def test_operator_labels_survive_re_registration_over_grpc(pki: Any, tmp_path: Path) -> None:
    """An operator label outlives the node registering again; a daemon label cannot be
    removed by an operator (FAILED_PRECONDITION, nothing stored or audited)."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("n1", labels=PROD)
        await env.stub.UpdateNodeLabels(
            fleet_pb2.FleetServiceUpdateNodeLabelsRequest(node_id="n1", set={"canary": "true"})
        )
        await env.fleet["n1"].register(env.address, env.pki.trust_domain)
        node = (await env.stub.GetNode(fleet_pb2.FleetServiceGetNodeRequest(node_id="n1"))).node
        assert dict(node.labels) == {**PROD, "canary": "true"}
        assert (dict(node.daemon_labels), dict(node.operator_labels)) == (PROD, {"canary": "true"})
        err = await rpc_error(
            env.stub.UpdateNodeLabels(
                fleet_pb2.FleetServiceUpdateNodeLabelsRequest(node_id="n1", remove=["env"])
            )
        )
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'env' of n1 comes from its daemon's config" in (err.details() or "")
        after = (await env.stub.GetNode(fleet_pb2.FleetServiceGetNodeRequest(node_id="n1"))).node
        assert dict(after.labels) == dict(node.labels)
        audit = await AuditRepository(env.manager.db).list_recent()
        assert [e.action for e in audit] == ["nodes.label"]  # only the accepted change


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"set": {"bad key!": "x"}}, "set"),
        ({"set": {"ok": "bad value!"}}, "bad value!"),
        ({"remove": ["-nope"]}, "remove[0]"),
        ({"set": {"a": "1"}, "remove": ["a"]}, "both set and removed"),
        ({}, "nothing to change"),
    ],
)
async def test_bad_label_updates_change_nothing(
    pki: Any, tmp_path: Path, fields: dict[str, Any], needle: str
) -> None:
    """A bad label update is INVALID_ARGUMENT naming what is wrong; labels stay as they were."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("n1", labels=PROD)
        err = await rpc_error(
            env.stub.UpdateNodeLabels(
                fleet_pb2.FleetServiceUpdateNodeLabelsRequest(node_id="n1", **fields)
            )
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in (err.details() or "")
        node = await env.stub.GetNode(fleet_pb2.FleetServiceGetNodeRequest(node_id="n1"))
        assert dict(node.node.labels) == PROD
        assert await AuditRepository(env.manager.db).list_recent() == []


async def test_list_agents_synced_and_live(pki: Any, tmp_path: Path) -> None:
    """Synced listing needs no daemon; live asks them and lists an unreachable one in errors."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("n1", "n2", labels=PROD)
        await env.add_nodes("s1", labels=STAGING)
        await env.fleet["n2"].stop()
        req = fleet_pb2.FleetServiceListAgentsRequest(selector=selector("env=prod"))
        synced = await env.stub.ListAgents(req)
        assert [(a.node_id, a.agent.id) for a in synced.agents] == [
            ("n1", "web"),
            ("n1", "worker"),
            ("n2", "web"),
            ("n2", "worker"),
        ]
        assert all(a.agent.status == common_pb2.AGENT_STATUS_RUNNING for a in synced.agents)
        assert not synced.errors
        assert env.fleet["n1"].servicer.calls == []
        req.live = True
        live = await env.stub.ListAgents(req)
        assert [(a.node_id, a.agent.id) for a in live.agents] == [("n1", "web"), ("n1", "worker")]
        assert [e.node_id for e in live.errors] == ["n2"]
        assert live.errors[0].message
        assert env.fleet["n1"].servicer.calls == [("ListAgents",)]
        err = await rpc_error(
            env.stub.ListAgents(
                fleet_pb2.FleetServiceListAgentsRequest(node_id="n1", selector=selector("env=prod"))
            )
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_agent_metrics_and_log_pass_through(pki: Any, tmp_path: Path) -> None:
    """GetAgentMetrics and ReadAgentLog answer what the daemon has."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("n1", labels=PROD)
        metrics = await env.stub.GetAgentMetrics(
            fleet_pb2.FleetServiceGetAgentMetricsRequest(
                node_id="n1", agent_id="web", duration_seconds=60
            )
        )
        assert (metrics.node_id, metrics.agent_id) == ("n1", "web")
        assert [p.cpu for p in metrics.data_points] == [1.5, 3.0, 4.5]
        chunks = [
            c.data
            async for c in env.stub.ReadAgentLog(
                fleet_pb2.FleetServiceReadAgentLogRequest(node_id="n1", agent_id="web")
            )
        ]
        assert b"".join(chunks) == b"web on n1: line 1\nline 2\n"
        err = await rpc_error(
            env.stub.GetAgentMetrics(
                fleet_pb2.FleetServiceGetAgentMetricsRequest(node_id="n1", agent_id="nope")
            )
        )
        assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_query_metrics_reads_the_managers_store(pki: Any, tmp_path: Path) -> None:
    """Host samples a node reported come back bucketed with the step used."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("n1", labels=PROD)
        now = env.manager.registry.now_ms()
        # Buckets are aligned to the epoch: use one whole 2-minute bucket in the past.
        bucket = (now // 120_000 - 1) * 120_000
        samples = [
            common_pb2.MetricData(type="cpu", timestamp=bucket + i * 10_000, values={"usage": v})
            for i, v in enumerate([10.0, 20.0, 30.0])
        ]
        async with node_stub(pki, "n1", env.manager.port) as node:
            await node.ReportMetrics(
                manager_pb2.ReportMetricsRequest(node_id="n1", sequence=1, metrics=samples)
            )
        resp = await env.stub.QueryMetrics(
            fleet_pb2.FleetServiceQueryMetricsRequest(
                node_id="n1",
                type="cpu",
                start_time=bucket,
                end_time=bucket + 120_000,
                step_seconds=120,
                aggregate=fleet_pb2.AGGREGATE_MAX,
            )
        )
        assert resp.step_seconds == 120
        assert [(s.name, [(p.timestamp, p.value) for p in s.points]) for s in resp.series] == [
            ("usage", [(bucket, 30.0)])
        ]
        default = await env.stub.QueryMetrics(
            fleet_pb2.FleetServiceQueryMetricsRequest(node_id="n1", type="cpu", end_time=now)
        )
        assert default.step_seconds == 60  # an hour in about 60 buckets
        err = await rpc_error(
            env.stub.QueryMetrics(
                fleet_pb2.FleetServiceQueryMetricsRequest(node_id="n1", type="CPU!")
            )
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        huge = fleet_pb2.FleetServiceQueryMetricsRequest(
            node_id="n1", type="cpu", end_time=now, step_seconds=2**62
        )
        err = await rpc_error(env.stub.QueryMetrics(huge))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "step_seconds" in (err.details() or "")


async def test_following_a_log_streams_until_the_operator_cancels(pki: Any, tmp_path: Path) -> None:
    """A followed log sends what is there, stays open, and ends when the operator cancels."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("n1", labels=PROD)
        call = env.stub.ReadAgentLog(
            fleet_pb2.FleetServiceReadAgentLogRequest(
                node_id="n1", agent_id="worker", offset=-7, follow=True
            )
        )
        first = await call.read()
        assert first.data == b"line 2\n"
        assert first.next_offset == first.offset + 7
        call.cancel()
        assert call.cancelled()
        # The manager is still fine: its channel to the daemon serves the next call.
        listing = await env.stub.ListAgents(
            fleet_pb2.FleetServiceListAgentsRequest(node_id="n1", live=True)
        )
        assert [a.agent.id for a in listing.agents] == ["web", "worker"]
