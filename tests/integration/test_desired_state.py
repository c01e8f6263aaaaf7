"""Desired state over real mTLS: definitions, convergence and rollouts with a real manager.

Every test runs on SQLite and on PostgreSQL. The daemons are `bench.sim`
daemons: real gRPC servers with node certificates that apply PushUpdate as
the daemon does (versions, a host agent of the same id refused) and answer
with their agents' states (older ones: report them back through
ManagerService), so the whole loop -- apply, scope, rollout step, push,
answer or report, judge -- runs for real; their agents are rows, so a "bad" revision
is one the test names. (System tests run real fleet-daemon processes.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from artifact_helpers import digest, push, sync_operator
from fleet_harness import FAST_POOL, operator_stub, selector
from manager_harness import manager_config, node_stub, rpc_error

from bench.sim import SimAgent, SimFleet, start_daemon
from fleet.v1 import common_pb2, desired_pb2, fleet_pb2, fleet_pb2_grpc, manager_pb2
from manager.server import ManagerServer
from manager.service.convergence import PassResult
from manager.service.definitions import HOST_CLASH

T = TypeVar("T")
RS = desired_pb2


@dataclass
class Env:
    """A manager on the real clock, simulated daemons, alice's stub."""

    manager: ManagerServer
    fleet: SimFleet
    stub: fleet_pb2_grpc.FleetServiceStub
    pki: Any

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.manager.port}"

    async def add(self, name: str, labels: dict[str, str], **behaviour: Any) -> None:
        node = await self.fleet.add(
            name, labels=labels, agents=behaviour.pop("agents", ()), **behaviour
        )
        await node.register(self.address, self.pki.trust_domain)

    async def apply(self, *definitions: desired_pb2.Definition, **fields: Any) -> list[Any]:
        reply = await self.stub.ApplyDefinitions(
            fleet_pb2.FleetServiceApplyDefinitionsRequest(definitions=definitions, **fields)
        )
        return list(reply.changes)

    async def rollout(self, name: str) -> desired_pb2.Rollout:
        reply = await self.stub.GetRollout(fleet_pb2.FleetServiceGetRolloutRequest(name=name))
        return reply.rollout

    async def ended(self, name: str) -> desired_pb2.Rollout:
        """`name`'s latest rollout, once it ended."""
        return await until(lambda: self.rollout(name), lambda r: r.ended_at > 0)

    def revisions(self, name: str) -> dict[str, int]:
        """node -> the revision of `name` its simulated daemon runs."""
        out = {}
        for node in self.fleet.nodes:
            spec = node.servicer.pushed.get(name)
            if spec is not None:
                out[node.node_id] = spec.revision
        return out


@asynccontextmanager
async def desired_env(pki: Any, tmp_path: Path, database_url: str) -> AsyncIterator[Env]:
    """Start everything (on SQLite or PostgreSQL); stop it afterwards."""
    config = manager_config(pki, database_url, tmp_path / "state")
    config = dataclasses.replace(config, pool=FAST_POOL)
    manager = ManagerServer(config, clock=time.time)
    await manager.start()
    fleet = await SimFleet.start(pki.ca, tmp_path / "sims")
    try:
        async with operator_stub(pki, manager.port) as stub:
            yield Env(manager, fleet, stub, pki)
    finally:
        await fleet.close()
        await manager.stop(1.0)


async def until(probe: Callable[[], Any], ok: Callable[[T], bool], within: float = 20.0) -> T:
    """Await `probe()` (sync or async) until `ok(value)`; the last value otherwise fails."""
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if ok(value):
            return value  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {within}s; last: {value!r}")
        await asyncio.sleep(0.1)


def definition(
    name: str = "web",
    sel: str = "env=prod",
    version: str = "1.0",
    **update: Any,
) -> desired_pb2.Definition:
    update.setdefault("min_healthy_time_seconds", 0.0)
    # Generous: a loaded machine must not fail a healthy rollout; tests of
    # failures set their own.
    update.setdefault("healthy_deadline_seconds", 60.0)
    update.setdefault("progress_deadline_seconds", 120.0)
    return desired_pb2.Definition(
        name=name,
        selector=selector(sel),
        agent=common_pb2.AgentSpec(argv=["/usr/bin/web", "--port", "80"], version=version),
        update=desired_pb2.UpdatePolicy(**update),
    )


def state(r: desired_pb2.Rollout) -> str:
    return desired_pb2.RolloutState.Name(r.state).removeprefix("ROLLOUT_STATE_")


