"""The manager's configuration: one frozen dataclass per TOML table.

`fleet.config.load_config(ManagerConfig, path, env_prefix=ENV_PREFIX)` reads
it; every key can be overridden with ``FLEET_MANAGER_<TABLE>_<KEY>``
(e.g. ``FLEET_MANAGER_DATABASE_URL``). `configs/manager.toml` documents
every key and is loaded by a test so it never rots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fleet.artifacts import CHUNK_SIZE
from manager.pool.config import ControlConfig, PoolConfig
from manager.storage.writer import MAX_LINGER_SECONDS

__all__ = [
    "ENV_PREFIX",
    "ArtifactsConfig",
    "ClusterConfig",
    "ControlConfig",
    "DatabaseConfig",
    "EnrollConfig",
    "HttpConfig",
    "JobsConfig",
    "LivenessConfig",
    "LoggingConfig",
    "ManagerConfig",
    "MetricsConfig",
    "ServerConfig",
    "TLSFiles",
]

ENV_PREFIX = "FLEET_MANAGER_"
"""Prefix of the environment variables that override config keys."""


MIN_RECEIVE_BYTES = CHUNK_SIZE + 64 * 1024
"""Smallest receive limit: PushArtifact sends 1 MiB chunks."""


def _check_hostport(value: str, key: str, *, allow_empty: bool = False) -> None:
    if allow_empty and value == "":
        return
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{key}: expected host:port, got {value!r}")


@dataclass(frozen=True)
class ServerConfig:
    """The gRPC listener and the HTTP metrics endpoint."""

    listen: str = "0.0.0.0:7443"
    """host:port where ManagerService (mTLS) listens; port 0 picks a free one."""
    max_receive_message_bytes: int = 4 * 1024 * 1024
    """Larger requests are refused by gRPC before any handler runs."""
    shutdown_grace_seconds: float = 10.0
    """On SIGTERM, in-flight calls get this long to finish before they are cancelled."""
    metrics_listen: str = "127.0.0.1:9464"
    """host:port of the Prometheus /metrics endpoint; empty disables it."""

    def validate(self) -> None:
        _check_hostport(self.listen, "server.listen")
        _check_hostport(self.metrics_listen, "server.metrics_listen", allow_empty=True)
        if self.max_receive_message_bytes < MIN_RECEIVE_BYTES:
            raise ValueError(
                f"server.max_receive_message_bytes: must be at least {MIN_RECEIVE_BYTES}"
                " (a 1 MiB artifact chunk and its framing)"
            )
        if self.shutdown_grace_seconds < 0:
            raise ValueError("server.shutdown_grace_seconds: must not be negative")


@dataclass(frozen=True)
class TLSFiles:
    """The manager's certificate (role manager), its key, and the fleet CA."""

    ca_file: Path = Path("/etc/fleet/ca.pem")
    """CA bundle that signed every node certificate."""
    cert_file: Path = Path("/etc/fleet/manager.pem")
    """The manager's own certificate (SAN spiffe://<td>/manager/<name>)."""
    key_file: Path = Path("/etc/fleet/manager-key.pem")
    """Private key of cert_file (mode 0600)."""


@dataclass(frozen=True)
class DatabaseConfig:
    """Where the registry, metrics and events are stored."""

    url: str = ""
    """sqlite+aiosqlite:///path or postgresql+asyncpg://...; empty = <state_dir>/manager.db."""
    busy_timeout_ms: int = 5000
    """SQLite: how long a writer waits for a lock before retrying."""
    pool_size: int = 10
    """PostgreSQL: connections per manager process."""
    retry_timeout_seconds: float = 5.0
    """A locked or unreachable database is retried this long, then calls get UNAVAILABLE."""
    migrate_on_start: bool = True
    """Apply pending migrations at start; false = refuse to start on an old schema."""

    def validate(self) -> None:
        if self.url and not self.url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError(
                f"database.url: must start with sqlite+aiosqlite:// or postgresql+asyncpg://, "
                f"got {self.url.split('://')[0]!r}"
            )
        if self.busy_timeout_ms < 0 or self.pool_size < 1 or self.retry_timeout_seconds < 0:
            raise ValueError(
                "database: busy_timeout_ms and retry_timeout_seconds must be >= 0, pool_size >= 1"
            )


