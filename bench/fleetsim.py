"""Fleet simulator: N simulated daemons in one process against a real manager.

    python bench/fleetsim.py --nodes 200 --manager 127.0.0.1:7443 \\
        --ca-cert ca.pem --ca-key ca-key.pem --duration 60 [--drop 0.01 ...]

Each simulated node has its own `node/<id>` certificate (minted from the
fleet CA), its own mTLS connection and its own state dir, and speaks
ManagerService through the REAL daemon code: `daemon.manager_link.ManagerLink`
runs without a Supervisor (it only needs `collect` and `snapshot` callables),
so registration, heartbeats at the interval the manager hands out, numbered
metric batches in the bounded outage buffer, RESOURCE_EXHAUSTED retry and
the full-jitter reconnect backoff across addresses are exactly the daemon's.
The only addition is a client interceptor on each node's channel
(`_FaultInterceptor`) that injects faults and records what happened:

- ``drop``: a call fails UNAVAILABLE before it is sent (lost request);
- ``drop_reply``: the call reaches the manager but the answer is lost, so the
  daemon retries the same batch (the manager must store it once);
- ``delay``: every call waits this long first;
- ``heartbeat_jitter``: each heartbeat waits uniform(0, jitter) s more;
- ``cut(nodes, seconds)``: those nodes' calls all fail (a network cut);
- ``restart_storm(fraction, within)``: nodes restart like a daemon process
  (new link, same state dir: sequence numbers continue, the buffer is lost).

Optionally (`daemon_ports=True`) every node also serves DaemonService on its
own port through `bench.sim` (in-memory agents) and registers that address;
its link then reports those agents (revision, health, start time), the
pushed set's version and refusals, and sends them soon after each push, as
the daemon does, so a rollout runs end to end against the simulated fleet.

Every metric batch carries one sample ``values["batch"] = <its sequence>`` so
a test can check in the manager's database that each acknowledged batch was
stored exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
from grpc import aio

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sim import SimNode, start_daemon
from daemon.config import ManagerLinkConfig
from daemon.manager_link import ManagerLink, NodeInfo, PushedSet
from fleet.keepalive import keepalive_args
from fleet.pki import CertificateAuthority
from fleet.retry import Backoff
from fleet.tls import TLSConfig, channel_credentials, channel_options
from fleet.v1 import common_pb2, manager_pb2

__all__ = ["FaultPlan", "FleetSim", "SimLink", "SimSettings"]

_RUNNING = common_pb2.AGENT_STATUS_RUNNING


@dataclass(frozen=True)
class FaultPlan:
    """Faults injected into every simulated node's calls to the manager."""

    drop: float = 0.0
    """Probability a call fails UNAVAILABLE before it is sent."""
    drop_reply: float = 0.0
    """Probability a call is served but its answer is lost (UNAVAILABLE to the node)."""
    delay: float = 0.0
    """Seconds every call waits before it is sent."""
    heartbeat_jitter: float = 0.0
    """Each heartbeat waits uniform(0, heartbeat_jitter) seconds more."""