async def test_apply_runs_the_agent_on_every_matching_node(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """Apply: revision 1 stored, pushed to the env=prod nodes only, rollout SUCCESSFUL."""
    async with desired_env(pki, tmp_path, database_url) as env:
        for name, env_label in (("p1", "prod"), ("p2", "prod"), ("s1", "staging")):
            await env.add(name, {"env": env_label})
        (change,) = await env.apply(definition(), message="first web")
        assert (change.revision, change.changed) == (1, True)
        assert change.rollout_id > 0
        done = await until(lambda: env.rollout("web"), lambda r: state(r) == "SUCCESSFUL")
        assert env.revisions("web") == {"p1": 1, "p2": 1}
        assert done.done == 2
        # Lists carry the per-phase counts too (without the per-node records).
        listed = await env.stub.ListRollouts(fleet_pb2.FleetServiceListRolloutsRequest(name="web"))
        assert [(r.done, r.pending, r.failed, len(r.nodes)) for r in listed.rollouts] == [
            (2, 0, 0, 0)
        ]
        defs = await env.stub.ListDefinitions(fleet_pb2.FleetServiceListDefinitionsRequest())
        assert [(d.current.definition.name, d.rollout.done) for d in defs.definitions] == [
            ("web", 2)
        ]
        nodes = await env.stub.ListNodes(fleet_pb2.FleetServiceListNodesRequest())
        drift = {n.node_id: (n.drift, n.desired_version, n.reported_version) for n in nodes.nodes}
        assert drift["p1"] == (False, 1, 1)
        assert drift["s1"] == (False, 0, 0)
        (again,) = await env.apply(definition(), message="same again")
        assert (again.changed, again.revision, again.rollout_id) == (False, 1, 0)
        history = await env.stub.ListDefinitionRevisions(
            fleet_pb2.FleetServiceListDefinitionRevisionsRequest(name="web")
        )
        assert [(r.revision, r.actor, r.message) for r in history.revisions] == [
            (1, "operator/alice", "first web")
        ]


async def test_a_label_change_adds_and_removes_the_agent(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """A node labelled into the selector gets the stable revision; labelled out, loses it."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await env.add("p1", {"env": "prod"})
        await env.add("s1", {"env": "staging"})
        await env.apply(definition())
        await until(lambda: env.rollout("web"), lambda r: state(r) == "SUCCESSFUL")
        await env.stub.UpdateNodeLabels(
            fleet_pb2.FleetServiceUpdateNodeLabelsRequest(node_id="s1", set={"env": "prod"})
        )
        await until(lambda: env.revisions("web"), lambda r: r == {"p1": 1, "s1": 1})
        await env.stub.UpdateNodeLabels(
            fleet_pb2.FleetServiceUpdateNodeLabelsRequest(node_id="p1", set={"env": "qa"})
        )
        await until(lambda: env.revisions("web"), lambda r: r == {"s1": 1})


async def test_a_new_revision_rolls_out_in_batches(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """Revision 2 on 4 nodes, 2 at a time: two batches, then stable = 2."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await _four_nodes_on_the_first_revision(env, max_parallel="2")
        plan = await env.apply(definition(version="2.0", max_parallel="2"), plan=True)
        assert [list(b.node_ids) for b in plan[0].batches] == [["p0", "p1"], ["p2", "p3"]]
        assert {n.action for n in plan[0].nodes} == {RS.NODE_CHANGE_ACTION_RESTART}
        assert env.revisions("web") == {f"p{i}": 1 for i in range(4)}  # the plan changed nothing
        await env.apply(definition(version="2.0", max_parallel="2"), message="2.0")
        done = await until(lambda: env.rollout("web"), lambda r: state(r) == "SUCCESSFUL")
        assert done.target_revision == 2
        assert sorted((n.node_id, n.batch) for n in done.nodes) == [
            ("p0", 1), ("p1", 1), ("p2", 2), ("p3", 2)
        ]  # fmt: skip
        assert env.revisions("web") == {f"p{i}": 2 for i in range(4)}
        # No node was moved twice: each daemon got revision 2 in exactly one push.
        for node in env.fleet.nodes:
            assert sum(1 for _, agents in node.servicer.pushes if ("web", 2) in agents) >= 1
            revs = [dict(agents).get("web") for _, agents in node.servicer.pushes]
            assert revs == [1, 2]
        listed = await env.stub.ListDefinitions(fleet_pb2.FleetServiceListDefinitionsRequest())
        (status,) = listed.definitions
        assert (status.stable_revision, status.nodes, status.nodes_current) == (2, 4, 4)


async def test_an_unhealthy_canary_stops_the_rollout_and_auto_revert_restores(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """Revision 2 crashes on its canary: FAILED, REVERTING, REVERTED; only the canary moved."""
    async with desired_env(pki, tmp_path, database_url) as env:
        for i in range(3):
            await env.add(f"p{i}", {"env": "prod"}, bad_revisions={2})
        await env.apply(definition())
        await until(lambda: env.rollout("web"), lambda r: state(r) == "SUCCESSFUL")
        bad = definition(version="2.0", canary="1", auto_revert=True, healthy_deadline_seconds=5.0)
        await env.apply(bad)
        done = await until(lambda: env.rollout("web"), lambda r: state(r) == "REVERTED")
        assert done.reverted_from == 2
        assert "revision 2 failed on p0" in done.reason
        assert "FATAL" in done.reason
        assert env.revisions("web") == {"p0": 1, "p1": 1, "p2": 1}
        assert [dict(a).get("web") for _, a in env.fleet["p1"].servicer.pushes] == [1]
        events = env.stub.WatchEvents(
            fleet_pb2.FleetServiceWatchEventsRequest(
                kinds=[
                    fleet_pb2.EVENT_KIND_ROLLOUT_FAILED,
                    fleet_pb2.EVENT_KIND_ROLLOUT_REVERTING,
                    fleet_pb2.EVENT_KIND_ROLLOUT_REVERTED,
                ]
            )
        )
        kinds = [fleet_pb2.EventKind.Name(m.event.kind) async for m in events]
        assert kinds == [
            "EVENT_KIND_ROLLOUT_FAILED",
            "EVENT_KIND_ROLLOUT_REVERTING",
            "EVENT_KIND_ROLLOUT_REVERTED",
        ]


async def test_a_stuck_rollout_fails_at_its_deadline(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """A revision that never runs (no auto_revert) fails by its deadline, loudly."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await env.add("p0", {"env": "prod"}, bad_revisions={1})
        await env.apply(definition(healthy_deadline_seconds=1.0, progress_deadline_seconds=2.0))
        done = await until(lambda: env.rollout("web"), lambda r: state(r) == "FAILED")
        assert "failed on p0" in done.reason
        assert done.ended_at > 0


async def test_an_unreachable_node_converges_when_it_returns(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """A node whose daemon is down keeps its push pending (drift says why) and gets it
    as soon as its daemon is back and registers again."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await env.add("p0", {"env": "prod"})
        await env.add("p1", {"env": "prod"})
        await env.fleet["p1"].stop()  # its daemon is down: pushes fail and back off
        await env.apply(definition())
        await until(lambda: env.revisions("web"), lambda r: r == {"p0": 1})

        async def p1_view() -> fleet_pb2.Node:
            reply = await env.stub.GetNode(fleet_pb2.FleetServiceGetNodeRequest(node_id="p1"))
            return reply.node

        view = await until(p1_view, lambda n: "not delivered" in n.drift_reason)
        assert view.drift
        back = await start_daemon("p1", env.fleet["p1"].tls, labels={"env": "prod"}, agents=())
        env.fleet.nodes.append(back)
        await back.register(env.address, env.pki.trust_domain)
        await until(lambda: back.servicer.pushed.get("web"), lambda spec: spec is not None)
        await until(p1_view, lambda n: not n.drift)


async def test_a_host_agent_of_the_same_name_is_refused_for_that_node(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """A daemon with its own `web` keeps it: the push is refused there and says why."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await env.add("p0", {"env": "prod"})
        await env.add("own", {"env": "prod"}, agents=[SimAgent("web")])
        # The plan foresees it from the agents `own` reported, before any push.
        (foreseen,) = await env.apply(definition(), plan=True)
        assert [(n.node_id, n.action, n.reason) for n in foreseen.nodes] == [
            ("own", RS.NODE_CHANGE_ACTION_REFUSED, HOST_CLASH.format(name="web")),
            ("p0", RS.NODE_CHANGE_ACTION_ADD, ""),
        ]
        assert [list(b.node_ids) for b in foreseen.batches] == [["p0"]]
        await env.apply(definition())
        nodes = await until(
            lambda: env.stub.ListNodes(fleet_pb2.FleetServiceListNodesRequest()),
            lambda reply: any(n.update_errors for n in reply.nodes),
        )
        own = next(n for n in nodes.nodes if n.node_id == "own")
        assert own.update_errors[0].agent_id == "web"
        assert "daemon.toml" in own.update_errors[0].reason
        assert own.drift
        assert "web" not in env.fleet["own"].servicer.pushed
        plan = await env.apply(definition(version="2.0"), plan=True)
        refused = [n for n in plan[0].nodes if n.node_id == "own"]
        assert refused[0].action == RS.NODE_CHANGE_ACTION_REFUSED


async def test_bad_definitions_are_refused_naming_the_field_and_store_nothing(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """Each bad definition is INVALID_ARGUMENT naming definitions[web].field; nothing stored."""
    bad = [
        (definition(max_parallel="150%"), "definitions[web].update.max_parallel"),
        (definition(healthy_deadline_seconds=-1.0), "definitions[web].update.healthy_deadline"),
        (_with(definition(), stop_signal="SIGNOPE"), "definitions[web].agent.stop_signal"),
        (_with(definition(), argv=[]), "definitions[web].agent.argv"),
        (
            desired_pb2.Definition(
                name="web",
                selector=common_pb2.LabelSelector(
                    match_expressions=[
                        common_pb2.LabelSelectorRequirement(
                            key="n", operator=common_pb2.SELECTOR_OPERATOR_GT, values=["x"]
                        )
                    ]
                ),
                agent=common_pb2.AgentSpec(argv=["x"]),
            ),
            "definitions[web].selector",
        ),
        (desired_pb2.Definition(name="Bad Name!", agent=common_pb2.AgentSpec(argv=["x"])), "name"),
    ]
    async with desired_env(pki, tmp_path, database_url) as env:
        for message, field in bad:
            err = await rpc_error(env.apply(message))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            assert field in (err.details() or ""), (field, err.details())
        listed = await env.stub.ListDefinitions(fleet_pb2.FleetServiceListDefinitionsRequest())
        assert list(listed.definitions) == []


async def test_a_change_cause_with_nul_is_refused_by_delete_and_undo(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """--message goes to audit and events: a NUL in it is INVALID_ARGUMENT naming
    `message` for delete and undo too (PostgreSQL text cannot hold it; the fuzzer
    found DeleteDefinition answering INTERNAL), and nothing changes."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await env.apply(definition())
        calls = [
            env.stub.DeleteDefinition(
                fleet_pb2.FleetServiceDeleteDefinitionRequest(name="web", message="why\x00")
            ),
            env.stub.UndoRollout(
                fleet_pb2.FleetServiceUndoRolloutRequest(name="web", to_revision=1, message="\x00")
            ),
        ]
        for call in calls:
            err = await rpc_error(call)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            assert (err.details() or "").startswith("message:"), err.details()
        listed = await env.stub.ListDefinitions(fleet_pb2.FleetServiceListDefinitionsRequest())
        current = [(d.current.definition.name, d.current.revision) for d in listed.definitions]
        assert current == [("web", 1)]


def _with(d: desired_pb2.Definition, **agent: Any) -> desired_pb2.Definition:
    out = desired_pb2.Definition()
    out.CopyFrom(d)
    for key, value in agent.items():
        if isinstance(value, list):
            del getattr(out.agent, key)[:]
            getattr(out.agent, key).extend(value)
        else:
            setattr(out.agent, key, value)
    return out


async def test_check_revision_refuses_a_definition_that_moved_on(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """expected_revisions: a stale revision is FAILED_PRECONDITION and stores nothing."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await env.apply(definition())
        await env.apply(definition(version="2.0"), expected_revisions={"web": 1})
        err = await rpc_error(env.apply(definition(version="3.0"), expected_revisions={"web": 1}))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "web changed since revision 1: it is at revision 2" in (err.details() or "")
        err = await rpc_error(env.apply(definition(name="new"), expected_revisions={"new": 3}))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_delete_removes_the_agent_and_undo_restores_a_revision(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """Undo applies revision 1's content as revision 3; delete empties every node."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await env.add("p0", {"env": "prod"})
        await env.apply(definition())
        await until(lambda: env.rollout("web"), lambda r: state(r) == "SUCCESSFUL")
        await env.apply(definition(version="2.0"))
        await until(lambda: env.revisions("web"), lambda r: r == {"p0": 2})
        undo = await env.stub.UndoRollout(
            fleet_pb2.FleetServiceUndoRolloutRequest(name="web", to_revision=1)
        )
        assert (undo.change.revision, undo.change.changed) == (3, True)
        await until(lambda: env.revisions("web"), lambda r: r == {"p0": 3})
        same = await env.stub.UndoRollout(
            fleet_pb2.FleetServiceUndoRolloutRequest(name="web", to_revision=1)
        )
        assert not same.change.changed
        assert "nothing changed" in same.change.summary
        await env.stub.DeleteDefinition(fleet_pb2.FleetServiceDeleteDefinitionRequest(name="web"))
        await until(lambda: env.revisions("web"), lambda r: r == {})


async def test_pause_and_promote_are_operator_actions(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """A canary rollout waits for promotion; promote continues; a finished one refuses."""
    async with desired_env(pki, tmp_path, database_url) as env:
        for i in range(3):
            await env.add(f"p{i}", {"env": "prod"})
        await env.apply(definition())
        await until(lambda: env.rollout("web"), lambda r: state(r) == "SUCCESSFUL")
        await env.apply(definition(version="2.0", canary="1"))
        await until(lambda: env.rollout("web"), lambda r: state(r) == "AWAITING_PROMOTION")
        assert env.revisions("web") == {"p0": 2, "p1": 1, "p2": 1}
        promoted = await env.stub.PromoteRollout(
            fleet_pb2.FleetServicePromoteRolloutRequest(name="web")
        )
        assert promoted.rollout.promoted
        await until(lambda: env.rollout("web"), lambda r: state(r) == "SUCCESSFUL")
        err = await rpc_error(
            env.stub.PauseRollout(fleet_pb2.FleetServicePauseRolloutRequest(name="web"))
        )
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "already ended" in (err.details() or "")


async def test_a_mistyped_name_is_a_definition_that_does_not_exist(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """GetRollout and the controls on an unknown name: NOT_FOUND saying so, not 'no rollout'."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await env.apply(definition())
        for call in (
            env.stub.GetRollout(fleet_pb2.FleetServiceGetRolloutRequest(name="wbe")),
            env.stub.PauseRollout(fleet_pb2.FleetServicePauseRolloutRequest(name="wbe")),
        ):
            err = await rpc_error(call)
            assert err.code() == grpc.StatusCode.NOT_FOUND
            assert err.details() == "definition 'wbe' does not exist"


async def test_nodes_download_only_the_artifacts_of_their_definitions(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """A definition's artifact: its nodes download it, others may not, and it cannot be deleted."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await env.add("p1", {"env": "prod"})
        await env.add("s1", {"env": "staging"})
        with sync_operator(pki, env.manager.port) as sync:
            pushed = await asyncio.to_thread(push, sync, b"web build 7", "web", "7")
        used = digest(b"web build 7")
        web = definition()
        web.artifact.CopyFrom(common_pb2.ArtifactRef(name="web", version="7"))
        await env.apply(web)
        await until(lambda: env.rollout("web"), lambda r: state(r) == "SUCCESSFUL")
        # The node is pushed the complete reference, digest and size filled in.
        spec = next(n for n in env.fleet.nodes if n.node_id == "p1").servicer.pushed["web"]
        assert (spec.artifact.digest, spec.artifact.size_bytes) == (used, len(b"web build 7"))
        assert pushed.artifact.digest == used

        async def download(node: str) -> bytes:
            async with node_stub(pki, node, env.manager.port) as stub:
                request = manager_pb2.DownloadArtifactRequest(node_id=node, digest=used)
                return b"".join([m.data async for m in stub.DownloadArtifact(request, timeout=30)])

        assert await download("p1") == b"web build 7"
        err = await rpc_error(download("s1"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"node/s1 may not download {used}" in (err.details() or "")
        err = await rpc_error(
            env.stub.DeleteArtifact(
                fleet_pb2.FleetServiceDeleteArtifactRequest(name="web", version="7")
            )
        )
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "used by web@1" in (err.details() or "")
        # Deleted, the definition stops referencing it (its revisions stay, history).
        await env.stub.DeleteDefinition(fleet_pb2.FleetServiceDeleteDefinitionRequest(name="web"))
        await env.stub.DeleteArtifact(
            fleet_pb2.FleetServiceDeleteArtifactRequest(name="web", version="7")
        )


async def test_a_rollout_started_during_a_pass_is_not_judged_on_a_stale_scope(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """A definition applied between a pass's scoping and its rollout steps waits for the
    next pass, instead of being judged on a scope without it (SUCCESSFUL, no node moved)."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await env.add("p1", {"env": "prod"})
        convergence = env.manager.convergence
        await convergence.stop()  # drive the pass's phases by hand, interleaved with an apply
        nodes, scopes, live, _ = await convergence._rescope(PassResult())
        await env.apply(definition())
        await convergence._step_rollouts(nodes, scopes, live, PassResult())
        assert state(await env.rollout("web")) == "PENDING"
        convergence.start()
        done = await env.ended("web")
        assert (state(done), done.done) == ("SUCCESSFUL", 1)
        assert env.revisions("web") == {"p1": 1}


async def test_batches_are_judged_by_incremental_passes(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """Between full passes the driver re-judges only the nodes that reported: a rollout's
    batches move in incremental passes and it ends as a full pass would end it."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await _four_nodes_on_the_first_revision(env)
        convergence = env.manager.convergence
        seen: list[PassResult] = []
        observe = convergence._on_pass
        convergence._on_pass = lambda r: (seen.append(r), observe(r))[1]  # type: ignore[method-assign]
        await _the_second_revision_one_node_at_a_time(env)
        moved = [r for r in seen if r.pushed]
        assert [len(r.pushed) for r in moved] == [1, 1, 1, 1]
        assert any(r.incremental for r in moved), [(r.incremental, r.pushed) for r in seen]


async def test_a_rollout_parses_its_revision_once_for_all_its_passes(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """The driver keeps the pushed specs it parsed: a rollout of 4 batches parses the new
    revision once, not once per pass, and still pushes every node that revision."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await _four_nodes_on_the_first_revision(env)
        convergence = env.manager.convergence
        parsed, passes = convergence.parsed, convergence.passes
        await _the_second_revision_one_node_at_a_time(env)
        assert convergence.passes - passes >= 4
        assert convergence.parsed - parsed == 1


async def _four_nodes_on_the_first_revision(env: Env, max_parallel: str = "1") -> None:
    for i in range(4):
        await env.add(f"p{i}", {"env": "prod"})
    await env.apply(definition(max_parallel=max_parallel))
    await until(lambda: env.rollout("web"), lambda r: state(r) == "SUCCESSFUL")


async def _the_second_revision_one_node_at_a_time(env: Env) -> None:
    await env.apply(definition(version="2.0", max_parallel="1"))
    done = await env.ended("web")
    assert (state(done), done.done) == ("SUCCESSFUL", 4)
    assert env.revisions("web") == {f"p{i}": 2 for i in range(4)}


async def test_daemons_that_answer_without_states_are_judged_by_their_reports(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """Older daemons answer a push without their agents' states: the rollout waits for
    their SyncAgentStates, as before, beside a daemon whose answers carry them."""
    async with desired_env(pki, tmp_path, database_url) as env:
        for i in range(3):
            await env.add(f"o{i}", {"env": "prod"}, answer_states=False)
        await env.add("n0", {"env": "prod"})
        await env.apply(definition(max_parallel="1"))
        await until(lambda: env.rollout("web"), lambda r: state(r) == "SUCCESSFUL")
        commits = env.manager.agent_states.commits
        await env.apply(definition(version="2.0", max_parallel="1"))
        done = await env.ended("web")
        assert (state(done), done.done) == ("SUCCESSFUL", 4)
        assert env.revisions("web") == {"o0": 2, "o1": 2, "o2": 2, "n0": 2}
        # Each older daemon reported its push; the other one did not need to.
        assert env.manager.agent_states.commits >= commits + 3


async def test_an_operators_apply_is_not_debounced(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """Pokes from daemons wait out the debounce (bursts make one pass); an apply is an
    operator's action and its rollout starts at once, even with a long debounce."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await env.add("p0", {"env": "prod"})
        await asyncio.sleep(0.5)  # the registration's pass is over
        env.manager.convergence._debounce = 60.0
        started = time.monotonic()
        await env.apply(definition())
        done = await env.ended("web")
        assert state(done) == "SUCCESSFUL"
        assert time.monotonic() - started < 30


async def test_a_slow_push_answer_does_not_hold_the_next_change_back(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """Full passes are paced by their own work, not by their wait for push answers: a
    daemon taking 2 s to answer each push (as one fetching an artifact) gets the next
    definition's push as soon as it is applied, not 3 x 2 s after the previous pass."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await env.add("p0", {"env": "prod"}, push_delay=2.0)
        await env.apply(definition("web"))
        done = await env.ended("web")
        assert state(done) == "SUCCESSFUL"
        started = time.monotonic()
        await env.apply(definition("api"))
        done = await env.ended("api")
        assert state(done) == "SUCCESSFUL"
        # Its own 2 s push, plus a margin for a loaded machine; paced by the wait it
        # took 6-8 s.
        assert time.monotonic() - started < 4.5


async def test_an_answer_older_than_a_stored_report_is_not_stored_over_it(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """The agent crashed right after the daemon took its answer's snapshot, and the report
    of the crash was stored before the answer arrived: the answer (RUNNING) is not stored
    over it, and the node fails on the FATAL instead of counting as done."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await env.add("p0", {"env": "prod"}, crash_after_answer=True)
        await env.apply(definition())
        done = await env.ended("web")
        assert (state(done), done.done, done.failed) == ("FAILED", 0, 1), done.reason
        assert "crashed after the answer" in done.reason
        agents = await env.stub.ListAgents(fleet_pb2.FleetServiceListAgentsRequest(node_id="p0"))
        assert [a.agent.status for a in agents.agents] == [common_pb2.AGENT_STATUS_FATAL]


async def test_an_answer_naming_another_node_is_not_stored(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """A push answer whose snapshot names another node is ignored: nothing is stored for
    either node and the node waits for its own report, which then completes the rollout."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await env.add("p0", {"env": "prod"})
        await env.add("p1", {"env": "prod"})
        liar = env.fleet.nodes[0].servicer
        honest = liar.agent_states

        def lie() -> manager_pb2.SyncAgentStatesRequest:
            snapshot = honest()
            snapshot.node_id = "p1"
            return snapshot

        liar.agent_states = lie  # type: ignore[method-assign]
        await env.apply(definition(max_parallel="2"))
        r = await until(
            lambda: env.rollout("web"),
            lambda r: {n.node_id: n.phase for n in r.nodes}.get("p1") == RS.ROLLOUT_NODE_PHASE_DONE,
        )
        await asyncio.sleep(0.5)  # passes enough to have judged p0 from its answer
        r = await env.rollout("web")
        phases = {n.node_id: n.phase for n in r.nodes}
        assert phases["p0"] == RS.ROLLOUT_NODE_PHASE_UPDATING, r
        agents = await env.stub.ListAgents(fleet_pb2.FleetServiceListAgentsRequest(node_id="p0"))
        assert [a.agent.id for a in agents.agents] == []  # nothing stored for p0
        agents = await env.stub.ListAgents(fleet_pb2.FleetServiceListAgentsRequest(node_id="p1"))
        assert [a.agent.id for a in agents.agents] == ["web"]  # p1's own answer only
        liar.agent_states = honest  # type: ignore[method-assign]
        assert liar.link is not None
        await liar.link.report()
        done = await env.ended("web")
        assert (state(done), done.done) == ("SUCCESSFUL", 2)


async def test_a_rollout_changed_by_another_writer_sends_the_driver_to_a_full_pass(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """An incremental pass steps a rollout only if its row is the one the driver stored: an
    operator's pause (here, or on another replica) in between means no step and a full
    pass, which sees the pause; no node is moved meanwhile."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await _four_nodes_on_the_first_revision(env, max_parallel="2")
        convergence = env.manager.convergence
        await convergence.stop()  # drive the passes by hand
        await env.apply(definition(version="2.0", max_parallel="2"))
        first = await convergence.run_once()  # the full pass: batch 1 moves
        assert env.revisions("web") == {"p0": 2, "p1": 2, "p2": 1, "p3": 1}
        # The batch's answers carried its agents: left to the next pass, to be recorded
        # with the step they lead to.
        assert first.pushed == []
        assert sorted(o.node_id for o in convergence._unrecorded) == ["p0", "p1"]
        await env.stub.PauseRollout(fleet_pb2.FleetServicePauseRolloutRequest(name="web"))
        assert await convergence.run_incremental() is None
        assert convergence._memo is None
        assert convergence._unrecorded == []  # recorded without the step
        assert env.revisions("web") == {"p0": 2, "p1": 2, "p2": 1, "p3": 1}
        again = await convergence.run_once()
        assert (again.incremental, again.pushed) == (False, [])
        assert state(await env.rollout("web")) == "PAUSED"
        assert env.revisions("web") == {"p0": 2, "p1": 2, "p2": 1, "p3": 1}
        convergence.start()
        await env.stub.ResumeRollout(fleet_pb2.FleetServiceResumeRolloutRequest(name="web"))
        done = await env.ended("web")
        assert (state(done), done.done) == ("SUCCESSFUL", 4)
        assert env.revisions("web") == {f"p{i}": 2 for i in range(4)}


async def test_an_apply_of_a_new_revision_starts_its_rollout_without_a_full_pass(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """After a full pass, an apply that changes only what the nodes run has its rollout's
    first batch stepped and pushed by an incremental pass on the memo's nodes and scope
    (no node re-read, nothing re-scoped); one that changes the selector, or a rollout
    superseded meanwhile, sends the driver to a full pass, which re-scopes."""
    async with desired_env(pki, tmp_path, database_url) as env:
        for i in range(4):
            await env.add(f"p{i}", {"env": "prod", "tier": "a" if i < 2 else "b"})
        await env.apply(definition(max_parallel="2"))
        await until(lambda: env.rollout("web"), lambda r: state(r) == "SUCCESSFUL")
        convergence = env.manager.convergence
        await convergence.stop()  # drive the passes by hand
        await convergence.run_once()  # the memo: every node, web's scope
        await env.apply(definition(version="2.0", max_parallel="2"))
        first = await convergence.run_incremental()
        assert first is not None
        assert (first.incremental, first.stepped) == (True, ["web"])
        assert env.revisions("web") == {"p0": 2, "p1": 2, "p2": 1, "p3": 1}
        # The batch's answers are left to the next pass, which records them with step 2.
        assert sorted(o.node_id for o in convergence._unrecorded) == ["p0", "p1"]
        second = await convergence.run_incremental()
        assert second is not None
        assert second.incremental
        assert env.revisions("web") == {f"p{i}": 2 for i in range(4)}
        # A new selector: the memo's scope does not hold; a full pass re-scopes.
        await env.apply(definition(sel="env=prod,tier=a", version="3.0", max_parallel="2"))
        assert await convergence.run_incremental() is None
        assert convergence._memo is None
        assert env.revisions("web") == {f"p{i}": 2 for i in range(4)}
        full = await convergence.run_once()
        assert (full.incremental, full.stepped, full.dropped) == (False, ["web"], 2)
        convergence.start()
        done = await env.ended("web")
        assert (state(done), done.done) == ("SUCCESSFUL", 2)
        assert env.revisions("web") == {"p0": 3, "p1": 3}


async def test_an_apply_that_supersedes_a_live_rollout_is_started_by_a_full_pass(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """A rollout the driver holds, superseded by an apply, is not stepped on the memo: the
    pass after the apply finds it ended and leaves the new rollout to a full pass."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await _four_nodes_on_the_first_revision(env, max_parallel="2")
        convergence = env.manager.convergence
        await convergence.stop()
        await convergence.run_once()
        await env.apply(definition(version="2.0", max_parallel="2"))
        assert (await convergence.run_incremental()) is not None  # batch 1 of revision 2
        await env.apply(definition(version="3.0", max_parallel="2"))
        assert await convergence.run_incremental() is None
        assert convergence._unrecorded == []  # batch 1's answers recorded all the same
        convergence.start()
        done = await env.ended("web")
        assert (state(done), done.done) == ("SUCCESSFUL", 4)
        assert env.revisions("web") == {f"p{i}": 3 for i in range(4)}


async def test_agent_state_changes_run_no_pass_without_a_live_rollout(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """A pass reads every node, and agents' state changes come at a rate that grows
    with the fleet: they run a pass only while a rollout (which judges them) is live."""
    async with desired_env(pki, tmp_path, database_url) as env:
        await env.add("p0", {"env": "prod"}, agents=(SimAgent("a1"),))
        conv = env.manager.convergence
        await until(lambda: conv.passes, lambda n: n >= 1)  # the registration's
        await asyncio.sleep(0.3)
        node = env.fleet.nodes[0]
        assert node.servicer.link is not None
        before = conv.passes
        for i in range(10):  # stopped, running, stopped, ...: a state change each time
            node.servicer.agents["a1"].status = (
                common_pb2.AGENT_STATUS_STOPPED if i % 2 == 0 else common_pb2.AGENT_STATUS_RUNNING
            )
            await node.servicer.link.report()
            await asyncio.sleep(0.1)  # past the driver's debounce: each could be a pass
        # At most the safety pass (every 10 s) may have fallen in.
        assert conv.passes - before <= 1
        # With a rollout live, they do wake the driver (it judges health by them).
        await env.apply(definition(sel="env=prod"))
        await until(lambda: env.rollout("web"), lambda r: state(r) == "SUCCESSFUL")
