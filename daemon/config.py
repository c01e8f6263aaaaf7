"""The daemon's configuration: `fleet-daemon --config daemon.toml`.

Loaded by `fleet.config.load_config` (TOML + ``FLEET_DAEMON_*`` environment
overrides); every problem is one `ConfigError` line naming the file and key.
The node id is not configured but read from the certificate (its SAN
``spiffe://<td>/node/<name>``): the certificate is what the manager checks,
so it is the source of truth. A `node_id` in the file is only a guard: if it
disagrees with the certificate the daemon refuses to start.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from daemon.supervisor.spec import AgentSpec, check_on_host
from daemon.tlsfiles import DaemonTLSConfig
from fleet.config import load_config
from fleet.errors import ConfigError
from fleet.retry import Backoff

__all__ = [
    "ENV_PREFIX",
    "ArtifactsConfig",
    "DaemonConfig",
    "JobsConfig",
    "ManagerLinkConfig",
    "load_daemon_config",
]

ENV_PREFIX = "FLEET_DAEMON_"
SUN_PATH_MAX = 107
"""Longest Unix socket path the kernel accepts (sun_path is 108 bytes with the NUL)."""
_LONGEST_SOCKET = Path("private", "agent-grpc.sock")
"""The deepest socket the daemon puts under run_dir (see daemon.server; agent.sock is shorter)."""


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


@dataclass(frozen=True)
class ManagerLinkConfig:
    """How the daemon reaches its manager(s) (table ``[manager]``)."""

    addresses: tuple[str, ...] = ("127.0.0.1:7443",)
    """host:port of each manager, tried in order; the next one is used when one fails."""
    server_name: str = ""
    """TLS name the manager must present; empty means ``manager.<trust domain>``."""
    heartbeat_interval_seconds: float = 10.0
    """Seconds between heartbeats until the manager says otherwise (it usually does)."""
    metrics_interval_seconds: float = 10.0
    """Seconds between ReportMetrics batches (host sample + agent samples + custom metrics)."""
    sync_interval_seconds: float = 60.0
    """Seconds between full SyncAgentStates snapshots (changes are sent right away)."""
    sync_coalesce_seconds: float = 0.1
    """Seconds to gather state changes into one SyncAgentStates call."""
    buffer_batches: int = 360
    """Metric batches kept while the manager is unreachable (1 h at the default
    interval); beyond it the oldest batch is dropped, counted and logged."""
    batch_max_samples: int = 5000
    """Largest number of samples in one ReportMetrics batch (the manager accepts 10,000)."""
    rpc_timeout_seconds: float = 10.0
    """Deadline of each call to the manager, in seconds."""
    connect_timeout_seconds: float = 20.0
    """Seconds a new connection (TCP + TLS handshake) may take before its hello; the
    hello's own deadline (welcome_timeout_seconds) starts once the connection is up."""
    welcome_timeout_seconds: float = 30.0
    """Seconds a control stream's hello waits for its welcome on a connection that is up.
    Longer than rpc_timeout_seconds: after a manager restart hellos queue, the manager
    answers in turn (or refuses with when to come back), and a hello given up is sent
    again at the back of the queue; a dead link is still found by keepalive."""
    reconnect: Backoff = field(default_factory=lambda: Backoff(initial=0.5, maximum=30.0))
    """Backoff (full jitter) between failed attempts to reach any manager."""
    keepalive_time_seconds: float = 10.0
    """Seconds between HTTP/2 keepalive pings on an idle connection (original design: 10 s)."""
    keepalive_timeout_seconds: float = 5.0
    """Seconds to wait for a ping's ack before the connection is declared dead, when the
    manager's host stops acknowledging TCP (host down, network cut)."""
    ping_timeout_seconds: float = 60.0
    """Seconds to wait for a ping's ack while the manager's TCP is still acknowledged (its
    process stopped or frozen). Long by default: a manager busy with a reconnecting
    fleet answers late, and a short wait drops healthy streams then."""
    control_stream: bool = True
    """Keep one Connect stream open to the manager (the control channel): metrics, states
    and job reports go over it, the manager's commands come down it, and no heartbeat
    calls are made (keepalive pings carry liveness). False: the unary RPCs only."""
    stream_retry_seconds: float = 300.0
    """After a manager answered Connect UNIMPLEMENTED (an older one), seconds of unary
    mode before the daemon reconnects to try the stream again."""

    def validate(self) -> None:
        """Cross-field checks (ValueError, reported as ConfigError)."""
        if not self.addresses:
            raise ValueError("addresses must name at least one manager")
        for name in (
            "heartbeat_interval_seconds",
            "metrics_interval_seconds",
            "sync_interval_seconds",
            "sync_coalesce_seconds",
            "rpc_timeout_seconds",
            "connect_timeout_seconds",
            "welcome_timeout_seconds",
            "keepalive_time_seconds",
            "keepalive_timeout_seconds",
            "ping_timeout_seconds",
            "stream_retry_seconds",
        ):
            _positive(name, getattr(self, name))
        if self.buffer_batches < 1:
            raise ValueError(f"buffer_batches must be >= 1, got {self.buffer_batches}")
        if not 1 <= self.batch_max_samples <= 10_000:
            raise ValueError(
                f"batch_max_samples must be between 1 and 10000, got {self.batch_max_samples}"
            )