@dataclass(frozen=True)
class LivenessConfig:
    """Heartbeat interval scaling and offline detection (Nomad's rules)."""

    min_ttl_seconds: float = 10.0
    """Shortest heartbeat interval handed out (small fleets)."""
    max_heartbeat_rate: float = 1000.0
    """Ceiling of heartbeats/s over the whole fleet: ttl = max(min_ttl, nodes / rate)."""
    jitter: float = 0.1
    """Each interval handed out is ttl * (1 + uniform(0, jitter)), so nodes spread out."""
    grace_seconds: float = 10.0
    """A node is offline after ttl * (1 + jitter) + grace without a heartbeat."""
    failover_grace_seconds: float = 300.0
    """After a start or a sweeper failover, no node is marked offline for this long."""
    max_clock_skew_seconds: float = 300.0
    """Heartbeat timestamps further than this from the manager's clock are refused."""
    flush_interval_seconds: float = 0.5
    """How often the in-memory last-seen map is written (one batched statement)."""
    sweep_interval_seconds: float = 1.0
    """How often the sweeper looks for nodes past their deadline."""

    def validate(self) -> None:
        if self.min_ttl_seconds <= 0 or self.max_heartbeat_rate <= 0:
            raise ValueError("liveness: min_ttl_seconds and max_heartbeat_rate must be > 0")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"liveness.jitter: must be within [0, 1], got {self.jitter}")
        if self.grace_seconds < 0 or self.failover_grace_seconds < 0:
            raise ValueError("liveness: grace_seconds and failover_grace_seconds must be >= 0")
        if not 0 < self.flush_interval_seconds <= 1:
            raise ValueError("liveness.flush_interval_seconds: must be within (0, 1]")
        if self.sweep_interval_seconds <= 0 or self.max_clock_skew_seconds <= 0:
            raise ValueError("liveness: sweep_interval_seconds and max_clock_skew_seconds > 0")


@dataclass(frozen=True)
class MetricsConfig:
    """Metric ingestion limits and retention."""

    raw_retention_hours: float = 24.0
    """Raw samples are kept this long (and older timestamps are refused)."""
    rollup_retention_days: float = 30.0
    """1-minute min/avg/max rollups are kept this long."""
    max_samples_per_batch: int = 10_000
    """Larger ReportMetrics batches are INVALID_ARGUMENT (count of values)."""
    writer_queue_batches: int = 10_000
    """Batches waiting for a commit; beyond it ReportMetrics is RESOURCE_EXHAUSTED."""
    max_rows_per_commit: int = 50_000
    """Group commit: at most this many samples per transaction."""
    commit_linger_seconds: float = 0.05
    """Group commit at low rates: a batch waits up to this long for others to share its
    transaction (its acknowledgement is that much later); 0: commit each at once."""
    lifecycle_interval_seconds: float = 60.0
    """How often rollup and prune run (under a lock: one replica at a time)."""

    def validate(self) -> None:
        if self.raw_retention_hours <= 0:
            raise ValueError("metrics.raw_retention_hours: must be > 0")
        if self.rollup_retention_days * 24 < self.raw_retention_hours:
            raise ValueError("metrics.rollup_retention_days: must cover raw_retention_hours")
        if self.max_samples_per_batch < 1 or self.writer_queue_batches < 1:
            raise ValueError("metrics: max_samples_per_batch and writer_queue_batches >= 1")
        if self.max_rows_per_commit < 1 or self.lifecycle_interval_seconds <= 0:
            raise ValueError("metrics: max_rows_per_commit >= 1, lifecycle_interval_seconds > 0")
        if not 0 <= self.commit_linger_seconds <= MAX_LINGER_SECONDS:
            raise ValueError(
                f"metrics.commit_linger_seconds: must be within [0, {MAX_LINGER_SECONDS:g}]"
            )


@dataclass(frozen=True)
class ArtifactsConfig:
    """Files and archives operators push for definitions (docs/artifacts.md)."""

    max_bytes: int = 1024**3
    """Largest artifact accepted (1 GiB): refused up front from its declared size."""
    stale_upload_seconds: float = 3600.0
    """The staged chunks of an upload that sent nothing for this long are deleted
    (left behind by a manager that crashed mid-upload)."""
    cleanup_interval_seconds: float = 300.0
    """How often abandoned uploads are looked for (on one replica at a time)."""

    def validate(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"artifacts.max_bytes: must be >= 1, got {self.max_bytes}")
        if self.stale_upload_seconds <= 0 or self.cleanup_interval_seconds <= 0:
            raise ValueError(
                "artifacts: stale_upload_seconds and cleanup_interval_seconds must be > 0"
            )


