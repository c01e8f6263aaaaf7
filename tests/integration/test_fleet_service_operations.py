"""FleetService operations over real mTLS: OperateAgent and the OperateAgents fan-out."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import grpc
import pytest
from fleet_harness import PROD, fleet_env, operate, operate_messages, outcomes, selector
from manager_harness import rpc_error

from fleet.errors import Resource, from_rpc_error
from fleet.v1 import common_pb2, fleet_pb2
from manager.servicers import fleet_service
from manager.storage import AuditRepository

RESTART = common_pb2.AGENT_OPERATION_RESTART


async def test_fan_out_with_one_daemon_down_fails_that_target_only(
    pki: Any, tmp_path: Path
) -> None:
    """One stopped daemon: its target is FAILED with a reason, the others are restarted."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("n1", "n2", "n3", "n4", labels=PROD)
        await env.add_nodes("other", labels={"env": "staging"})
        await env.fleet["n3"].stop()
        results, summary = await operate(
            env.stub, selector=selector("env=prod"), agent_id="web", max_concurrency=4
        )
        assert outcomes(results) == {"n1": "OK", "n2": "OK", "n3": "FAILED", "n4": "OK"}
        failed = next(r for r in results if r.node_id == "n3")
        assert "n3" in failed.message
        assert "refused the connection (is fleet-daemon running there?)" in failed.message
        assert (summary.total, summary.ok, summary.failed, summary.skipped) == (4, 3, 1, 0)
        for name in ("n1", "n2", "n4"):
            assert env.fleet[name].servicer.operations == [("OperateAgent", "web", "RESTART")]
            assert env.fleet[name].servicer.agents["web"].restart_count == 1
        assert env.fleet["other"].servicer.calls == []
        ok = next(r for r in results if r.node_id == "n1")
        assert ok.agent.restart_count == 1
        assert ok.agent.status == common_pb2.AGENT_STATUS_RUNNING


async def test_a_daemon_that_never_answers_fails_within_the_deadline(
    pki: Any, tmp_path: Path
) -> None:
    """A black-hole daemon (accepts TCP, never speaks TLS) fails its target; no hang."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        async with fleet_env(pki, tmp_path) as env:
            await env.add_nodes("n1", "n2", labels=PROD)
            hung = await env.fleet.add("n0", labels=PROD)
            hung.address = f"127.0.0.1:{hole.getsockname()[1]}"
            await hung.register(env.address, pki.trust_domain)
            loop = asyncio.get_running_loop()
            start = loop.time()
            results, summary = await operate(
                env.stub, selector=selector("env=prod"), agent_type="web", max_concurrency=3
            )
            assert loop.time() - start < 8.0  # the pool's call_timeout is 3 s
        assert outcomes(results) == {"n0": "FAILED", "n1": "OK", "n2": "OK"}
        assert summary.failed == 1


async def test_a_slow_daemon_is_reported_in_the_managers_words_before_the_callers_deadline(
    pki: Any, tmp_path: Path
) -> None:
    """An operator's deadline shorter than the pool's: the manager gives up on the daemon a
    little before it, so the operator reads which node did not answer (unary), and a
    fan-out's other results and summary, not their own client's bare DEADLINE_EXCEEDED.
    3 s deadlines, so the whole 0.25 s margin (not a tenth of 1 s) carries the answer back
    on a loaded machine."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("slow", labels={"env": "slow"}, op_delay=5.0)
        await env.add_nodes("n1", labels={"env": "slow"})
        err = await rpc_error(
            env.stub.OperateAgent(
                fleet_pb2.FleetServiceOperateAgentRequest(
                    node_id="slow", agent_id="web", operation=RESTART
                ),
                timeout=3.0,
            )
        )
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (err.details() or "").startswith("slow: "), err.details()
        # Named as the resource: fleetctl tells it from its own deadline by that.
        assert from_rpc_error(err).resource == Resource("node", "slow")
        results = []
        summary = None
        call = env.stub.OperateAgents(
            fleet_pb2.FleetServiceOperateAgentsRequest(
                selector=selector("env=slow"), agent_id="web", operation=RESTART
            ),
            timeout=3.0,
        )
        async for msg in call:
            if msg.HasField("summary"):
                summary = msg.summary
            else:
                results.append(msg.result)
        assert outcomes(results) == {"n1": "OK", "slow": "FAILED"}
        assert summary is not None
        assert summary.failed == 1


