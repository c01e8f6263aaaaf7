"""Plain records the storage layer reads and writes (no protobuf, no SQL).

Times are Unix epoch milliseconds, as on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = [
    "EVENT_KINDS",
    "AgentStateRecord",
    "ArtifactRecord",
    "AssignmentRecord",
    "DefinitionRecord",
    "EventRecord",
    "MetricBatch",
    "MetricSample",
    "MetricSeries",
    "NodeDesiredRecord",
    "NodeLabels",
    "NodeReach",
    "NodeRecord",
    "NodeStatus",
    "RevisionRecord",
    "RolloutNodeRecord",
    "RolloutRecord",
    "UpdateErrorRecord",
]

NodeStatus = Literal["online", "offline"]

EVENT_KINDS: Final = frozenset(
    {
        "NODE_REGISTERED",
        "NODE_ONLINE",
        "NODE_OFFLINE",
        "NODE_LABELS_UPDATED",
        "NODE_CLOCK_SKEW",
        "AGENT_STATE_CHANGED",
        "OPERATION",
        "DEFINITION_APPLIED",
        "DEFINITION_DELETED",
        "ROLLOUT_STARTED",
        "ROLLOUT_BATCH",
        "ROLLOUT_NODE_FAILED",
        "ROLLOUT_AWAITING_PROMOTION",
        "ROLLOUT_PROMOTED",
        "ROLLOUT_PAUSED",
        "ROLLOUT_RESUMED",
        "ROLLOUT_SUCCEEDED",
        "ROLLOUT_FAILED",
        "ROLLOUT_REVERTING",
        "ROLLOUT_REVERTED",
        "ROLLOUT_CANCELLED",
        "ARTIFACT_PUSHED",
        "ARTIFACT_DELETED",
        "NODE_UPDATE_ERROR",
        "JOB_STARTED",
        "JOB_TARGET_FINISHED",
        "JOB_FINISHED",
    }
)
"""Every event kind the events table accepts."""


@dataclass(frozen=True)
class NodeRecord:
    """A registered node as the manager knows it."""

    node_id: str
    """The node's name; equals the name in its certificate."""
    hostname: str
    """Hostname the daemon reported."""
    ip: str
    """IP address the daemon reported (textual form)."""
    os: str
    """Operating system, e.g. "linux"."""
    arch: str
    """CPU architecture, e.g. "x86_64"."""
    labels: dict[str, str]
    """The effective labels selectors match: the daemon's overlaid with the operator's.
    Given to `NodeRepository.upsert`, the labels the daemon registered with."""
    daemon_version: str
    """Version of fleet-daemon on the node."""
    agent_version: str
    """Version of the agent runtime on the node."""
    daemon_address: str
    """host:port the manager dials for DaemonService."""
    status: NodeStatus = "online"
    """Liveness; ignored by `NodeRepository.upsert` (registering makes it online)."""
    last_seen_ms: int = 0
    """Last heartbeat or registration; ignored by `upsert` (it uses `now_ms`)."""
    registered_at_ms: int = 0
    """First registration; ignored by `upsert`."""
    daemon_labels: dict[str, str] = field(default_factory=dict)
    """The labels of the daemon's config (replaced by every registration)."""
    operator_labels: dict[str, str] = field(default_factory=dict)
    """The labels operators set (kept across registrations); they win over the daemon's."""
    jobs_disabled: bool = False
    """The daemon refuses remote jobs (`[jobs] enabled = false`), as of its registration."""
    cert_not_after_ms: int = 0
    """When its certificate expires, as last issued or presented (0: unknown). Given to
    `NodeRepository.upsert`, 0 keeps the stored value."""
    clock_offset_ms: int | None = None
    """How far its clock is off the manager's (positive: ahead), measured at its last
    registration; None: unknown (its daemon stamps no time on its hello)."""


@dataclass(frozen=True)
class NodeLabels:
    """What a job's selector needs of a node: its name and effective labels."""

    node_id: str
    """The node's name."""
    labels: dict[str, str]
    """The effective labels selectors match."""