@dataclass(frozen=True)
class SimSettings:
    """How the simulated daemons behave (the daemon's [manager] table, scaled)."""

    addresses: tuple[str, ...]
    """Manager host:port, tried in order as a daemon does."""
    metrics_interval: float = 5.0
    """Seconds between metric batches per node."""
    samples_per_batch: int = 4
    """Samples in each batch (one of them is the `batch` marker)."""
    buffer_batches: int = 360
    """Outage buffer bound per node (the daemon's buffer_batches)."""
    heartbeat_interval: float = 10.0
    """Interval until the manager hands one out."""
    rpc_timeout: float = 10.0
    """Deadline of each call."""
    reconnect: Backoff = field(default_factory=lambda: Backoff(initial=0.5, maximum=30.0))
    """Full-jitter reconnect backoff (the daemon's [manager.reconnect])."""
    keepalive_time: float = 10.0
    """HTTP/2 keepalive ping interval."""
    keepalive_timeout: float = 5.0
    """Ping ack timeout."""
    daemon_ports: bool = False
    """Also serve DaemonService per node (bench.sim) and register its address."""
    control_stream: bool = False
    """Talk over ManagerService.Connect instead of the unary RPCs. Off: these nodes
    are the original design's daemons (unary calls, which the fault plan and the
    call counts hook); bench/connect_sim.py simulates nodes on the stream."""

    def link_config(self) -> ManagerLinkConfig:
        """The ManagerLinkConfig every simulated node runs with."""
        return ManagerLinkConfig(
            addresses=self.addresses,
            heartbeat_interval_seconds=self.heartbeat_interval,
            metrics_interval_seconds=self.metrics_interval,
            buffer_batches=self.buffer_batches,
            rpc_timeout_seconds=self.rpc_timeout,
            reconnect=self.reconnect,
            keepalive_time_seconds=self.keepalive_time,
            keepalive_timeout_seconds=self.keepalive_timeout,
            control_stream=self.control_stream,
        )


@dataclass
class Record:
    """What the whole simulated fleet did (shared by every node)."""

    register_attempts: list[tuple[float, str]] = field(default_factory=list)
    """(wall time, node) of every RegisterNode call started."""
    registered: list[tuple[float, str, str]] = field(default_factory=list)
    """(wall time, node, address) of every RegisterNode answered OK."""
    calls: Counter[str] = field(default_factory=Counter)
    """Calls answered OK, by method name."""
    failures: Counter[str] = field(default_factory=Counter)
    """Calls failed, by '<method> <status>'."""
    injected: Counter[str] = field(default_factory=Counter)
    """Faults injected, by kind."""


class _FaultInterceptor(aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Injects `FaultPlan` faults into one node's calls and records the outcomes."""

    def __init__(self, link: SimLink) -> None:
        self.link = link

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        link = self.link
        plan = link.fleet.plan
        rng = link.fleet.rng
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        name = method.rsplit("/", 1)[-1]
        record = link.fleet.record
        if name == "RegisterNode":
            record.register_attempts.append((time.time(), link.node_id))
        if plan.delay:
            await asyncio.sleep(plan.delay)
        if name == "Heartbeat" and plan.heartbeat_jitter:
            await asyncio.sleep(rng.uniform(0, plan.heartbeat_jitter))
        if link.cut_until > time.monotonic():
            record.injected["cut"] += 1
            raise _unavailable("network cut")
        if plan.drop and rng.random() < plan.drop:
            record.injected["drop"] += 1
            raise _unavailable("request dropped")
        try:
            response = await (await continuation(details, request))
        except grpc.RpcError as exc:
            record.failures[f"{name} {exc.code().name}"] += 1
            raise
        record.calls[name] += 1
        if name == "RegisterNode":
            record.registered.append((time.time(), link.node_id, link.link.address))
        elif name == "ReportMetrics":
            link.acked.add(request.sequence)
        if plan.drop_reply and rng.random() < plan.drop_reply:
            record.injected["drop_reply"] += 1
            raise _unavailable("reply dropped")
        return response


def _unavailable(why: str) -> aio.AioRpcError:
    return aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, aio.Metadata(), aio.Metadata(), f"fleetsim: {why}", ""
    )


