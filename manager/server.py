"""The manager process's lifecycle: build, start, stop(grace).

`ManagerServer.start()` opens (and migrates) the database, starts the metric
writer, the heartbeat flusher, the sweeper, the metrics lifecycle job and the
artifact janitor, then serves ManagerService (mTLS), gRPC health and reflection, and the
Prometheus endpoint. `stop(grace)` undoes it in reverse: stop accepting and
drain in-flight calls within the grace, stop the background jobs, flush the
heartbeat map, drain the metric queue, close the database. What a call
acknowledged is committed before the database is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc import aio

from fleet.errors import ConfigError, FailedPrecondition
from fleet.interceptors import ErrorMappingInterceptor
from fleet.keepalive import keepalive_args
from fleet.listen import check_listen_addresses
from fleet.observability import start_metrics_http_server
from fleet.pki import CertificateAuthority
from fleet.service import add_health_and_reflection
from fleet.tls import TLSConfig, TLSFileError, server_credentials
from fleet.v1 import (
    fleet_pb2,
    fleet_pb2_grpc,
    manager_pb2,
    manager_pb2_grpc,
    replica_pb2,
    replica_pb2_grpc,
)
from manager.config import ManagerConfig
from manager.httpapi.app import FleetHttpApp
from manager.httpapi.server import HttpServer
from manager.metrics import (
    CertificateExpiry,
    ManagerMetrics,
    RpcMetricsInterceptor,
    watch_loop_lag,
)
from manager.pool import DaemonPool
from manager.pool.stream import ControlStreams
from manager.service.agents import AgentStates
from manager.service.artifacts import ArtifactAccess, ArtifactReferences, Artifacts
from manager.service.capacity import HostCapacity
from manager.service.certificates import Certificates
from manager.service.control import StreamLiveness
from manager.service.convergence import Convergence
from manager.service.definitions import ArtifactUse, Definitions
from manager.service.deny_list import DenyList
from manager.service.enroll_admin import EnrollmentAdmin
from manager.service.enrollment import EnrollLimiter
from manager.service.event_feed import EventFeed
from manager.service.heartbeats import HeartbeatBuffer
from manager.service.job_control import Jobs
from manager.service.job_driver import JobDriver
from manager.service.job_reports import JobReports
from manager.service.job_updates import JobUpdates
from manager.service.liveness import LivenessPolicy, stream_refresh_interval
from manager.service.metrics import MetricsService
from manager.service.registry import NodeRegistry
from manager.service.replicas import StreamDirectory
from manager.service.reports import DaemonReports
from manager.service.rollout_control import RolloutControl
from manager.service.self_renewal import SelfRenewal
from manager.service.sweeper import ArtifactJanitor, JobJanitor, MetricsLifecycle, Sweeper
from manager.servicers.control import ControlChannel
from manager.servicers.enrollment import EnrollmentServicer
from manager.servicers.enrollment import start_server as start_enrollment_server
from manager.servicers.fleet_service import SERVICE_NAME as FLEET_SERVICE_NAME
from manager.servicers.fleet_service import build_fleet_servicer
from manager.servicers.manager_service import ManagerServicer
from manager.servicers.replica import ReplicaServicer
from manager.storage import Database, EventRepository, NodeRepository
from manager.storage.artifacts import ArtifactRepository
from manager.storage.desired import DesiredStateRepository
from manager.storage.enrollment import EnrollmentRepository
from manager.storage.jobs import JobRepository
from manager.storage.metrics import MetricStore
from manager.storage.removal import RemovalRepository
from manager.storage.replicas import ReplicaRepository
from manager.storage.writer import MetricWriter

__all__ = ["SERVICE_NAME", "ManagerServer", "open_database"]

log = logging.getLogger(__name__)

SERVER_HANDSHAKE_TIMEOUT_MS = 20_000
"""How long the manager waits for a new connection's TLS handshake (a daemon's own
connect timeout; gRPC core's default is 120 s)."""

SERVICE_NAME: str = manager_pb2.DESCRIPTOR.services_by_name["ManagerService"].full_name
"""Full name of the service, for health and reflection."""
REPLICA_SERVICE_NAME: str = replica_pb2.DESCRIPTOR.services_by_name["ReplicaService"].full_name