async def test_concurrency_never_exceeds_max_concurrency(pki: Any, tmp_path: Path) -> None:
    """Eight slow daemons with a window of three: the daemons see at most three at once."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes(*[f"n{i}" for i in range(8)], labels=PROD, op_delay=0.15)
        _results, summary = await operate(
            env.stub, selector=selector("env=prod"), agent_id="worker", max_concurrency=3
        )
        assert summary.ok == 8
        assert env.fleet.concurrency.peak == 3


async def test_max_errors_stops_the_rollout(pki: Any, tmp_path: Path) -> None:
    """After two failures nothing more is launched; the rest are SKIPPED and untouched."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("a-bad", "b-bad", "c-bad", labels=PROD, fail_operations=True)
        await env.add_nodes("d-ok", "e-ok", labels=PROD)
        results, summary = await operate(
            env.stub,
            selector=selector("env=prod"),
            agent_id="web",
            max_concurrency=1,
            max_errors=2,
        )
        assert outcomes(results) == {
            "a-bad": "FAILED",
            "b-bad": "FAILED",
            "c-bad": "SKIPPED",
            "d-ok": "SKIPPED",
            "e-ok": "SKIPPED",
        }
        assert "spawn failed" in results[0].message
        assert (summary.failed, summary.skipped, summary.ok) == (2, 3, 0)
        for name in ("c-bad", "d-ok", "e-ok"):
            assert env.fleet[name].servicer.operations == []
        audit = await AuditRepository(env.manager.db).list_recent(limit=1)
        assert audit[0].outcome == "failed"
        assert audit[0].detail["skipped"] == "3"


async def test_plan_lists_targets_and_touches_nothing(pki: Any, tmp_path: Path) -> None:
    """--plan resolves the targets as PLANNED; no daemon is called and nothing is audited."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("n1", "n2", labels=PROD)
        await env.add_nodes("s1", labels={"env": "staging"})
        results, summary = await operate(
            env.stub, selector=selector("env in (prod)"), agent_type="worker", plan=True
        )
        assert outcomes(results) == {"n1": "PLANNED", "n2": "PLANNED"}
        assert {r.agent_id for r in results} == {"worker"}
        assert (summary.planned, summary.total, summary.ok, summary.operation_id) == (2, 2, 0, "")
        assert all(n.servicer.calls == [] for n in env.fleet.nodes)
        assert await AuditRepository(env.manager.db).list_recent() == []


async def test_batched_results_report_every_target_once(pki: Any, tmp_path: Path) -> None:
    """With batch_results, the same outcomes arrive in `results` lists: every target once."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("n1", "n2", labels=PROD)
        await env.add_nodes("n3-bad", labels=PROD, fail_operations=True)
        await env.add_nodes("n4", "n5", "n6", labels=PROD)
        results, summary, sizes = await operate_messages(
            env.stub,
            selector=selector("env=prod"),
            agent_id="web",
            max_concurrency=3,
            max_errors=1,
            batch_results=True,
        )
        assert sum(sizes) == len(results) == 6
        assert len({r.node_id for r in results}) == 6
        got = outcomes(results)
        assert got["n3-bad"] == "FAILED"
        assert {got[n] for n in ("n1", "n2")} == {"OK"}  # launched before n3 failed
        assert set(got.values()) <= {"OK", "FAILED", "SKIPPED"}
        assert (summary.ok, summary.failed, summary.skipped) == (
            *(sum(v == o for v in got.values()) for o in ("OK", "FAILED", "SKIPPED")),
        )
        # How many of n4..n6 were launched before n3's failure arrived depends on
        # timing (all three can be, on a loaded machine); each is reported once either way.
        assert summary.failed == 1
        assert summary.ok + summary.skipped == 5
        ok = next(r for r in results if r.node_id == "n1")
        assert ok.agent.restart_count == 1