class _Link(ManagerLink):
    """ManagerLink whose channel carries the fault interceptor (nothing else changes)."""

    def __init__(self, sim: SimLink, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._sim = sim

    def _channel(self, address: str) -> aio.Channel:
        # ManagerLink._channel's options, copied: it has no hook for interceptors.
        cfg = self.cfg
        options: list[tuple[str, Any]] = [
            *channel_options(cfg.server_name or f"manager.{self._sim.fleet.trust_domain}"),
            *keepalive_args(
                cfg.keepalive_time_seconds,
                cfg.keepalive_timeout_seconds,
                cfg.ping_timeout_seconds,
            ),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        return aio.secure_channel(
            address,
            channel_credentials(self._sim.tls),
            options=options,
            interceptors=[cast(Any, _FaultInterceptor(self._sim))],
        )


class SimLink:
    """One simulated daemon: a real ManagerLink with synthetic metrics and agents."""

    def __init__(self, fleet: FleetSim, node_id: str, tls: TLSConfig, state_dir: Path) -> None:
        self.fleet = fleet
        self.node_id = node_id
        self.tls = tls
        self.state_dir = state_dir
        self.daemon: SimNode | None = None
        """Its DaemonService (when the fleet serves ports)."""
        self.acked: set[int] = set()
        """Sequences the manager acknowledged (answer received or lost on the way)."""
        self.cut_until = 0.0
        """Monotonic time until which every call fails (a network cut)."""
        self.restarts = 0
        """Times this daemon was restarted (restart storms)."""
        self.link = self._new_link()

    def _new_link(self) -> _Link:
        address = self.daemon.address if self.daemon else "127.0.0.1:1"
        return _Link(
            self,
            self.fleet.settings.link_config(),
            tls=self.tls,
            trust_domain=self.fleet.trust_domain,
            node=NodeInfo(self.node_id, address, {"sim": "yes"}, "fleetsim"),
            state_dir=self.state_dir,
            collect=self._collect,
            snapshot=self._snapshot,
            pushed=self._pushed,
            rng=random.Random(self.fleet.rng.random()),
        )

    def _collect(self) -> Sequence[common_pb2.MetricData]:
        # The batch about to be cut gets the next sequence (one chunk per batch).
        values = {"batch": float(self.link.sequence.peek())}
        for i in range(self.fleet.settings.samples_per_batch - 1):
            values[f"v{i}"] = float(i)
        return [common_pb2.MetricData(type="sim", timestamp=int(time.time() * 1000), values=values)]

    def _snapshot(self) -> Sequence[manager_pb2.AgentState]:
        if self.daemon is not None:
            return list(self.daemon.servicer.agent_states().states)
        return [manager_pb2.AgentState(agent_id="web", type="web", status=_RUNNING, pid=1)]

    def _pushed(self) -> PushedSet:
        if self.daemon is None:
            return PushedSet(0, ())
        d = self.daemon.servicer
        return PushedSet(d.spec_version, list(d.update_errors))

    @property
    def buffered(self) -> list[int]:
        """Sequences waiting in the outage buffer."""
        return self.link.buffer.sequences()

    @property
    def dropped(self) -> int:
        """Batches the buffer bound threw away."""
        return self.link.buffer.dropped_batches

    async def start(self) -> None:
        """Start the link (and the DaemonService first, when configured)."""
        if self.fleet.settings.daemon_ports and self.daemon is None:
            self.daemon = await start_daemon(self.node_id, self.tls)
            # As the daemon: a push changes the agents, so report them soon.
            self.daemon.servicer.on_push = lambda: self.link.agents_changed()
            self.link = self._new_link()
        await self.link.start()

    async def restart(self) -> None:
        """As a daemon process restart: a fresh link on the same state dir."""
        await self.link.stop()
        self.restarts += 1
        self.link = self._new_link()
        await self.link.start()

    async def stop(self) -> None:
        """Stop the link and the DaemonService."""
        await self.link.stop()
        if self.daemon is not None:
            await self.daemon.stop()


class FleetSim:
    """N simulated daemons sharing one CA, one settings object and one Record."""

    def __init__(
        self,
        ca: CertificateAuthority,
        settings: SimSettings,
        *,
        root: Path | None = None,
        plan: FaultPlan | None = None,
        seed: int | None = None,
        quiet: bool = True,
    ) -> None:
        self.ca = ca
        # Thousands of simulated links would log every reconnect; keep errors only.
        self._link_log = logging.getLogger("daemon.manager_link")
        self._log_level = self._link_log.level
        if quiet:
            self._link_log.setLevel(logging.ERROR)
        self.trust_domain = ca.trust_domain
        self.settings = settings
        self.plan = plan or FaultPlan()
        """Faults applied now (replace it to change faults mid-run)."""
        self.rng = random.Random(seed)  # jitter, not crypto
        self.record = Record()
        self._own_root = root is None
        # tmpfs when there is one: each batch fsyncs the node's sequence file.
        shm = Path("/dev/shm")
        self.root = root or Path(
            tempfile.mkdtemp(prefix="fleetsim-", dir=shm if shm.is_dir() else None)
        )
        self.nodes: dict[str, SimLink] = {}

    def add(self, node_id: str) -> SimLink:
        """Create (not start) a node with its own certificate and state dir."""
        tls = self.ca.issue("node", node_id, ips=("127.0.0.1",)).write(self.root / node_id)
        link = SimLink(self, node_id, tls, self.root / node_id / "state")
        link.state_dir.mkdir(parents=True, exist_ok=True)
        self.nodes[node_id] = link
        return link

    async def start(self, count: int, *, prefix: str = "sim", spread: float = 0.0) -> None:
        """Add and start `count` nodes, their starts spread over `spread` seconds."""
        links = [
            self.add(f"{prefix}-{i:05d}") for i in range(len(self.nodes), len(self.nodes) + count)
        ]
        step = spread / max(count, 1)
        for link in links:
            await link.start()
            if step:
                await asyncio.sleep(step)

    async def wait_connected(self, within: float, *, nodes: Sequence[str] | None = None) -> float:
        """Seconds until every (given) node's link is connected; TimeoutError past `within`."""
        t0 = time.monotonic()
        ids = list(nodes) if nodes is not None else list(self.nodes)
        while True:
            if all(self.nodes[n].link.state == "connected" for n in ids):
                return time.monotonic() - t0
            if time.monotonic() - t0 > within:
                waiting = [n for n in ids if self.nodes[n].link.state != "connected"]
                raise TimeoutError(
                    f"{len(waiting)} nodes not connected after {within}s: {waiting[:5]}"
                )
            await asyncio.sleep(0.1)

    def cut(self, node_ids: Sequence[str], seconds: float) -> None:
        """Fail every call of these nodes for `seconds` (a network cut)."""
        until = time.monotonic() + seconds
        for n in node_ids:
            self.nodes[n].cut_until = until

    async def restart_storm(self, fraction: float, within: float) -> int:
        """Restart `fraction` of the nodes (random ones) spread over `within` seconds."""
        chosen = self.rng.sample(list(self.nodes.values()), round(fraction * len(self.nodes)))
        delays = sorted(self.rng.uniform(0, within) for _ in chosen)
        t0 = time.monotonic()
        for link, at in zip(chosen, delays, strict=True):
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            await link.restart()
        return len(chosen)

    def peak_rate(self, since: float, window: float = 1.0) -> int:
        """Most RegisterNode attempts started in any `window`-second window after `since`."""
        return self.peak_window(since, window)[0]

    def peak_window(self, since: float, window: float = 1.0) -> tuple[int, float]:
        """(attempts, start time) of the busiest `window`-second window after `since`."""
        times = sorted(t for t, _ in self.record.register_attempts if t >= since)
        best, at, lo = 0, since, 0
        for hi, t in enumerate(times):
            while times[lo] < t - window:
                lo += 1
            if hi - lo + 1 > best:
                best, at = hi - lo + 1, times[lo]
        return best, at

    def summary(self) -> dict[str, Any]:
        """Counters of the run so far (JSON-friendly)."""
        links = list(self.nodes.values())
        return {
            "nodes": len(links),
            "connected": sum(1 for s in links if s.link.state == "connected"),
            "registrations": sum(s.link.registrations for s in links),
            "calls": dict(self.record.calls),
            "failures": dict(self.record.failures),
            "injected": dict(self.record.injected),
            "batches_acked": sum(len(s.acked) for s in links),
            "batches_buffered": sum(len(s.buffered) for s in links),
            "batches_dropped": sum(s.dropped for s in links),
            "restarts": sum(s.restarts for s in links),
        }

    async def close(self) -> None:
        """Stop every node (and remove the state root if the fleet made it)."""
        await asyncio.gather(*(s.stop() for s in self.nodes.values()), return_exceptions=True)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
        self._link_log.setLevel(self._log_level)

    async def __aenter__(self) -> FleetSim:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    ca = CertificateAuthority.load(args.ca_cert, args.ca_key)
    settings = SimSettings(
        addresses=tuple(args.manager),
        metrics_interval=args.metrics_interval,
        samples_per_batch=args.samples,
        buffer_batches=args.buffer,
        reconnect=Backoff(initial=args.backoff_initial, maximum=args.backoff_max),
        daemon_ports=args.daemon_ports,
    )
    plan = FaultPlan(args.drop, args.drop_reply, args.delay, args.heartbeat_jitter)
    async with FleetSim(ca, settings, plan=plan, seed=args.seed) as fleet:
        t0 = time.time()
        await fleet.start(args.nodes, prefix=args.prefix, spread=args.spread)
        with contextlib.suppress(TimeoutError):
            took = await fleet.wait_connected(args.duration)
            print(f"all {args.nodes} nodes connected after {took:.1f}s", file=sys.stderr)
        if args.cut:
            cut = fleet.rng.sample(sorted(fleet.nodes), round(args.cut * len(fleet.nodes)))
            fleet.cut(cut, args.cut_seconds)
            print(f"cut {len(cut)} nodes off for {args.cut_seconds}s", file=sys.stderr)
        if args.restart_storm:
            n = await fleet.restart_storm(args.restart_storm, args.storm_within)
            print(f"restarted {n} nodes within {args.storm_within}s", file=sys.stderr)
        await asyncio.sleep(max(0.0, t0 + args.duration - time.time()))
        out = fleet.summary()
        out["peak_register_per_s"] = fleet.peak_rate(t0)
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=100, help="simulated daemons")
    parser.add_argument("--manager", action="append", required=True, help="host:port (repeat)")
    parser.add_argument("--ca-cert", type=Path, required=True, help="fleet CA certificate")
    parser.add_argument(
        "--ca-key", type=Path, required=True, help="fleet CA key (mints node certs)"
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to run")
    parser.add_argument("--prefix", default="sim", help="node ids are <prefix>-<n>")
    parser.add_argument("--spread", type=float, default=0.0, help="seconds over which nodes start")
    parser.add_argument("--metrics-interval", type=float, default=5.0)
    parser.add_argument("--samples", type=int, default=4, help="samples per batch")
    parser.add_argument("--buffer", type=int, default=360, help="outage buffer (batches)")
    parser.add_argument("--backoff-initial", type=float, default=0.5)
    parser.add_argument("--backoff-max", type=float, default=30.0)
    parser.add_argument("--daemon-ports", action="store_true", help="serve DaemonService per node")
    parser.add_argument("--drop", type=float, default=0.0, help="P(call lost before sending)")
    parser.add_argument("--drop-reply", type=float, default=0.0, help="P(answer lost)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds added to each call")
    parser.add_argument("--heartbeat-jitter", type=float, default=0.0, help="extra s per heartbeat")
    parser.add_argument("--cut", type=float, default=0.0, help="fraction of nodes cut off")
    parser.add_argument("--cut-seconds", type=float, default=10.0, help="how long the cut lasts")
    parser.add_argument("--restart-storm", type=float, default=0.0, help="fraction restarted")
    parser.add_argument("--storm-within", type=float, default=5.0, help="seconds of the storm")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(_main(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