def tls_config(config: ManagerConfig) -> TLSConfig:
    """The manager's TLSConfig from the [tls] table."""
    t = config.tls
    return TLSConfig(ca_file=t.ca_file, cert_file=t.cert_file, key_file=t.key_file)


async def open_database(config: ManagerConfig, *, migrate: bool | None = None) -> Database:
    """Open the configured database and migrate it (or check its schema)."""
    if not config.database.url:
        try:
            config.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"state_dir {config.state_dir}: cannot create: {exc}") from None
    db = await Database.open(
        config.database_url,
        busy_timeout_ms=config.database.busy_timeout_ms,
        pool_size=config.database.pool_size,
        retry_timeout_s=config.database.retry_timeout_seconds,
        exclusive=True,
    )
    try:
        if config.database.migrate_on_start if migrate is None else migrate:
            await db.migrate()
        else:
            await db.check_schema()
    except BaseException:
        await db.close()
        raise
    return db


def load_issuer(config: ManagerConfig, trust_domain: str) -> CertificateAuthority | None:
    """The CA that signs node certificates ([enroll] issuer_*), None if not configured.

    ConfigError (one line) if it is unusable, does not chain to the fleet CA
    (`tls.ca_file`), belongs to another trust domain or has expired.
    """
    e = config.enroll
    if e.issuer_cert_file is None or e.issuer_key_file is None:
        return None
    try:
        issuer = CertificateAuthority.load(
            e.issuer_cert_file, e.issuer_key_file, root_path=config.tls.ca_file
        )
    except ConfigError as exc:
        raise ConfigError(f"enroll.issuer_cert_file: {exc}") from None
    if issuer.trust_domain != trust_domain:
        raise ConfigError(
            f"enroll.issuer_cert_file: {e.issuer_cert_file} is a CA of trust domain"
            f" {issuer.trust_domain!r}; this manager serves {trust_domain!r}"
        )
    from cryptography import x509

    not_after = x509.load_pem_x509_certificate(issuer.cert_pem).not_valid_after_utc
    if not_after.timestamp() <= time.time():
        raise ConfigError(
            f"enroll.issuer_cert_file: {e.issuer_cert_file} expired on"
            f" {not_after:%Y-%m-%d %H:%M:%S} UTC; make a new issuing CA"
        )
    return issuer


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class ManagerServer:
    """One manager: gRPC server, database and background jobs.

    `artifact_access` and `artifact_references` are the rules artifacts
    follow (see manager.service.artifacts); None: the definitions'
    (`ArtifactUse`). `clock` is the wall clock; `monotonic` what liveness
    measures a step of it against (default: `time.monotonic` with the real
    wall clock, else `clock` itself, so a test's settable clock sees no step
    unless it gives a monotonic clock of its own).
    """

    def __init__(
        self,
        config: ManagerConfig,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] | None = None,
        rng: random.Random | None = None,
        artifact_access: ArtifactAccess | None = None,
        artifact_references: ArtifactReferences | None = None,
    ) -> None:
        self.config = config
        self.metrics = ManagerMetrics()
        self._clock = clock
        self._monotonic = monotonic or (time.monotonic if clock is time.time else clock)
        self._rng = rng
        self._artifact_access = artifact_access
        self._artifact_references = artifact_references
        self._stack = contextlib.AsyncExitStack()
        self._server: aio.Server | None = None
        self._health: Any = None  # grpc_health's aio HealthServicer (untyped)
        self._grace: float | None = None
        self._started = False
        self.directory: StreamDirectory | None = None
        """Where other replicas' streams are (None: `[cluster] advertise_address` unset)."""
        self.port = 0
        """The bound gRPC port (after start)."""
        self.enroll_port: int | None = None
        """The bound enrollment port (after start), None when enrollment is off."""
        self._enroll_server: aio.Server | None = None
        self.metrics_port: int | None = None
        """The bound /metrics port, None when disabled."""
        self.http_port: int | None = None
        """The bound JSON/HTTP API port (after start), None when [http] listen is empty."""
        self._http: HttpServer | None = None

    # Set by start(); exposed for tests and the benchmark.
    db: Database
    nodes: NodeRepository
    events: EventRepository
    store: MetricStore
    writer: MetricWriter
    heartbeats: HeartbeatBuffer
    registry: NodeRegistry
    sweeper: Sweeper
    lifecycle: MetricsLifecycle
    metric_service: MetricsService
    pool: DaemonPool
    control_streams: ControlStreams
    stream_liveness: StreamLiveness
    event_feed: EventFeed
    convergence: Convergence
    definitions: Definitions
    rollouts: RolloutControl
    artifacts: Artifacts
    artifact_janitor: ArtifactJanitor
    job_updates: JobUpdates
    job_driver: JobDriver
    jobs: Jobs
    job_janitor: JobJanitor
    deny_list: DenyList
    certificates: Certificates
    enrollment: EnrollmentAdmin
    self_renewal: SelfRenewal

    async def start(self) -> None:
        """Start everything; on failure, what was started is stopped again."""
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        self._started = True

    async def _start(self) -> None:
        cfg = self.config
        tls = tls_config(cfg)
        try:
            tls.validate()
        except TLSFileError as exc:
            raise exc.in_setting(f"tls.{exc.field}") from None
        identity = tls.identity()
        if identity.role != "manager":
            raise ConfigError(
                f"tls.cert_file: {cfg.tls.cert_file}: the certificate is {identity}; the manager"
                " needs a manager certificate (spiffe://<td>/manager/<name>)"
            )
        # Every listen address before anything else: a taken port must change
        # nothing (no database created or migrated) and be one line, not gRPC
        # core's own log line followed by ours.
        issuer = load_issuer(cfg, identity.trust_domain)
        check_listen_addresses(
            [
                ("server.listen", cfg.server.listen),
                ("server.metrics_listen", cfg.server.metrics_listen),
                *([("enroll.listen", cfg.enroll.listen)] if cfg.enroll.listen else []),
                *([("http.listen", cfg.http.listen)] if cfg.http.listen else []),
            ]
        )
        liv = cfg.liveness
        policy = LivenessPolicy(
            min_ttl=liv.min_ttl_seconds,
            max_rate=liv.max_heartbeat_rate,
            jitter=liv.jitter,
            grace=liv.grace_seconds,
            failover_grace=liv.failover_grace_seconds,
        )
        raw_ms = int(cfg.metrics.raw_retention_hours * 3600 * 1000)

        self.db = await open_database(cfg)
        self._stack.push_async_callback(self.db.close)
        self.nodes = NodeRepository(self.db)
        self.events = EventRepository(self.db)
        self.store = MetricStore(self.db)
        self.writer = MetricWriter(
            self.store,
            max_pending_batches=cfg.metrics.writer_queue_batches,
            max_rows_per_commit=cfg.metrics.max_rows_per_commit,
            linger_seconds=cfg.metrics.commit_linger_seconds,
        )
        self.writer.start()
        self._stack.push_async_callback(self._drain_writer)
        m = self.metrics
        lag = asyncio.create_task(watch_loop_lag(m.loop_lag_seconds), name="loop-lag")
        self._stack.push_async_callback(_cancel, lag)
        m.certificate_expiry.set_function(CertificateExpiry(cfg.tls.cert_file))
        m.metric_queue_depth.set_function(lambda: self.writer.depth)
        m.metric_commit_seconds.set_function(lambda: self.writer.last_commit_seconds)

        self.heartbeats = HeartbeatBuffer(
            self.nodes, interval=liv.flush_interval_seconds, on_flush=m.observe_flush
        )
        m.heartbeats_pending.set_function(lambda: len(self.heartbeats))
        self.registry = NodeRegistry(
            self.nodes,
            self.heartbeats,
            policy=policy,
            max_clock_skew=liv.max_clock_skew_seconds,
            clock=self._clock,
            rng=self._rng,
        )
        await self.registry.load()
        self.heartbeats.start()
        self._stack.push_async_callback(self._flush_heartbeats)

        self.sweeper = Sweeper(
            self.db,
            self.nodes,
            self.registry,
            self.heartbeats,
            policy=policy,
            interval=liv.sweep_interval_seconds,
            clock=self._clock,
            monotonic=self._monotonic,
            on_leader=lambda held: m.sweeper_leader.set(1 if held else 0),
            on_offline=self._nodes_went_offline,
            on_counts=m.set_node_counts,
        )
        self.sweeper.start()
        self._stack.push_async_callback(self.sweeper.stop)
        self.lifecycle = MetricsLifecycle(
            self.db,
            self.store,
            raw_retention_ms=raw_ms,
            rollup_retention_ms=int(cfg.metrics.rollup_retention_days * 86400 * 1000),
            interval=cfg.metrics.lifecycle_interval_seconds,
            clock=self._clock,
        )
        self.lifecycle.start()
        self._stack.push_async_callback(self.lifecycle.stop)

        self.metric_service = MetricsService(
            self.registry,
            self.writer,
            self.store,
            raw_retention_ms=raw_ms,
            max_samples=cfg.metrics.max_samples_per_batch,
            clock=self._clock,
        )
        # The daemons' control streams on this replica; the pool uses a node's one if open.
        self.control_streams = ControlStreams(clock=self._clock, on_change=self._stream_changed)
        # With several replicas: where every node's stream is, and where each replica is.
        clu = cfg.cluster
        if clu.advertise_address:
            self.directory = StreamDirectory(
                ReplicaRepository(self.db),
                self.control_streams,
                replica_id=identity.name,
                address=clu.advertise_address,
                heartbeat=clu.heartbeat_seconds,
                stale_after=clu.stale_after_seconds,
                reconcile=clu.reconcile_seconds,
                clock=self._clock,
            )
            try:
                await self.directory.start()
            except FailedPrecondition as exc:
                raise ConfigError(f"cluster: {exc.message}") from None
            # Runs after the gRPC server stopped (the stack unwinds in reverse): no stream left.
            self._stack.push_async_callback(self.directory.stop)
            directory = self.directory
            m.stream_directory_writes.set_function(lambda: directory.writes)
        elif self.db.dialect == "postgresql":
            log.info(
                "[cluster] advertise_address is not set: a command for a node streaming to "
                "another replica dials its daemon instead of going through that replica"
            )
        m.control_streams.set_function(lambda: len(self.control_streams))
        # As the sweeper's: nobody offline within the failover grace of this start, while
        # the fleet's daemons reconnect through the herd (streams broken meanwhile too).
        self.control_streams.quiet_until = self._clock() + liv.failover_grace_seconds
        self.stream_liveness = StreamLiveness(
            self.control_streams,
            self.heartbeats,
            self.nodes,
            grace=cfg.control.offline_grace_seconds,
            refresh=stream_refresh_interval(cfg.control.liveness_refresh_seconds, policy),
            clock=self._clock,
            monotonic=self._monotonic,
            on_offline=self._nodes_went_offline,
        )
        self.stream_liveness.start()
        self._stack.push_async_callback(self.stream_liveness.stop)
        # The one client to daemons (FleetService calls, pushes of desired state).
        self.pool = DaemonPool(
            tls,
            identity.trust_domain,
            config=cfg.pool,
            streams=self.control_streams,
            routes=self.directory,
            replica_id=identity.name,
            relay_max_message_bytes=cfg.control.max_message_bytes,
            on_relayed=lambda code: m.relayed_commands.labels(code.name).inc(),
        )
        self._stack.push_async_callback(self.pool.close)
        # Desired state: one replica converges; every replica takes changes and pokes it.
        # Placement by count reads the nodes' room from their host metrics.
        capacity = HostCapacity(self.store, clock=self._clock)
        self.convergence = Convergence(
            self.db,
            self.pool,
            clock=self._clock,
            monotonic=self._monotonic,
            candidates=capacity,
            on_leader=lambda held: m.desired_leader.set(1 if held else 0),
            on_pass=m.observe_convergence,
        )
        self.convergence.start()
        self._stack.push_async_callback(self.convergence.stop)
        poke = self.convergence.poke
        desired = DesiredStateRepository(self.db)
        art = cfg.artifacts
        self.artifacts = Artifacts(
            ArtifactRepository(self.db),
            max_bytes=art.max_bytes,
            clock=self._clock,
            access=self._artifact_access or ArtifactUse(desired),
            references=self._artifact_references or ArtifactUse(desired),
        )
        self.definitions = Definitions(
            desired,
            self.nodes,
            artifacts=self.artifacts,
            candidates=capacity,
            clock=self._clock,
            on_change=self.convergence.act,  # an operator's: no debounce
            on_apply=self.convergence.applied,  # its rollouts' first step at once
        )
        self.rollouts = RolloutControl(
            desired, self.nodes, clock=self._clock, on_change=self.convergence.act
        )
        self.artifact_janitor = ArtifactJanitor(
            self.db,
            self.artifacts,
            interval=art.cleanup_interval_seconds,
            stale_after=art.stale_upload_seconds,
        )
        self.artifact_janitor.start()
        self._stack.push_async_callback(self.artifact_janitor.stop)
        # Jobs: one replica drives them; every replica takes reports and operators' calls.
        job_repo = JobRepository(self.db)
        self.job_updates = JobUpdates(job_repo, clock=self._clock)
        self.job_updates.start()
        self._stack.push_async_callback(self.job_updates.stop)
        self.job_driver = JobDriver(
            self.db,
            self.nodes,
            self.pool,
            self.job_updates,
            clock=self._clock,
            monotonic=self._monotonic,
            dispatch_concurrency=cfg.jobs.dispatch_concurrency,
            max_output_bytes=cfg.jobs.max_output_bytes,
            on_leader=lambda held: m.jobs_leader.set(1 if held else 0),
        )
        self.job_driver.start()
        self._stack.push_async_callback(self.job_driver.stop)
        self.jobs = Jobs(
            job_repo,
            self.nodes,
            self.pool,
            clock=self._clock,
            on_change=self.job_driver.poke,
            on_started=self.job_driver.adopt,
            updates=self.job_updates,
        )
        self.job_janitor = JobJanitor(
            self.db,
            job_repo,
            retention_ms=int(cfg.jobs.retention_days * 86400 * 1000),
            interval=cfg.jobs.cleanup_interval_seconds,
            clock=self._clock,
        )
        self.job_janitor.start()
        self._stack.push_async_callback(self.job_janitor.stop)
        self.agent_states = AgentStates(
            self.registry,
            desired,
            clock=self._clock,
            on_change=self.convergence.touched,
            on_states=self.convergence.states_changed,
        )
        self._stack.push_async_callback(self.agent_states.stop)
        # Enrollment: the deny list (every replica), certificates, tokens and node removal.
        enroll_repo, removals = EnrollmentRepository(self.db), RemovalRepository(self.db)
        self.deny_list = DenyList(
            removals.revocations,
            on_revoked=self._revoked_elsewhere,
            on_refused=lambda _node_id: m.revoked_refused.inc(),
        )
        await self.deny_list.load()
        self.pool.dial_refusal = self.deny_list.dial_refusal
        self.deny_list.start()
        self._stack.push_async_callback(self.deny_list.stop)
        e = cfg.enroll
        self.certificates = Certificates(
            enroll_repo,
            removals,
            self.nodes,
            self.deny_list,
            issuer,
            trust_domain=identity.trust_domain,
            node_cert_days=e.node_cert_days,
            limiter=EnrollLimiter(e.rate_per_second, e.burst),
            clock=self._clock,
            on_enroll=m.observe_enrollment,
            on_renew=lambda outcome: m.renewals.labels(outcome).inc(),
        )
        self.enrollment = EnrollmentAdmin(
            enroll_repo,
            removals,
            self.deny_list,
            root_pem=tls.ca_file.read_bytes(),
            enroll_address=self._enroll_address,
            enabled=bool(e.listen or e.advertise_address),
            max_token_ttl_days=e.max_token_ttl_days,
            disconnect=self._disconnect,
            forget=self.registry.forget,
            clock=self._clock,
            on_change=self._nodes_changed,
        )
        if issuer is not None:  # renews the manager's own certificate if the issuer made it
            self.self_renewal = SelfRenewal(tls, issuer)
            self.self_renewal.start()
            self._stack.push_async_callback(self.self_renewal.stop)
        servicer = ManagerServicer(
            self.registry,
            self.metric_service,
            self.agent_states,
            self.artifacts,
            trust_domain=identity.trust_domain,
            jobs=JobReports(self.job_updates, max_output_bytes=cfg.jobs.max_output_bytes),
            reports=DaemonReports(desired, clock=self._clock, on_change=poke),
            on_change=self._nodes_changed,
            certificates=self.certificates,
            deny=self.deny_list,
        )
        servicer.control = ControlChannel(
            servicer,
            self.control_streams,
            cfg.control,
            on_violation=lambda kind: m.control_violations.labels(kind).inc(),
            on_refused=lambda kind, code: m.control_refused.labels(kind, code).inc(),
        )
        self.event_feed = EventFeed(self.events)
        self._stack.callback(self.event_feed.install(self.db.engine))
        fleet_servicer = build_fleet_servicer(
            self.db,
            self.pool,
            self.event_feed,
            self.metric_service,
            self.definitions,
            self.rollouts,
            self.artifacts,
            self.jobs,
            self.enrollment,
            on_labels_changed=poke,
            trust_domain=identity.trust_domain,
            clock=self._clock,
            streams=self.control_streams,
            stream_grace=cfg.control.offline_grace_seconds,
            stream_route=self.directory.route if self.directory is not None else None,
            max_clock_skew_ms=round(cfg.liveness.max_clock_skew_seconds * 1000),
        )
        ctl = cfg.control

        def ms(seconds: float) -> int:
            return round(seconds * 1000)

        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", cfg.server.max_receive_message_bytes),
            ("grpc.so_reuseport", 0),  # a second manager on the same port must fail, not share
            # Daemons ping every 10 s even when idle (fast dead-link detection);
            # by default gRPC answers such pings with GOAWAY after a few.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", ms(ctl.min_ping_interval_seconds)),
            # And the manager pings each connection (control streams are idle for long):
            # a dead daemon or a cut network ends its stream within time + timeout,
            # in gRPC core, with no Python per ping.
            *keepalive_args(
                ctl.keepalive_time_seconds, ctl.keepalive_timeout_seconds, ctl.ping_timeout_seconds
            ),
            ("grpc.http2.max_pings_without_data", 0),
            # A daemon gives up on a TLS handshake after its connect_timeout_seconds (20 s)
            # and dials again; core's default keeps the abandoned one (its fd) for 120 s,
            # which after a restart ran the manager out of open files (docs/benchmarks.md).
            ("grpc.server_handshake_timeout_ms", SERVER_HANDSHAKE_TIMEOUT_MS),
        ]
        server = aio.server(
            interceptors=[RpcMetricsInterceptor(m), ErrorMappingInterceptor()], options=options
        )
        manager_pb2_grpc.add_ManagerServiceServicer_to_server(servicer, server)
        fleet_pb2_grpc.add_FleetServiceServicer_to_server(fleet_servicer, server)
        replicas = ReplicaServicer(
            self.pool, replica_id=identity.name, trust_domain=identity.trust_domain
        )
        replica_pb2_grpc.add_ReplicaServiceServicer_to_server(replicas, server)
        self._health = add_health_and_reflection(
            server, [SERVICE_NAME, FLEET_SERVICE_NAME, REPLICA_SERVICE_NAME]
        )
        try:
            self.port = server.add_secure_port(cfg.server.listen, server_credentials(tls))
        except RuntimeError as exc:
            raise ConfigError(
                f"server.listen {cfg.server.listen!r}: cannot listen: {exc}"
            ) from None
        await server.start()
        self._server = server
        self._stack.push_async_callback(self._stop_grpc)
        # Before the server's grace: end the streams so daemons reconnect (elsewhere) now.
        self._stack.callback(self.control_streams.close_all, "the manager is shutting down")
        if e.listen:
            enroll_servicer = EnrollmentServicer(
                self.certificates,
                trust_domain=identity.trust_domain,
                manager_address=e.manager_address,
            )
            self._enroll_server, self.enroll_port = await start_enrollment_server(
                enroll_servicer, e.listen, tls, m
            )
            self._stack.push_async_callback(self._stop_enroll)
        if cfg.http.listen:
            # The same servicer object as gRPC's: same checks, same audit (docs/http-api.md).
            app = await FleetHttpApp.build(
                fleet_servicer,
                fleet_pb2.DESCRIPTOR.services_by_name["FleetService"],
                trust_domain=identity.trust_domain,
                max_body_bytes=cfg.http.max_body_bytes,
                metrics=m,
            )
            http = HttpServer(app, cfg.http.listen, tls)
            await http.start()
            self._http, self.http_port = http, http.port
            self._stack.push_async_callback(self._stop_http)
        # /metrics last: a scraper that gets an answer knows the manager serves.
        if cfg.server.metrics_listen:
            stop_http, self.metrics_port = start_metrics_http_server(
                cfg.server.metrics_listen, m.registry
            )
            self._stack.push_async_callback(asyncio.to_thread, stop_http)

        log.info(
            "manager %s serving on port %d (database %s)%s%s",
            identity,
            self.port,
            self.db.dialect,
            f", enrollment on port {self.enroll_port}" if self.enroll_port else "",
            f", JSON/HTTP API on port {self.http_port}" if self.http_port else "",
        )

    async def _stop_grpc(self) -> None:
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self._grace)
            self._server = None

    async def _stop_http(self) -> None:
        if self._http is not None:
            await self._http.stop(self._grace or 0.0)
            self._http = None

    async def _stop_enroll(self) -> None:
        if self._enroll_server is not None:
            await self._enroll_server.stop(self._grace)
            self._enroll_server = None

    def _enroll_address(self) -> str:
        """Where hosts enroll: advertise_address, else listen unless its host is a wildcard."""
        e = self.config.enroll
        if e.advertise_address:
            return e.advertise_address
        host, _, port = e.listen.rpartition(":")
        if host in ("", "0.0.0.0", "::", "[::]"):  # noqa: S104 -- checking, not binding
            return ""
        return f"{host}:{self.enroll_port if port == '0' and self.enroll_port else port}"

    async def _disconnect(self, node_id: str, why: str, revoked: bool) -> int:
        """End `node_id`'s control stream and pooled channel here; how many there were.

        A revoked node's stream ends UNAUTHENTICATED (its daemon must enroll
        again); a deleted one's UNAVAILABLE (it reconnects and registers anew).
        """
        closed = 0
        session = self.control_streams.get(node_id)
        if session is not None:
            code = grpc.StatusCode.UNAUTHENTICATED if revoked else grpc.StatusCode.UNAVAILABLE
            session.close(why, (code, why))
            closed += 1
        if await self.pool.forget(node_id):
            closed += 1
        return closed

    async def _revoked_elsewhere(self, node_ids: list[str]) -> None:
        """Nodes another replica revoked: end their connections here too."""
        for node_id in node_ids:
            await self._disconnect(node_id, f"node {node_id} was revoked", True)

    async def _flush_heartbeats(self) -> None:
        try:
            await self.heartbeats.stop()
        except Exception as exc:
            log.warning(
                "could not write %d last-seen times at shutdown: %s",
                len(self.heartbeats),
                exc,
            )

    async def _drain_writer(self) -> None:
        try:
            await self.writer.stop()
        except Exception as exc:
            log.warning("metric writer did not drain at shutdown: %s", exc)

    def _nodes_went_offline(self, count: int) -> None:
        self.metrics.nodes_marked_offline.inc(count)
        # A rollout stops waiting on them now, not at the driver's next safety pass.
        convergence = getattr(self, "convergence", None)
        if convergence is not None:
            convergence.poke()
        job_driver = getattr(self, "job_driver", None)
        if job_driver is not None:
            job_driver.nodes_changed()

    def _stream_changed(self, node_id: str) -> None:
        if self.directory is not None:
            self.directory.changed(node_id)

    def _nodes_changed(self) -> None:
        """A registration that changed what both read (`RegisterResult.changed`) or an
        enrollment change: desired state may change; a node may be back (its job targets
        are sent now)."""
        self.convergence.poke()
        self.job_driver.nodes_changed()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, drain them within `grace`, then flush and close."""
        self._grace = self.config.server.shutdown_grace_seconds if grace is None else grace
        started, self._started = self._started, False
        await self._stack.aclose()
        if started:  # a start that failed already undid itself; its error says why
            log.info("manager stopped")