@dataclass(frozen=True)
class NodeReach:
    """What the job driver needs of a node: whether and where to send it a job."""

    node_id: str
    """The node's name."""
    daemon_address: str
    """host:port the manager dials for DaemonService."""
    status: NodeStatus
    """Liveness."""
    last_seen_ms: int
    """Last heartbeat or registration."""
    jobs_disabled: bool
    """The daemon refuses remote jobs."""


@dataclass(frozen=True)
class AgentStateRecord:
    """The last reported state of one agent on one node."""

    node_id: str
    """Node the agent runs on."""
    agent_id: str
    """Agent name, unique per node."""
    status: str
    """Supervisor state name without the AGENT_STATUS_ prefix, e.g. "RUNNING"."""
    pid: int = 0
    """Process id, 0 when not running."""
    last_heartbeat_ms: int = 0
    """Last heartbeat the agent sent its daemon."""
    type: str = ""
    """Agent type reported by the daemon."""
    version: str = ""
    """Agent version."""
    start_time_ms: int = 0
    """When the current process started, 0 if not running."""
    restart_count: int = 0
    """Restarts since the spec was applied (never negative)."""
    exit_code: int = 0
    """Exit code of the last exit."""
    message: str = ""
    """Free-text status detail from the daemon."""
    labels: dict[str, str] = field(default_factory=dict)
    """Agent labels."""
    health: str = ""
    """Health as reported, e.g. "HEALTHY"."""
    config_version: int = 0
    """Version of the config the agent runs with (never negative)."""
    last_exit_kind: str = ""
    """Why the last process ended: exited, killed, unhealthy, operator, updated, daemon,
    start_failed, unknown; "" if none ever did."""
    last_exit_code: int = 0
    """Its exit code (-N: signal N, -1: unknown or no process)."""
    last_exit_reason: str = ""
    """Its reason in words ("killed by SIGKILL")."""
    last_exit_ms: int = 0
    """When it ended."""
    reported_ms: int = 0
    """When the daemon reported this state (set by the manager when storing it)."""
    revision: int = 0
    """The definition revision its spec comes from (0: an agent of the host's own config)."""
    health_message: str = ""
    """Why its last health check failed."""
    health_since_ms: int = 0
    """When its health last changed."""
    log_problem: str = ""
    """Why its output is being lost (its log's filesystem is full); "" when it is not."""


@dataclass(frozen=True)
class MetricSample:
    """One measured value."""

    agent_id: str
    """Agent the value belongs to; "" for host-level metrics."""
    type: str
    """cpu, memory, disk, network or a custom type name."""
    name: str
    """Metric name within the type, e.g. "usage_percent"."""
    timestamp_ms: int
    """When it was measured."""
    value: float
    """The value (finite; validated by the service layer)."""


@dataclass(frozen=True)
class MetricSeries:
    """One (agent, type, name) a node has samples or rollups of."""

    agent_id: str
    """The agent; "" for host-level metrics."""
    type: str
    """cpu, memory, disk, network or a custom type name."""
    name: str
    """Value name within the type."""
    newest_ms: int
    """Its newest sample's time (to the minute when it is older than the rollup watermark)."""


@dataclass(frozen=True)
class MetricBatch:
    """One ReportMetrics call's worth of samples, deduplicated by (node_id, sequence)."""

    node_id: str
    """Reporting node."""
    sequence: int
    """Per-node batch sequence number; a retried batch reuses it."""
    samples: tuple[MetricSample, ...]
    """The samples of the batch."""


@dataclass(frozen=True)
class EventRecord:
    """One entry of the event log, ordered by `id`."""

    id: int
    """Monotonic position; watch with `EventRepository.list_after(id)`."""
    timestamp_ms: int
    """When it happened (the manager's clock)."""
    kind: str
    """One of EVENT_KINDS."""
    node_id: str
    """Node concerned, "" if none."""
    agent_id: str
    """Agent concerned, "" if none."""
    message: str
    """Human-readable one-liner."""
    actor: str
    """Who caused it ("node/x", "operator/y", "manager/sweeper"), "" if unknown."""
    attributes: dict[str, str]
    """Kind-specific details, e.g. {"from": "RUNNING", "to": "EXITED"}."""


