"""A rollout judged from the PushUpdate answers: real manager, real daemons, real agents.

The daemons (DaemonServer in-process, real agent processes) answer a push
with their agents' states; the manager stores them as a SyncAgentStates
and judges the batch at once. n1 is dialled (its DaemonService on a TCP
port, unary link), n2 speaks only over its Connect control stream (no
port). Their reports are held back by a long coalescing delay, so a
rollout that ends within it was judged from the answers alone. (An older
daemon that answers without states: `test_desired_state.py`, with
simulated daemons.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from daemon_helpers import daemon_config, eventually, short_tmp
from fleet_harness import FAST_POOL, operator_stub, selector
from manager_harness import manager_config

from daemon.config import ManagerLinkConfig
from daemon.server import DaemonServer
from fleet.v1 import common_pb2, desired_pb2, fleet_pb2, fleet_pb2_grpc
from manager.server import ManagerServer

T = TypeVar("T")
SLEEP = shutil.which("sleep") or "/bin/sleep"
FALSE = shutil.which("false") or "/bin/false"
HELD = 60.0
"""sync_coalesce_seconds of the daemons that must not report during the test."""


@dataclass
class Env:
    manager: ManagerServer
    stub: fleet_pb2_grpc.FleetServiceStub
    daemons: dict[str, DaemonServer]

    async def apply(self, argv: list[str], *, start_secs: float = 0.0, **agent: Any) -> None:
        d = desired_pb2.Definition(
            name="web",
            selector=selector("env=prod"),
            agent=common_pb2.AgentSpec(
                argv=argv,
                autostart=True,
                start_secs=start_secs,
                stop_timeout_seconds=2.0,
                **agent,
            ),
            update=desired_pb2.UpdatePolicy(
                max_parallel="1",
                min_healthy_time_seconds=0.0,
                healthy_deadline_seconds=20.0,
                progress_deadline_seconds=40.0,
            ),
        )
        await self.stub.ApplyDefinitions(
            fleet_pb2.FleetServiceApplyDefinitionsRequest(definitions=[d])
        )

    async def rollout(self) -> desired_pb2.Rollout:
        reply = await self.stub.GetRollout(fleet_pb2.FleetServiceGetRolloutRequest(name="web"))
        return reply.rollout

    async def ended(self, revision: int, within: float) -> desired_pb2.Rollout:
        return await eventually(
            self.rollout,
            lambda r: r.target_revision == revision and r.ended_at > 0,
            within=within,
        )


@asynccontextmanager
async def answer_env(
    pki: Any, tmp_path: Path, database_url: str, *, coalesce: float
) -> AsyncIterator[Env]:
    """A manager and two daemons: n1 dialled, n2 on its control stream only."""
    config = manager_config(pki, database_url, tmp_path / "state")
    manager = ManagerServer(dataclasses.replace(config, pool=FAST_POOL), clock=time.time)
    await manager.start()
    async with AsyncExitStack() as stack:
        stack.push_async_callback(manager.stop, 1.0)
        stub = await stack.enter_async_context(operator_stub(pki, manager.port))
        daemons: dict[str, DaemonServer] = {}
        for node_id, stream in (("n1", False), ("n2", True)):
            root = stack.enter_context(short_tmp())
            link = ManagerLinkConfig(
                addresses=(f"127.0.0.1:{manager.port}",),
                metrics_interval_seconds=3600,
                sync_coalesce_seconds=coalesce,
                rpc_timeout_seconds=5,
                control_stream=stream,
            )
            cfg = daemon_config(
                root,
                pki.issue("node", node_id),
                (),
                manager=link,
                labels={"env": "prod"},
                stop_agents_on_exit=True,  # the pushed agents end with the test
                **({"listen": ""} if stream else {}),
            )
            daemon = DaemonServer(cfg)
            await daemon.start()
            stack.push_async_callback(daemon.stop, 1.0)
            daemons[node_id] = daemon
        for node_id, mode in (("n1", "unary"), ("n2", "stream")):
            await eventually(
                lambda node_id=node_id: _online(manager, node_id), lambda ok: ok, within=20
            )
            link = daemons[node_id].link
            await eventually(lambda link=link: _mode(link), lambda m, mode=mode: m == mode)
        yield Env(manager, stub, daemons)


async def _mode(link: Any) -> str:
    return str(link.mode)


async def _online(manager: ManagerServer, node_id: str) -> bool:
    node = await manager.nodes.get(node_id)
    return node is not None and node.status == "online"


async def test_a_rollout_completes_from_the_push_answers_on_both_transports(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """Two revisions roll out, one node per batch, with every report held back for a
    minute: each batch was judged from its answers; both daemons run the agent."""
    async with answer_env(pki, tmp_path, database_url, coalesce=HELD) as env:
        commits = env.manager.agent_states.commits
        started = time.monotonic()
        await env.apply([SLEEP, "1000"])
        first = await env.ended(1, within=30)
        await env.apply([SLEEP, "1001"])
        second = await env.ended(2, within=30)
        took = time.monotonic() - started
        assert (first.state, second.state) == (RS.ROLLOUT_STATE_SUCCESSFUL,) * 2, second.reason
        assert second.done == 2
        assert took < HELD  # no report arrived meanwhile: the answers were the evidence
        assert env.manager.agent_states.commits == commits
        for daemon in env.daemons.values():
            web = daemon.supervisor.get("web")
            assert (web.status.value, web.revision) == ("RUNNING", 2)
        # The manager stored the answers as reports: agents list shows them.
        reply = await env.stub.ListAgents(fleet_pb2.FleetServiceListAgentsRequest())
        web_rows = {a.node_id: a for a in reply.agents if a.agent.id == "web"}
        assert sorted(web_rows) == ["n1", "n2"]
        assert {a.agent.status for a in web_rows.values()} == {common_pb2.AGENT_STATUS_RUNNING}
        assert {a.agent.revision for a in web_rows.values()} == {2}


async def test_a_daemon_does_not_report_again_what_its_answer_carried(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """With reports prompt (50 ms coalescing), a rollout's pushes bring no SyncAgentStates:
    each daemon's next snapshot is the one its answer carried, so it is not sent; a later
    change is."""
    async with answer_env(pki, tmp_path, database_url, coalesce=0.05) as env:
        states = env.manager.agent_states
        await eventually(_const(states), lambda s: s.commits >= 1)  # the first snapshots
        await asyncio.sleep(0.5)
        commits = states.commits
        await env.apply([SLEEP, "1000"])
        done = await env.ended(1, within=30)
        assert done.state == RS.ROLLOUT_STATE_SUCCESSFUL, done.reason
        await asyncio.sleep(1.0)  # 20 coalescing delays
        assert states.commits == commits
        # One AGENT_STATE_CHANGED per node for the new agent (RUNNING), from its answer.
        events = env.stub.WatchEvents(
            fleet_pb2.FleetServiceWatchEventsRequest(
                kinds=[fleet_pb2.EVENT_KIND_AGENT_STATE_CHANGED]
            )
        )
        changed = [
            (m.event.node_id, m.event.actor) async for m in events if m.event.agent_id == "web"
        ]
        assert sorted(changed) == [("n1", "node/n1"), ("n2", "node/n2")]
        # A change after the answer is reported as before.
        await env.daemons["n1"].supervisor.operate("web", "restart")
        await eventually(_const(states), lambda s: s.commits > commits)


def _const(value: T) -> Callable[[], Awaitable[T]]:
    async def probe() -> T:
        return value

    return probe


async def test_an_agent_that_does_not_start_is_not_healthy_in_the_answer(
    pki: Any, tmp_path: Path, database_url: str
) -> None:
    """An agent that exits at once (start_secs 1) is STARTING in the answer, never DONE:
    its node fails on the FATAL its daemon reports; a program this host lacks is refused
    in the answer itself."""
    async with answer_env(pki, tmp_path, database_url, coalesce=0.05) as env:
        await env.apply([FALSE], start_secs=1.0, max_retries=1)
        failed = await env.ended(1, within=40)
        assert failed.state == RS.ROLLOUT_STATE_FAILED
        assert failed.done == 0, [(n.node_id, n.phase) for n in failed.nodes]
        assert "FATAL" in failed.reason, failed.reason

        await env.apply(["/nonexistent/program"])
        refused = await env.ended(2, within=30)
        assert refused.state == RS.ROLLOUT_STATE_FAILED
        assert refused.done == 0
        assert "/nonexistent/program" in refused.reason, refused.reason


RS = desired_pb2