@dataclass(frozen=True)
class JobsConfig:
    """Jobs run on nodes (docs/jobs.md): stored output and retention."""

    max_output_bytes: int = 1024 * 1024
    """Output stored per target (1 MiB); beyond it the output is cut, marked truncated,
    and the rest stays on the node (`fleetctl jobs logs --from-node`)."""
    retention_days: float = 30.0
    """Finished jobs are deleted with their targets and output after this long."""
    cleanup_interval_seconds: float = 3600.0
    """How often expired jobs are looked for (on one replica at a time)."""
    dispatch_concurrency: int = 256
    """StartJob calls in flight at once over all jobs (each job's window applies too)."""

    def validate(self) -> None:
        if not 1024 <= self.max_output_bytes <= 2**40:
            raise ValueError(
                f"jobs.max_output_bytes: must be 1024..2^40, got {self.max_output_bytes}"
            )
        if self.retention_days <= 0 or self.cleanup_interval_seconds <= 0:
            raise ValueError("jobs: retention_days and cleanup_interval_seconds must be > 0")
        if self.dispatch_concurrency < 1:
            raise ValueError("jobs.dispatch_concurrency: must be >= 1")


# Hosts a peer cannot dial: refused in advertise_address, never bound to.
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", ""})  # noqa: S104


@dataclass(frozen=True)
class ClusterConfig:
    """Several manager replicas on one PostgreSQL database (docs/operations-manager.md).

    With `advertise_address` set, this replica records in the database which
    nodes' control streams it holds and where it is reached, and a command
    for a node streaming to another replica is forwarded there (ReplicaService,
    on the main port). Empty: a single manager; a command for a node with no
    stream here dials the daemon, as before.
    """

    advertise_address: str = ""
    """host:port the other replicas reach this one's `server.listen` port at (not a
    wildcard host); "" = routing between replicas off."""
    heartbeat_seconds: float = 2.0
    """This replica refreshes its row in the database this often."""
    stale_after_seconds: float = 10.0
    """A replica whose row is older than this is gone: streams recorded on it are
    ignored (its nodes reconnect elsewhere). At least 3 x heartbeat_seconds."""
    reconcile_seconds: float = 30.0
    """This often the replica compares its recorded streams with the ones it holds
    and repairs the difference (a record lost to a race, a delete that failed)."""

    def validate(self) -> None:
        if self.advertise_address:
            _check_hostport(self.advertise_address, "cluster.advertise_address")
            host = self.advertise_address.rpartition(":")[0]
            if host in _WILDCARD_HOSTS or self.advertise_address.endswith(":0"):
                raise ValueError(
                    "cluster.advertise_address: must be an address other replicas can dial "
                    f"(a host name or IP and a fixed port), got {self.advertise_address!r}"
                )
        if self.heartbeat_seconds <= 0 or self.reconcile_seconds <= 0:
            raise ValueError("cluster: heartbeat_seconds and reconcile_seconds must be > 0")
        if self.stale_after_seconds < 3 * self.heartbeat_seconds:
            raise ValueError(
                "cluster.stale_after_seconds: must be at least 3 x heartbeat_seconds "
                f"({3 * self.heartbeat_seconds:g}), got {self.stale_after_seconds:g}"
            )