# --- desired state -------------------------------------------------------------------------


@dataclass(frozen=True)
class DefinitionRecord:
    """A definition's head: its current revision and the last one that succeeded."""

    name: str
    """Unique in the fleet; the agent's id on each node."""
    revision: int
    """The current (newest) revision."""
    stable_revision: int = 0
    """The last revision that rolled out successfully (0: none yet)."""
    deleted_ms: int = 0
    """When it was deleted (0: live)."""
    created_ms: int = 0
    """When its first revision was applied."""
    updated_ms: int = 0
    """When its newest revision was applied."""


@dataclass(frozen=True)
class RevisionRecord:
    """One stored revision of a definition."""

    name: str
    """The definition."""
    revision: int
    """1, 2, 3, ... per definition."""
    body: str
    """The `Definition` message as canonical JSON."""
    content_hash: str
    """sha256 of what the revision runs (two equal hashes: nothing would change)."""
    actor: str
    """Who applied it."""
    message: str
    """The change cause (--message)."""
    created_ms: int
    """When."""
    deleted: bool = False
    """This revision records the deletion of the definition."""


@dataclass(frozen=True)
class AssignmentRecord:
    """One node should run one revision of one definition."""

    node_id: str
    """The node."""
    name: str
    """The definition."""
    revision: int
    """The revision it should run."""
    since_ms: int
    """When this assignment was made."""


@dataclass(frozen=True)
class UpdateErrorRecord:
    """A pushed agent a daemon does not run as pushed, and why."""

    agent_id: str
    """The agent (a definition's name)."""
    revision: int
    """The revision it could not apply."""
    reason: str
    """Why, in words."""


@dataclass(frozen=True)
class NodeDesiredRecord:
    """What a node should run, what it was sent and what it reports."""

    node_id: str
    """The node."""
    version: int = 0
    """Version of its managed set (bumped on every change of content)."""
    content_hash: str = ""
    """sha256 of the managed set of `version`."""
    delivered_version: int = 0
    """The last version a PushUpdate delivered."""
    reported_version: int = 0
    """The version the daemon last reported running."""
    push_error: str = ""
    """Why the last push failed ("" after a success)."""
    push_attempts: int = 0
    """Failed pushes in a row (for the backoff)."""
    next_push_ms: int = 0
    """Do not retry a failed push before this."""
    update_errors: tuple[UpdateErrorRecord, ...] = ()
    """The agents the daemon refused or failed to apply (as last reported)."""
    updated_ms: int = 0
    """When this row last changed."""


@dataclass(frozen=True)
class RolloutRecord:
    """A rollout as stored: its decision record (JSON) and bookkeeping."""

    id: int
    """Unique, increasing (0 before it is stored)."""
    name: str
    """The definition."""
    target: int
    """The revision moved to."""
    previous: int
    """The revision moved from (the revert target)."""
    state: str
    """RolloutState name."""
    record: str
    """`manager.service.rollout.Rollout` as JSON."""
    actor: str
    """Who started it."""
    message: str
    """Why (the definition's change cause)."""
    created_ms: int
    """When it was created."""
    updated_ms: int
    """When it last changed."""
    ended_ms: int = 0
    """When it ended (0: live)."""


@dataclass(frozen=True)
class RolloutNodeRecord:
    """One node in a rollout."""

    rollout_id: int
    """The rollout."""
    node_id: str
    """The node."""
    phase: str
    """NodePhase name."""
    batch: int
    """The batch that moved it (-1: not moved by this rollout)."""
    since_ms: int
    """When it entered its phase."""
    offline: bool
    """On hold because its node is offline."""
    reason: str
    """Why it failed."""


@dataclass(frozen=True)
class ArtifactRecord:
    """A stored artifact: a name and version for verified, immutable content."""

    name: str
    """The artifact's name ("web")."""
    version: str
    """Its version ("1.4.2")."""
    digest: str
    """``sha256:<hex>`` of its bytes."""
    size: int
    """Its size in bytes."""
    created_ms: int
    """When it was pushed."""
    actor: str
    """Who pushed it ("operator/alice")."""