@dataclass(frozen=True)
class ArtifactsConfig:
    """The artifact cache under ``<state_dir>/artifacts`` (table ``[artifacts]``)."""

    max_bytes: int = 1024**3
    """Largest artifact downloaded (1 GiB)."""
    max_unpacked_bytes: int = 4 * 1024**3
    """Most bytes one archive may unpack to (4 GiB); a bigger one is refused."""
    max_files: int = 100_000
    """Most entries (files, directories, links) one archive may unpack to."""
    keep_recent: int = 3
    """Artifacts no pushed set uses any more that are kept anyway (the most recently used)."""
    wait_seconds: float = 5.0
    """How long a PushUpdate waits for its artifacts before answering; what is not ready by
    then is fetched in the background (keep it well under the manager's pool call_timeout)."""

    def validate(self) -> None:
        """Cross-field checks (ValueError, reported as ConfigError)."""
        for name in ("max_bytes", "max_unpacked_bytes", "max_files"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.wait_seconds <= 60:
            raise ValueError(f"wait_seconds must be 0..60, got {self.wait_seconds}")
        if self.keep_recent < 0:
            raise ValueError(f"keep_recent must be >= 0, got {self.keep_recent}")


@dataclass(frozen=True)
class JobsConfig:
    """Jobs the manager runs on this node (table ``[jobs]``; docs/jobs.md)."""

    enabled: bool = True
    """False refuses every job: StartJob answers FAILED naming this setting."""
    max_concurrent: int = 4
    """Jobs running at once on this node; the rest wait QUEUED in arrival order."""
    dir: Path | None = None
    """Where each job keeps its spec, state and output (``<dir>/<job id>/``);
    unset: ``<state_dir>/jobs``."""
    keep_days: float = 7.0
    """Finished job directories (with their full output) are deleted after this long."""
    grace_seconds: float = 10.0
    """Seconds between SIGTERM and SIGKILL when a job is stopped (timeout, cancel)."""
    answer_wait_seconds: float = 0.2
    """How long StartJob waits for a new job to end, so a fast command's end (and its
    output, when small) rides on the answer instead of a ReportJobStatus; 0: never."""

    def validate(self) -> None:
        """Cross-field checks (ValueError, reported as ConfigError)."""
        if not 1 <= self.max_concurrent <= 1000:
            raise ValueError(f"max_concurrent must be 1..1000, got {self.max_concurrent}")
        if not 0 < self.keep_days <= 3650:
            raise ValueError(f"keep_days must be > 0 and <= 3650, got {self.keep_days}")
        if not 0 < self.grace_seconds <= 3600:
            raise ValueError(f"grace_seconds must be > 0 and <= 3600, got {self.grace_seconds}")
        if not 0 <= self.answer_wait_seconds <= 5:
            raise ValueError(f"answer_wait_seconds must be 0..5, got {self.answer_wait_seconds}")
        if self.dir is not None and not self.dir.is_absolute():
            raise ValueError(f"dir must be an absolute path, got {str(self.dir)!r}")


@dataclass(frozen=True)
class DaemonConfig:
    """Everything `fleet-daemon` needs; see configs/daemon.toml for a commented example."""

    tls: DaemonTLSConfig
    """This node's certificate, key and the fleet CA (table ``[tls]``); checked in a
    child process so cryptography stays out of the daemon (daemon.tlsfiles)."""
    node_id: str = ""
    """Optional guard; the node id is the certificate's name and must match if set."""
    listen: str = "0.0.0.0:7444"
    """host:port of the DaemonService (mTLS) for the manager; empty: no listening port,
    the manager reaches the daemon only through its control stream (needs
    ``[manager] control_stream = true``)."""
    advertise: str = ""
    """host:port the manager dials; empty: `listen`, with a wildcard host replaced
    by this host's name."""
    state_dir: Path = Path("/var/lib/fleet-daemon")
    """Agent pids, pushed specs, the metric sequence number (survive restarts)."""
    run_dir: Path = Path("/run/fleet-daemon")
    """Holds the agent socket ``agent.sock`` (mode 0660)."""
    log_dir: Path = Path("/var/log/fleet-daemon")
    """One log file (plus rotated backups) per agent."""
    labels: dict[str, str] = field(default_factory=dict)
    """Node labels sent with RegisterNode (selectors match them)."""
    manager: ManagerLinkConfig = field(default_factory=ManagerLinkConfig)
    """The manager link (table ``[manager]``)."""
    sample_interval_seconds: float = 10.0
    """Seconds between samples of every agent's process tree (and log size checks);
    the default matches manager.metrics_interval_seconds, see docs/operations-daemon.md."""
    sample_buffer: int = 360
    """Samples kept per agent for GetAgentMetrics (1 h at the default interval)."""
    agent_heartbeat_interval_seconds: float = 5.0
    """Heartbeat interval told to SDK agents at Register."""
    metrics_listen: str = "127.0.0.1:9465"
    """host:port of the Prometheus /metrics endpoint; empty disables it."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Daemon log level (stdlib logging; one line per event on stderr)."""
    log_json: bool = False
    """Log as JSON lines instead of text."""
    stop_agents_on_exit: bool = False
    """Stop every agent when the daemon stops; false leaves them running for re-adoption."""
    shutdown_grace_seconds: float = 5.0
    """Seconds in-flight RPCs get to finish when the daemon stops."""
    agents: tuple[AgentSpec, ...] = ()
    """This host's own agents (``[[agents]]``); the manager's pushed agents run beside them."""
    artifacts: ArtifactsConfig = field(default_factory=ArtifactsConfig)
    """The artifact cache (table ``[artifacts]``)."""
    jobs: JobsConfig = field(default_factory=JobsConfig)
    """Jobs run on this node (table ``[jobs]``)."""

    @property
    def jobs_dir(self) -> Path:
        """Where job directories live: ``[jobs] dir`` or ``<state_dir>/jobs``."""
        return self.jobs.dir if self.jobs.dir is not None else self.state_dir / "jobs"

    def validate(self) -> None:
        """Cross-field checks (ValueError, reported as ConfigError)."""
        for name in (
            "sample_interval_seconds",
            "agent_heartbeat_interval_seconds",
            "shutdown_grace_seconds",
        ):
            _positive(name, getattr(self, name))
        if self.sample_buffer < 1:
            raise ValueError(f"sample_buffer must be >= 1, got {self.sample_buffer}")
        seen: set[str] = set()
        for spec in self.agents:
            if spec.id in seen:
                raise ValueError(f"agents: id {spec.id!r} is used twice")
            seen.add(spec.id)
            if spec.revision:
                raise ValueError(
                    f"agents: {spec.id!r} sets revision: only the manager stamps revisions"
                )
            if spec.artifact is not None:
                raise ValueError(
                    f"agents: {spec.id!r} names an artifact: only an agent a manager pushes can"
                    " use one (push it with fleetctl artifacts push and reference it from a"
                    " definition)"
                )
            check_on_host(spec)  # the loader already ran the host-independent spec.validate()
        if not self.listen and not self.manager.control_stream:
            raise ValueError(
                "listen is empty and [manager] control_stream is false: the manager could not"
                " reach this daemon at all; set listen or enable control_stream"
            )
        if not self.listen and self.advertise:
            raise ValueError("advertise is set but listen is empty: there is nothing to dial")
        for name in ("listen", "advertise", "metrics_listen"):
            value = getattr(self, name)
            if value and not _host_port_ok(value):
                raise ValueError(f"{name} must be host:port, got {value!r}")
        deepest = len(os.fsencode(self.run_dir / _LONGEST_SOCKET))
        if deepest > SUN_PATH_MAX:
            raise ValueError(
                f"run_dir: {str(self.run_dir)!r} is too long for the daemon's Unix sockets "
                f"({deepest} bytes for {_LONGEST_SOCKET} in it; the limit is {SUN_PATH_MAX}): "
                "choose a shorter run_dir"
            )


def _host_port_ok(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and int(port) < 65536)


def load_daemon_config(
    path: str | Path | None, *, environ: dict[str, str] | None = None
) -> DaemonConfig:
    """Load and check the daemon config; the node id comes from the certificate.

    Raises ConfigError with one line for any problem, including a certificate
    that is not a ``node`` certificate or a `node_id` that disagrees with it.
    """
    cfg = load_config(DaemonConfig, path, env_prefix=ENV_PREFIX, environ=environ)
    source = str(path) if path is not None else "(no config file)"
    identity = cfg.tls.identity()
    if identity.role != "node":
        raise ConfigError(
            f"{source}: tls.cert_file: {cfg.tls.cert_file} is a {identity.role} certificate "
            f"({identity}); a daemon needs a node certificate"
        )
    if cfg.node_id and cfg.node_id != identity.name:
        raise ConfigError(
            f"{source}: node_id: {cfg.node_id!r} disagrees with the certificate, which is for "
            f"{identity}; remove node_id or fix the certificate"
        )
    return dataclasses.replace(cfg, node_id=identity.name)
