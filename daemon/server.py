"""The daemon process's lifecycle: build everything, start, reload, stop.

Start order matters: the agent socket is listening before the supervisor
starts (or re-adopts) agents, so an agent never finds no daemon; the
DaemonService listens before the manager link registers its address; READY
is sent to systemd last. With an empty `listen` there is no TCP server: the
same DaemonService servicer serves the manager's commands on the control
stream only (daemon.commands), and the hello's daemon_address is empty.
Stop runs the other way round and leaves agents running unless
`stop_agents_on_exit` (re-adoption picks them up again).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grpc import aio

from daemon.artifacts import ArtifactCache, CacheLimits
from daemon.config import DaemonConfig, load_daemon_config
from daemon.convert import agent_state, host_metrics, resource_metrics, update_errors
from daemon.jobs.engine import JobEngine
from daemon.jobs.reporter import JobReporter
from daemon.manager_link import LinkState, ManagerLink, NodeInfo, PushedSet
from daemon.peercred import PeerCredProxy
from daemon.renewal import CertRenewer
from daemon.servicers.agent_service import AgentServicer
from daemon.servicers.daemon_service import DaemonServicer
from daemon.stalls import Stalls
from daemon.supervisor.supervisor import AgentSnapshot, Supervisor
from fleet.errors import ConfigError, FleetError
from fleet.interceptors import ErrorMappingInterceptor
from fleet.listen import check_listen_addresses, check_unix_socket_free
from fleet.service import add_health_and_reflection, start_metrics_http_server
from fleet.systemd import SystemdNotifier
from fleet.tls import server_credentials
from fleet.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    common_pb2,
    daemon_pb2,
    daemon_pb2_grpc,
    manager_pb2,
)

if TYPE_CHECKING:
    from daemon.metrics import MetricSources

__all__ = ["AGENT_SOCKET_NAME", "DaemonServer", "advertised_address"]

log = logging.getLogger(__name__)

AGENT_SOCKET_NAME = "agent.sock"
"""The agent socket inside run_dir (what FLEET_DAEMON_SOCKET points at)."""
DAEMON_SERVICE_NAME = daemon_pb2.DESCRIPTOR.services_by_name["DaemonService"].full_name
AGENT_SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name

# The manager's pooled client pings every ~10 s; a server refuses (GOAWAY
# too_many_pings) pings more frequent than its minimum, 5 min by default.
_SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
]


def advertised_address(cfg_advertise: str, listen: str, port: int) -> str:
    """host:port the manager should dial: `advertise`, else `listen` with the real port
    and a wildcard host replaced by this host's name."""
    if cfg_advertise:
        return cfg_advertise
    host = listen.rpartition(":")[0]
    if host in ("", "0.0.0.0", "[::]", "::"):  # noqa: S104  # wildcard: not dialable
        host = socket.getfqdn()
    return f"{host}:{port}"