async def test_batches_are_capped_and_only_for_clients_that_ask(
    pki: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch holds at most MAX_RESULTS_PER_MESSAGE results; without batch_results, one each."""
    monkeypatch.setattr(fleet_service, "MAX_RESULTS_PER_MESSAGE", 2)
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes(*[f"n{i}" for i in range(5)], labels=PROD)
        sel = selector("env=prod")
        # A plan resolves all five targets at once: one batch of five, cut into 2 + 2 + 1.
        results, _, sizes = await operate_messages(
            env.stub, selector=sel, agent_id="web", plan=True, batch_results=True
        )
        assert sizes == [2, 2, 1]
        assert sorted(r.node_id for r in results) == [f"n{i}" for i in range(5)]
        _, _, sizes = await operate_messages(env.stub, selector=sel, agent_id="web", plan=True)
        assert sizes == [1] * 5
        results, summary, sizes = await operate_messages(
            env.stub, selector=sel, agent_id="web", max_concurrency=5, batch_results=True
        )
        assert summary.ok == 5
        assert max(sizes) <= 2
        assert sum(sizes) == 5


async def test_fan_out_is_audited_with_the_operator(pki: Any, tmp_path: Path) -> None:
    """A rollout leaves a started and a finished audit entry naming operator/alice."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("n1", labels=PROD)
        _, summary = await operate(env.stub, selector=selector("env=prod"), agent_id="web")
        entries = await AuditRepository(env.manager.db).list_recent()
        assert [(e.actor, e.action, e.outcome) for e in entries] == [
            ("operator/alice", "agents.restart", "ok"),
            ("operator/alice", "agents.restart", "started"),
        ]
        assert summary.operation_id == str(entries[1].id)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"agent_id": "web", "agent_type": "web"}, "exactly one of agent_id and agent_type"),
        ({}, "exactly one of agent_id and agent_type"),
        ({"agent_id": "web", "operation": 0}, "operation"),
        ({"agent_id": "web", "max_concurrency": -1}, "max_concurrency"),
        ({"agent_id": "Bad Id"}, "agent_id"),
    ],
)
async def test_bad_fan_out_requests_are_invalid_argument(
    pki: Any, tmp_path: Path, fields: dict[str, Any], needle: str
) -> None:
    """A malformed fan-out is INVALID_ARGUMENT naming the problem and touches nothing."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("n1", labels=PROD)
        err = await rpc_error(operate(env.stub, selector=selector("env=prod"), **fields))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in (err.details() or "")
        assert env.fleet["n1"].servicer.calls == []


async def test_fan_out_that_matches_nothing_is_not_found(pki: Any, tmp_path: Path) -> None:
    """A selector or agent name that matches nothing says so (a typo is not silent)."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("n1", labels=PROD)
        err = await rpc_error(operate(env.stub, selector=selector("env=qa"), agent_id="web"))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert "env=qa" in (err.details() or "")
        err = await rpc_error(operate(env.stub, selector=selector("env=prod"), agent_id="wbe"))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert "'wbe'" in (err.details() or "")


async def test_fan_out_error_quotes_the_selector_as_written(pki: Any, tmp_path: Path) -> None:
    """The manager's answer shows each operator as the operator wrote it, not a synonym."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("n1", labels={**PROD, "zone": ""})
        err = await rpc_error(
            operate(env.stub, selector=selector("zone notin (),env==prod"), agent_id="web")
        )
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert "matches selector 'env==prod,zone notin ()'" in (err.details() or "")


async def test_operate_agent_through_the_pool(pki: Any, tmp_path: Path) -> None:
    """OperateAgent stops one agent and answers its new state; errors are named codes."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes("n1", "n2", labels=PROD)
        resp = await env.stub.OperateAgent(
            fleet_pb2.FleetServiceOperateAgentRequest(
                node_id="n1", agent_id="web", operation=common_pb2.AGENT_OPERATION_STOP
            )
        )
        assert resp.agent.node_id == "n1"
        assert resp.agent.agent.status == common_pb2.AGENT_STATUS_STOPPED
        assert env.fleet["n1"].servicer.agents["web"].status == common_pb2.AGENT_STATUS_STOPPED

        def req(node: str, agent: str = "web") -> Any:
            return fleet_pb2.FleetServiceOperateAgentRequest(
                node_id=node, agent_id=agent, operation=RESTART
            )

        err = await rpc_error(env.stub.OperateAgent(req("ghost")))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert "ghost" in (err.details() or "")
        err = await rpc_error(env.stub.OperateAgent(req("n1", "nope")))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert "nope" in (err.details() or "")
        await env.fleet["n2"].stop()
        err = await rpc_error(env.stub.OperateAgent(req("n2")))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert err.details() == (
            f"n2: daemon at {env.fleet['n2'].address} refused the connection"
            " (is fleet-daemon running there?)"
        )
        entries = await AuditRepository(env.manager.db).list_recent()
        assert [e.outcome for e in entries] == ["failed", "failed", "ok"]


async def test_client_cancellation_stops_launching(pki: Any, tmp_path: Path) -> None:
    """An operator who cancels a slow rollout after the first result stops the rest."""
    async with fleet_env(pki, tmp_path) as env:
        await env.add_nodes(*[f"n{i}" for i in range(6)], labels=PROD, op_delay=1.0)
        call = env.stub.OperateAgents(
            fleet_pb2.FleetServiceOperateAgentsRequest(
                selector=selector("env=prod"), agent_id="web", operation=RESTART, max_concurrency=1
            )
        )
        async for _ in call:
            call.cancel()
            break
        await asyncio.sleep(1.5)  # going on, a third target would start 1 s after the second
        launched = sum(len(n.servicer.operations) for n in env.fleet.nodes)
        assert launched <= 2  # the first, and the second that refilled the window
        entries = await AuditRepository(env.manager.db).list_recent(limit=1)
        assert entries[0].outcome == "cancelled"