@dataclass(frozen=True)
class EnrollConfig:
    """Enrollment and node certificates (docs/certificates.md, docs/install.md)."""

    listen: str = ""
    """host:port of EnrollmentService (TLS, no client certificate); empty: enrollment off."""
    advertise_address: str = ""
    """host:port hosts enroll at, returned with each join token; empty: `listen` unless
    its host is a wildcard."""
    manager_address: str = ""
    """host:port where enrolled daemons reach ManagerService (sent in EnrollResponse)."""
    issuer_cert_file: Path | None = None
    """The CA that signs node certificates: the fleet root, or an intermediate it signed
    (then this file holds the intermediate, and tls.ca_file the root)."""
    issuer_key_file: Path | None = None
    """The key of issuer_cert_file (mode 0600)."""
    node_cert_days: float = 7.0
    """Lifetime of the certificates issued by enrollment and renewal."""
    rate_per_second: float = 5.0
    """Enrollment attempts accepted per second over all callers (each caller IP:
    a tenth of it, at least 1/s)."""
    burst: int = 20
    """Attempts accepted at once before the rate applies (each caller IP: a tenth)."""
    max_token_ttl_days: float = 30.0
    """Longest validity a join token may be given."""

    @property
    def has_issuer(self) -> bool:
        """True when both issuer files are configured."""
        return self.issuer_cert_file is not None and self.issuer_key_file is not None

    def validate(self) -> None:
        _check_hostport(self.listen, "enroll.listen", allow_empty=True)
        _check_hostport(self.advertise_address, "enroll.advertise_address", allow_empty=True)
        _check_hostport(self.manager_address, "enroll.manager_address", allow_empty=True)
        if (self.issuer_cert_file is None) != (self.issuer_key_file is None):
            raise ValueError("enroll: set both issuer_cert_file and issuer_key_file, or neither")
        if self.listen and not self.has_issuer:
            raise ValueError(
                "enroll.listen: enrollment needs an issuing CA; set enroll.issuer_cert_file"
                " and enroll.issuer_key_file"
            )
        if not 0 < self.node_cert_days <= 3660:
            raise ValueError(
                f"enroll.node_cert_days: must be within (0, 3660], got {self.node_cert_days}"
            )
        if not 0 < self.rate_per_second <= 10_000 or not 1 <= self.burst <= 100_000:
            raise ValueError("enroll: rate_per_second must be in (0, 10000], burst in 1..100000")
        if not 0 < self.max_token_ttl_days <= 3660:
            raise ValueError(
                "enroll.max_token_ttl_days: must be within (0, 3660],"
                f" got {self.max_token_ttl_days}"
            )


@dataclass(frozen=True)
class HttpConfig:
    """The JSON/HTTP API (docs/http-api.md): FleetService over HTTPS, operator certificates."""

    listen: str = ""
    """host:port of the HTTPS listener (client certificates required); empty: off."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Larger request bodies are refused with 413 before any handler runs."""

    def validate(self) -> None:
        _check_hostport(self.listen, "http.listen", allow_empty=True)
        if not 1024 <= self.max_body_bytes <= 64 * 1024 * 1024:
            raise ValueError(
                f"http.max_body_bytes: must be within [1024, 67108864], got {self.max_body_bytes}"
            )


@dataclass(frozen=True)
class LoggingConfig:
    """Process logging (stderr; journald collects it under systemd)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level written."""
    json: bool = False
    """One JSON object per line instead of plain text."""


@dataclass(frozen=True)
class ManagerConfig:
    """Everything `fleet-manager serve` needs."""

    state_dir: Path = Path("/var/lib/fleet-manager")
    """Directory the manager owns; the default SQLite database lives here."""
    server: ServerConfig = field(default_factory=ServerConfig)
    """[server] table."""
    tls: TLSFiles = field(default_factory=TLSFiles)
    """[tls] table."""
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    """[database] table."""
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    """[liveness] table."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """[metrics] table."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """[logging] table."""
    pool: PoolConfig = field(default_factory=PoolConfig)
    """[pool] table: how the manager calls the daemons (FleetService operations)."""
    artifacts: ArtifactsConfig = field(default_factory=ArtifactsConfig)
    """[artifacts] table."""
    jobs: JobsConfig = field(default_factory=JobsConfig)
    """[jobs] table."""
    control: ControlConfig = field(default_factory=ControlConfig)
    """[control] table: the daemons' control streams (ManagerService.Connect)."""
    enroll: EnrollConfig = field(default_factory=EnrollConfig)
    """[enroll] table: join tokens, enrollment and node certificates."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """[cluster] table: routing commands between manager replicas."""
    http: HttpConfig = field(default_factory=HttpConfig)
    """[http] table: the JSON/HTTP API."""

    def validate(self) -> None:
        for section in (
            self.server,
            self.database,
            self.liveness,
            self.metrics,
            self.artifacts,
            self.jobs,
            self.control,
            self.enroll,
            self.cluster,
            self.http,
        ):
            section.validate()
        if self.cluster.advertise_address and not self.database_url.startswith("postgresql"):
            raise ValueError(
                "cluster.advertise_address: several replicas need a shared PostgreSQL "
                "database ([database] url = postgresql+asyncpg://...)"
            )

    @property
    def database_url(self) -> str:
        """The configured URL, or the SQLite file under state_dir."""
        if self.database.url:
            return self.database.url
        return f"sqlite+aiosqlite:///{(self.state_dir / 'manager.db').resolve()}"