def _daemon_version() -> str:
    try:
        return metadata.version("fleet")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class DaemonServer:
    """One daemon: supervisor, DaemonService, agent socket, manager link, metrics."""

    def __init__(self, cfg: DaemonConfig, *, config_path: Path | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.identity = cfg.tls.identity()
        self.notifier = SystemdNotifier()
        self.port = 0
        self.metrics_port = 0
        self.advertised = ""
        self._agents: list[AgentSnapshot] = []  # read by the metrics thread
        self._last_sent: dict[str, int] = {}
        self._grpc: aio.Server | None = None
        self._agent_grpc: aio.Server | None = None
        self._stop_metrics: Callable[[], None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._health: Any = None
        self._agent_health: Any = None
        run_dir = cfg.run_dir
        self.socket_path = run_dir / AGENT_SOCKET_NAME
        self._private_dir = run_dir / "private"
        self.proxy = PeerCredProxy(self.socket_path, self._private_dir / "agent-grpc.sock")
        self.jobs = JobEngine(
            cfg.jobs,
            root=cfg.jobs_dir,
            config_path=str(config_path) if config_path else "the daemon's config",
            on_change=self._on_job_change,
        )
        """Jobs the manager runs on this node (daemon.jobs)."""
        self.job_reporter = JobReporter(self.jobs, cfg.node_id)
        self.stalls = Stalls()
        """When this process last stopped running (daemon.stalls); its ticker runs from start."""
        self._stall_watch: asyncio.Task[None] | None = None
        self.link = ManagerLink(
            cfg.manager,
            tls=cfg.tls,
            trust_domain=self.identity.trust_domain,
            node=NodeInfo(
                node_id=cfg.node_id,
                daemon_address="",
                labels=dict(cfg.labels),
                jobs_disabled=not cfg.jobs.enabled,
            ),
            state_dir=cfg.state_dir,
            collect=self._collect_metrics,
            snapshot=self._agent_states,
            on_state=self._on_link_state,
            pushed=self._pushed_set,
            jobs=self.job_reporter.run,
            stalls=self.stalls,
        )
        art = cfg.artifacts
        self.artifacts = ArtifactCache(
            cfg.state_dir / "artifacts",
            self.link.download_artifact,
            CacheLimits(
                max_bytes=art.max_bytes,
                max_unpacked_bytes=art.max_unpacked_bytes,
                max_files=art.max_files,
                keep_recent=art.keep_recent,
            ),
        )
        """Artifacts of pushed specs, fetched through the manager link (daemon.artifacts)."""
        self.supervisor = Supervisor(
            state_dir=cfg.state_dir,
            log_dir=cfg.log_dir,
            socket_path=self.socket_path,
            on_change=self._on_change,
            sample_interval=cfg.sample_interval_seconds,
            sample_buffer=cfg.sample_buffer,
            artifacts=self.artifacts,
            artifact_wait=art.wait_seconds,
            on_refused=self.link.agents_changed,
        )
        self.servicer = DaemonServicer(
            self.supervisor,
            self.jobs,
            trust_domain=self.identity.trust_domain,
            follow_interval=min(cfg.sample_interval_seconds, 0.5),
            link=self.link,
        )
        """What the manager may ask: served on `listen` and on the control stream."""
        self.link.commands = self.servicer  # built after the link: it needs the supervisor
        self.renewer = CertRenewer(
            cfg.tls,
            self.identity,
            self.link,
            # A DaemonConfig built in code may hold a plain fleet.tls.TLSConfig (no such key).
            enabled=getattr(cfg.tls, "auto_renew", True),
        )
        """Renews the certificate over the link at two thirds of its lifetime (daemon.renewal)."""

    # --- callbacks ------------------------------------------------------

    def _on_change(self, _snapshot: AgentSnapshot) -> None:
        self._agents = self.supervisor.list()
        self.link.agents_changed()

    def _on_job_change(self, job_id: str) -> None:
        self.job_reporter.poke(job_id)

    def _on_link_state(self, state: LinkState, address: str) -> None:
        self.notifier.status(f"manager {address}: {state}; {len(self._agents)} agents")

    def _pushed_set(self) -> PushedSet:
        return PushedSet(self.supervisor.version, update_errors(self.supervisor.refused))

    def _agent_states(self) -> Sequence[manager_pb2.AgentState]:
        return [agent_state(s) for s in self.supervisor.list()]

    def _collect_metrics(self) -> list[common_pb2.MetricData]:
        """The host sample plus every agent sample not yet sent."""
        out = host_metrics(self.supervisor.host_sample())
        now_ms = int(time.time() * 1000)
        span = self.cfg.sample_interval_seconds * self.cfg.sample_buffer
        for snap in self.supervisor.list():
            last = self._last_sent.get(snap.id, 0)
            window = min(span, (now_ms - last) / 1000 + 1) if last else span
            for sample in self.supervisor.samples(snap.id, window):
                if sample.timestamp_ms > last:
                    out.extend(resource_metrics(snap.id, sample))
                    last = sample.timestamp_ms
            self._last_sent[snap.id] = last
        for gone in self._last_sent.keys() - {s.id for s in self.supervisor.list()}:
            del self._last_sent[gone]
        return out

    def _metric_sources(self) -> MetricSources:
        sup = self.supervisor
        link = self.link
        from daemon.metrics import MetricSources

        return MetricSources(
            agents=lambda: list(self._agents),
            restarts_total=lambda: sup.restarts_total,
            sampling_seconds=lambda: sup.sample_seconds_total,
            buffer_batches=lambda: len(link.buffer),
            buffer_capacity=link.buffer.capacity,
            dropped_batches=lambda: link.buffer.dropped_batches,
            dropped_samples=lambda: link.buffer.dropped_samples,
            link_state=lambda: link.state,
            link_mode=lambda: link.mode,
            reconnects=lambda: link.reconnects,
            commands=lambda: dict(link.commands_run),
            registrations=lambda: link.registrations,
            agent_connections=lambda: self.proxy.connections,
            certificate_expiry=self.renewer.expiry_timestamp,
            certificate_renewals=lambda: dict(self.renewer.outcomes),
        )

    # --- lifecycle ------------------------------------------------------

    def _make_dirs(self) -> None:
        for path, mode in (
            (self.cfg.state_dir, 0o700),
            (self.cfg.log_dir, 0o750),
            (self.cfg.run_dir, 0o750),
            (self._private_dir, 0o700),
        ):
            try:
                path.mkdir(parents=True, exist_ok=True, mode=mode)
            except OSError as exc:
                raise ConfigError(f"cannot create {path}: {exc.strerror or exc}") from None
        os.chmod(self._private_dir, 0o700)  # only the daemon may reach the raw gRPC socket

    async def start(self) -> None:
        """Bring everything up; ConfigError for an unusable address or directory.

        Every listen address and the agent socket are checked first, so a
        daemon that cannot serve fails in one line having changed nothing: no
        agent started, no agents.json written, no directory created.
        """
        check_listen_addresses(
            [("listen", self.cfg.listen), ("metrics_listen", self.cfg.metrics_listen)]
        )
        check_unix_socket_free(self.socket_path, what="agent socket")
        self._make_dirs()
        # Agent socket first: agents (re-adopted or new) may call at once.
        self._agent_grpc = aio.server(interceptors=[ErrorMappingInterceptor()])
        agent_pb2_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(
                self.supervisor,
                identify=self.proxy.lookup,
                metric_sink=self.link.add_metrics,
                heartbeat_interval=self.cfg.agent_heartbeat_interval_seconds,
            ),
            self._agent_grpc,
        )
        # Health and reflection tell nothing about agents; any process that may
        # open the socket may ask them, as on the daemon's TCP port.
        self._agent_health = add_health_and_reflection(self._agent_grpc, [AGENT_SERVICE_NAME])
        upstream = self.proxy.upstream_path
        with contextlib.suppress(FileNotFoundError):
            upstream.unlink()
        self._agent_grpc.add_insecure_port(f"unix:{upstream}")
        await self._agent_grpc.start()
        await self.proxy.start()

        await self.supervisor.start(
            self.cfg.agents,
            config_name=self.config_path.name if self.config_path else "config",
        )
        self._agents = self.supervisor.list()
        await self.jobs.start()  # re-adopts running job steps before the manager may call

        if self.cfg.listen:
            await self._serve_tcp()
        # else: no port at all; the manager reaches this daemon on its control stream.

        self.link.node = dataclasses.replace(
            self.link.node, daemon_address=self.advertised, daemon_version=_daemon_version()
        )
        self._stall_watch = asyncio.create_task(self.stalls.run(), name="stall-watch")
        await self.link.start()
        await self.renewer.start()

        if self.cfg.metrics_listen:
            from daemon.metrics import daemon_registry  # prometheus_client only when serving

            registry = daemon_registry(self._metric_sources())
            self._stop_metrics, self.metrics_port = start_metrics_http_server(
                self.cfg.metrics_listen, registry
            )
        self.notifier.ready()
        self._watchdog = asyncio.create_task(self.notifier.watchdog_loop())
        log.info(
            "daemon %s serving on %s, agent socket %s, %d agents",
            self.cfg.node_id,
            f"port {self.port} (advertised {self.advertised})"
            if self.cfg.listen
            else "the control stream only (no listening port)",
            self.socket_path,
            len(self._agents),
        )

    async def _serve_tcp(self) -> None:
        self._grpc = aio.server(interceptors=[ErrorMappingInterceptor()], options=_SERVER_OPTIONS)
        daemon_pb2_grpc.add_DaemonServiceServicer_to_server(self.servicer, self._grpc)
        self._health = add_health_and_reflection(self._grpc, [DAEMON_SERVICE_NAME])
        try:
            creds = server_credentials(self.cfg.tls)
            self.port = self._grpc.add_secure_port(self.cfg.listen, creds)
        except RuntimeError as exc:
            raise ConfigError(f"listen: cannot listen on {self.cfg.listen}: {exc}") from None
        await self._grpc.start()
        self.advertised = advertised_address(self.cfg.advertise, self.cfg.listen, self.port)

    async def reload(self) -> None:
        """SIGHUP: re-read the TOML and apply its [[agents]]; a bad file changes nothing."""
        if self.config_path is None:
            log.warning("SIGHUP: no config file to reload")
            return
        try:
            new = load_daemon_config(self.config_path)
            result = await self.supervisor.reload(new.agents)
        except (ConfigError, FleetError, ValueError) as exc:
            log.warning("reload refused, nothing changed: %s", exc)
            return
        if dataclasses.replace(new, agents=()) != dataclasses.replace(self.cfg, agents=()):
            log.warning("reload: only [[agents]] are applied; other settings need a restart")
        self.cfg = dataclasses.replace(self.cfg, agents=new.agents)
        log.info(
            "reloaded %s: added %s, changed %s, removed %s, reconfigured %s",
            self.config_path,
            list(result.added),
            list(result.changed),
            list(result.removed),
            list(result.reconfigured),
        )

    async def stop(self, grace: float) -> None:
        """Stop serving; agents keep running unless `stop_agents_on_exit`."""
        self.notifier.stopping()
        for task in (self._watchdog, self._stall_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for health in (self._health, self._agent_health):
            if health is not None:
                await health.enter_graceful_shutdown()
        await self.renewer.stop()
        await self.link.stop()
        log.debug("stop: manager link closed")
        if self._grpc is not None:
            await self._grpc.stop(grace)
        log.debug("stop: DaemonService closed")
        await self.proxy.stop()
        if self._agent_grpc is not None:
            await self._agent_grpc.stop(min(grace, 1.0))
        log.debug("stop: agent socket closed")
        await self.jobs.stop()  # running job steps keep running, re-adopted at the next start
        await self.supervisor.stop(stop_agents=self.cfg.stop_agents_on_exit)
        log.debug("stop: supervisor stopped")
        if self._stop_metrics is not None:
            await asyncio.to_thread(self._stop_metrics)
        log.info(
            "daemon stopped (%s)",
            "agents stopped" if self.cfg.stop_agents_on_exit else "agents left running",
        )

    async def _abort(self) -> None:
        """After a failed start: close sockets and servers, never touch agents."""
        with contextlib.suppress(Exception):
            await self.renewer.stop()
        with contextlib.suppress(Exception):
            await self.link.stop()
        for server in (self._grpc, self._agent_grpc):
            if server is not None:
                with contextlib.suppress(Exception):
                    await server.stop(0)
        with contextlib.suppress(Exception):
            await self.jobs.stop()
        with contextlib.suppress(Exception):
            await self.proxy.stop()
        if self._stop_metrics is not None:
            await asyncio.to_thread(self._stop_metrics)

    async def run(self, stop_event: asyncio.Event | None = None) -> None:
        """start(); serve until SIGTERM/SIGINT (SIGHUP reloads); stop(grace)."""
        from fleet.service import run_until_signalled

        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[None]] = set()

        def on_hup() -> None:
            task = loop.create_task(self.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        previous = signal.getsignal(signal.SIGHUP)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        try:
            await run_until_signalled(
                self.start, self.stop, grace=self.cfg.shutdown_grace_seconds, stop_event=stop_event
            )
        except BaseException:
            await self._abort()
            raise
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            signal.signal(signal.SIGHUP, previous if previous is not None else signal.SIG_DFL)
            for task in reloads:
                task.cancel()
