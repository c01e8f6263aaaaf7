"""fleetctl in this thread (Typer's CliRunner) against a real manager in another.

The manager is the real `ManagerServer` on 127.0.0.1:0 with mTLS and an
SQLite file, running its own event loop in a thread, because fleetctl runs
`asyncio.run` itself as the command does. Nodes register and report metrics
through the real ManagerService, as daemons do, or are real `DaemonServer`s
(`start_daemon`) supervising real processes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from daemon_helpers import agent, daemon_config, eventually, short_tmp
from manager_harness import FakeClock, manager_config, node_stub, registration, running_manager
from typer.testing import CliRunner, Result

from daemon.config import ManagerLinkConfig
from daemon.server import DaemonServer
from daemon.supervisor.spec import AgentSpec
from fleet.tls import TLSConfig
from fleet.v1 import common_pb2, manager_pb2
from fleetctl.app import app
from manager.pool import PoolConfig
from manager.server import ManagerServer

T = TypeVar("T")

FAST_POOL = PoolConfig(call_timeout=3.0, connect_timeout=1.0, max_attempts=1)
"""An unreachable daemon fails its call within a few seconds."""


@dataclass
class LiveFleet:
    """A running manager, and fleetctl wired to it as operator/alice."""

    manager: ManagerServer
    loop: asyncio.AbstractEventLoop
    pki: Any
    operator: TLSConfig
    home: Path
    _stack: ExitStack
    daemons: list[DaemonServer] = dataclasses.field(default_factory=list)
    _sequence: int = 0

    @property
    def address(self) -> str:
        """The manager's host:port."""
        return f"127.0.0.1:{self.manager.port}"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run `coro` on the manager's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def register(self, node_id: str, **fields: Any) -> None:
        """Register `node_id` as its daemon would (RegisterNode as node/<node_id>)."""

        async def go() -> None:
            async with node_stub(self.pki, node_id, self.manager.port) as stub:
                await stub.RegisterNode(registration(node_id, **fields), timeout=10)

        self.run(go())

    def report(self, node_id: str, metrics: Sequence[common_pb2.MetricData]) -> None:
        """Report one metric batch for `node_id` and wait until it is stored."""
        self._sequence += 1
        request = manager_pb2.ReportMetricsRequest(
            node_id=node_id, sequence=self._sequence, metrics=metrics
        )

        async def go() -> None:
            async with node_stub(self.pki, node_id, self.manager.port) as stub:
                await stub.ReportMetrics(request, timeout=10)

        self.run(go())

    def sync_agents(self, node_id: str, states: Sequence[manager_pb2.AgentState]) -> None:
        """Report `node_id`'s agents as its daemon would (SyncAgentStates), stored on return."""
        request = manager_pb2.SyncAgentStatesRequest(node_id=node_id, states=states)

        async def go() -> None:
            async with node_stub(self.pki, node_id, self.manager.port) as stub:
                await stub.SyncAgentStates(request, timeout=10)

        self.run(go())

    def start_daemon(
        self,
        node_id: str,
        *agent_ids: str,
        labels: dict[str, str] | None = None,
        specs: Sequence[AgentSpec] = (),
    ) -> DaemonServer:
        """A real fleet-daemon for `node_id` supervising `sleep` agents, registered here.

        `labels`: the node labels its daemon.toml would set; `specs`: agents
        of its own to run besides the `sleep` ones.
        """
        root = self._stack.enter_context(short_tmp())
        link = ManagerLinkConfig(addresses=(self.address,), metrics_interval_seconds=3600)
        agents = tuple(agent(a, "sleep", "1000") for a in agent_ids) + tuple(specs)
        cfg = daemon_config(
            root,
            self.pki.issue("node", node_id),
            agents,
            manager=link,
            stop_agents_on_exit=True,
            labels=dict(labels or {}),
        )
        daemon = DaemonServer(cfg)

        async def go() -> None:
            await daemon.start()
            await eventually(lambda: self.manager.nodes.get(node_id), lambda n: n is not None)

        self.run(go())
        self.daemons.append(daemon)
        return daemon

    def fleetctl(
        self, *args: str, env: dict[str, str | None] | None = None, input: str | None = None
    ) -> Result:
        """`fleetctl --manager ... --ca ... --cert ... --key ... ARGS`, isolated from the user."""
        isolated: dict[str, str | None] = {
            "XDG_CONFIG_HOME": str(self.home),
            "FLEETCTL_CONFIG": None,
            "COLUMNS": "200",
            **{f"FLEET_{k}": None for k in ("MANAGER", "CA", "CERT", "KEY", "TIMEOUT", "OUTPUT")},
            "FLEET_TRUST_DOMAIN": None,
            **(env or {}),
        }
        flags = ["--manager", self.address, "--ca", str(self.operator.ca_file)]
        flags += ["--cert", str(self.operator.cert_file), "--key", str(self.operator.key_file)]
        return CliRunner().invoke(app, [*flags, *args], env=isolated, input=input)


@contextmanager
def live_fleet(
    pki: Any,
    tmp_path: Path,
    *,
    pool: PoolConfig = FAST_POOL,
    clock: Callable[[], float] | None = None,
    **options: Any,
) -> Iterator[LiveFleet]:
    """A real manager (SQLite under tmp_path) in a thread, stopped afterwards.

    `clock`: the manager's wall clock (default a FakeClock that stands still;
    rollouts need `time.time`).

    `options`: ManagerServer's keyword options, or `config` changes (a dict of
    ManagerConfig fields).
    """
    config = manager_config(pki, f"sqlite+aiosqlite:///{tmp_path / 'm.db'}", tmp_path / "state")
    config = dataclasses.replace(config, pool=pool, **options.pop("config", {}))
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        async with running_manager(config, clock or FakeClock(), **options) as manager:
            stop = asyncio.Event()
            state.update(manager=manager, loop=asyncio.get_running_loop(), stop=stop)
            ready.set()
            await stop.wait()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced to the test below
            state["error"] = exc
            ready.set()

    thread = threading.Thread(target=run, name="live-manager", daemon=True)
    thread.start()
    ready.wait(30)
    if "error" in state:
        raise state["error"]
    with ExitStack() as stack:
        live = LiveFleet(
            state["manager"], state["loop"], pki, pki.issue("operator", "alice"), tmp_path, stack
        )
        try:
            yield live
        finally:
            for daemon in live.daemons:
                live.run(daemon.stop(1.0))
            state["loop"].call_soon_threadsafe(state["stop"].set)
            thread.join(30)
