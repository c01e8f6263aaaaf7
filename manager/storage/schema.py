"""The manager's tables as SQLAlchemy Core objects (the migrations create the same).

`tests/integration/test_storage_schema.py` compares the migrated database with
this metadata, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Double,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    false,
)

__all__ = [
    "agent_states",
    "artifact_blobs",
    "artifact_chunks",
    "artifacts",
    "assignments",
    "control_streams",
    "definition_revisions",
    "definitions",
    "events",
    "job_output",
    "job_targets",
    "jobs",
    "join_tokens",
    "manager_replicas",
    "metadata",
    "metric_batches",
    "metric_rollup_state",
    "metric_rollups",
    "metric_samples",
    "node_certificates",
    "node_desired",
    "node_revocations",
    "nodes",
    "operations_audit",
    "rollout_nodes",
    "rollouts",
]

# SQLite only makes INTEGER PRIMARY KEY an alias of the rowid (no extra index,
# monotonic); BIGINT PRIMARY KEY would be a plain column there.
BigId = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

nodes = Table(
    "nodes",
    metadata,
    Column("node_id", String(253), primary_key=True),
    Column("hostname", String(253), nullable=False),
    Column("ip", String(64), nullable=False),
    Column("os", String(64), nullable=False),
    Column("arch", String(64), nullable=False),
    # JSON objects. `labels` is the effective set selectors match: the daemon's
    # (replaced by each registration) overlaid with the operators' (kept).
    Column("labels", Text, nullable=False),
    Column("daemon_labels", Text, nullable=False, server_default="{}"),
    Column("operator_labels", Text, nullable=False, server_default="{}"),
    Column("daemon_version", String(64), nullable=False),
    Column("agent_version", String(64), nullable=False),
    Column("daemon_address", String(300), nullable=False),
    Column("status", String(16), nullable=False),
    Column("last_seen_ms", BigInteger, nullable=False),
    Column("registered_at_ms", BigInteger, nullable=False),
    # The daemon refuses remote jobs (its `[jobs] enabled = false`), per registration.
    Column("jobs_disabled", Boolean, nullable=False, server_default=false()),
    # When the node's certificate expires (enrollment, renewal, or the one it
    # registered with); 0: unknown.
    Column("cert_not_after_ms", BigInteger, nullable=False, server_default="0"),
    # How far its clock is off the manager's at its last registration, ms
    # (positive: ahead); NULL: unknown (a daemon that stamps no time on its hello).
    Column("clock_offset_ms", BigInteger, nullable=True),
    CheckConstraint("status IN ('online', 'offline')", name="status"),
    # The sweeper's "online and last seen before the cutoff".
    Index(None, "status", "last_seen_ms"),
)

agent_states = Table(
    "agent_states",
    metadata,
    Column(
        "node_id",
        String(253),
        ForeignKey("nodes.node_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("agent_id", String(253), nullable=False),
    Column("status", String(32), nullable=False),
    Column("pid", BigInteger, nullable=False),
    Column("last_heartbeat_ms", BigInteger, nullable=False),
    Column("type", String(128), nullable=False),
    Column("version", String(128), nullable=False),
    Column("start_time_ms", BigInteger, nullable=False),
    Column("restart_count", BigInteger, nullable=False),
    Column("exit_code", BigInteger, nullable=False),
    Column("message", Text, nullable=False),
    Column("labels", Text, nullable=False),
    Column("health", String(32), nullable=False),
    Column("config_version", BigInteger, nullable=False),
    # How the agent's last process ended, kept beside its current state.
    Column("last_exit_kind", String(32), nullable=False, server_default=""),
    Column("last_exit_code", BigInteger, nullable=False, server_default="0"),
    Column("last_exit_reason", Text, nullable=False, server_default=""),
    Column("last_exit_ms", BigInteger, nullable=False, server_default="0"),
    # When the daemon reported this state (stale views say "as of").
    Column("reported_ms", BigInteger, nullable=False, server_default="0"),
    # Desired state: the definition revision the running spec comes from (0:
    # a host agent), and the health detail rollouts judge by.
    Column("revision", BigInteger, nullable=False, server_default="0"),
    Column("health_message", Text, nullable=False, server_default=""),
    Column("health_since_ms", BigInteger, nullable=False, server_default="0"),
    # Why its output is being lost (its log's filesystem is full); "" when it is not.
    Column("log_problem", Text, nullable=False, server_default=""),
    PrimaryKeyConstraint("node_id", "agent_id"),
    CheckConstraint("pid >= 0", name="pid"),
    CheckConstraint("restart_count >= 0", name="restart_count"),
    CheckConstraint("config_version >= 0", name="config_version"),
)

metric_samples = Table(
    "metric_samples",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("node_id", String(253), nullable=False),
    Column("agent_id", String(253), nullable=False),
    Column("type", String(64), nullable=False),
    Column("name", String(128), nullable=False),
    Column("ts_ms", BigInteger, nullable=False),
    Column("value", Double, nullable=False),
    Index(None, "node_id", "type", "ts_ms"),  # queries
    Index(None, "ts_ms"),  # rollup ranges and pruning
)

metric_rollups = Table(
    "metric_rollups",
    metadata,
    Column("node_id", String(253), nullable=False),
    Column("agent_id", String(253), nullable=False),
    Column("type", String(64), nullable=False),
    Column("name", String(128), nullable=False),
    Column("bucket_ms", BigInteger, nullable=False),
    Column("min", Double, nullable=False),
    Column("max", Double, nullable=False),
    Column("sum", Double, nullable=False),
    Column("count", BigInteger, nullable=False),
    PrimaryKeyConstraint("node_id", "type", "agent_id", "name", "bucket_ms"),
    Index(None, "bucket_ms"),  # pruning
)

# One row (id=1): everything with ts_ms < rolled_until_ms is in metric_rollups.
metric_rollup_state = Table(
    "metric_rollup_state",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("rolled_until_ms", BigInteger, nullable=False),
)

metric_batches = Table(
    "metric_batches",
    metadata,
    Column("node_id", String(253), nullable=False),
    Column("sequence", BigInteger, nullable=False),
    Column("received_ms", BigInteger, nullable=False),
    PrimaryKeyConstraint("node_id", "sequence"),
    Index(None, "received_ms"),  # pruning old dedupe keys
)

events = Table(
    "events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("ts_ms", BigInteger, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("node_id", String(253), nullable=False),
    Column("agent_id", String(253), nullable=False),
    Column("message", Text, nullable=False),
    Column("actor", String(300), nullable=False),
    Column("attributes", Text, nullable=False),  # JSON object
    Index(None, "node_id", "id"),
    # AUTOINCREMENT: ids of deleted events are never reused, so a watcher's
    # position stays meaningful.
    sqlite_autoincrement=True,
)

operations_audit = Table(
    "operations_audit",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("ts_ms", BigInteger, nullable=False),
    Column("actor", String(300), nullable=False),
    Column("action", String(128), nullable=False),
    Column("target", String(300), nullable=False),
    Column("detail", Text, nullable=False),  # JSON object
    Column("outcome", String(64), nullable=False),
    sqlite_autoincrement=True,
)


# --- desired state -------------------------------------------------------------------------
# A definition's current revision and the last one that rolled out successfully.
definitions = Table(
    "definitions",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("revision", BigInteger, nullable=False),
    Column("stable_revision", BigInteger, nullable=False),
    Column("deleted_ms", BigInteger, nullable=False),  # 0: live
    Column("created_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)

# Every revision ever applied (the history), the Definition message as JSON.
definition_revisions = Table(
    "definition_revisions",
    metadata,
    Column("name", String(63), nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("body", Text, nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("actor", String(300), nullable=False),
    Column("message", Text, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("deleted", Boolean, nullable=False),
    PrimaryKeyConstraint("name", "revision"),
)

# Which revision of which definition each node should run: a node's desired set.
assignments = Table(
    "assignments",
    metadata,
    Column(
        "node_id",
        String(253),
        ForeignKey("nodes.node_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("name", String(63), nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("since_ms", BigInteger, nullable=False),
    PrimaryKeyConstraint("node_id", "name"),
    Index(None, "name"),
)

# Per node: the version of its managed set, what was delivered and reported.
node_desired = Table(
    "node_desired",
    metadata,
    Column(
        "node_id",
        String(253),
        ForeignKey("nodes.node_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("version", BigInteger, nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("delivered_version", BigInteger, nullable=False),
    Column("reported_version", BigInteger, nullable=False),
    Column("push_error", Text, nullable=False),
    Column("push_attempts", Integer, nullable=False),
    Column("next_push_ms", BigInteger, nullable=False),
    Column("update_errors", Text, nullable=False),  # JSON list
    Column("updated_ms", BigInteger, nullable=False),
)

# Rollouts: the record of `manager.service.rollout.Rollout` as JSON, and its nodes.
rollouts = Table(
    "rollouts",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("name", String(63), nullable=False),
    Column("target", BigInteger, nullable=False),
    Column("previous", BigInteger, nullable=False),
    Column("state", String(32), nullable=False),
    Column("record", Text, nullable=False),
    Column("actor", String(300), nullable=False),
    Column("message", Text, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
    Column("ended_ms", BigInteger, nullable=False),  # 0: live
    Index(None, "name", "id"),
    Index(None, "ended_ms"),
    sqlite_autoincrement=True,
)

rollout_nodes = Table(
    "rollout_nodes",
    metadata,
    Column(
        "rollout_id",
        BigId,
        ForeignKey("rollouts.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("node_id", String(253), nullable=False),
    Column("phase", String(16), nullable=False),
    Column("batch", Integer, nullable=False),
    Column("since_ms", BigInteger, nullable=False),
    Column("offline", Boolean, nullable=False),
    Column("reason", Text, nullable=False),
    PrimaryKeyConstraint("rollout_id", "node_id"),
)

# Artifacts (manager/storage/artifacts.py): bytes in chunk rows, so every
# replica on the database serves them. A blob is a staging upload while its
# digest is NULL (`declared` is what the client claims); the final transaction
# of an upload sets `digest` only once the received bytes hash to it, so a
# blob with a digest is complete and verified. Unique: one blob per content.
# AUTOINCREMENT: the id of a removed staging blob is never reused, so a stalled
# upload can never write its chunks into someone else's blob.
artifact_blobs = Table(
    "artifact_blobs",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("digest", String(71), nullable=True, unique=True),
    Column("declared", String(71), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("chunk_size", Integer, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    # Last chunk written: staging blobs idle past the expiry are removed.
    Column("updated_ms", BigInteger, nullable=False),
    CheckConstraint("size >= 0", name="size"),
    CheckConstraint("chunk_size > 0", name="chunk_size"),
    Index(None, "updated_ms"),
    sqlite_autoincrement=True,
)

# Every chunk is chunk_size bytes but the last, so byte `offset` is in chunk
# offset // chunk_size.
artifact_chunks = Table(
    "artifact_chunks",
    metadata,
    Column(
        "blob_id",
        BigInteger,
        ForeignKey("artifact_blobs.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("idx", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
    PrimaryKeyConstraint("blob_id", "idx"),
)

# (name, version) -> content; immutable once stored.
artifacts = Table(
    "artifacts",
    metadata,
    Column("name", String(63), nullable=False),
    Column("version", String(128), nullable=False),
    # A stored artifact always has its complete blob (deleting one in use fails).
    Column("digest", String(71), ForeignKey("artifact_blobs.digest"), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("actor", String(300), nullable=False),
    PrimaryKeyConstraint("name", "version"),
    Index(None, "digest"),
)


# Jobs (manager/storage/jobs.py): the JobSpec message as JSON, one row per
# target, and the targets' output in chunk rows. Ids are made by the manager
# (time-ordered text), so replicas never race for them.
jobs = Table(
    "jobs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(63), nullable=False),
    Column("spec", Text, nullable=False),
    Column("actor", String(300), nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("ended_ms", BigInteger, nullable=False),  # 0: live
    # Derived from the targets (`manager.service.jobs.job_state`), kept for lists.
    Column("state", String(16), nullable=False),
    Column("reason", Text, nullable=False),
    Column("rerun_of", String(64), nullable=False),
    # Targets running at once, resolved from max_concurrency when the job started.
    Column("concurrency", Integer, nullable=False),
    # An operator cancelled the whole job (0: not cancelled).
    Column("cancelled_ms", BigInteger, nullable=False),
    Index(None, "created_ms"),
    Index(None, "ended_ms"),
)

job_targets = Table(
    "job_targets",
    metadata,
    Column("job_id", String(64), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("node_id", String(253), nullable=False),
    Column("idx", Integer, nullable=False),  # the target's place in the job (stage 0 first)
    Column("stage", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("exit_code", Integer, nullable=False),
    Column("started_ms", BigInteger, nullable=False),
    Column("ended_ms", BigInteger, nullable=False),
    Column("reason", Text, nullable=False),
    Column("steps", Text, nullable=False),  # JSON list of step results
    Column("output_bytes", BigInteger, nullable=False),  # what the node reported writing
    Column("output_stored_bytes", BigInteger, nullable=False),  # stored chunks end here
    Column("truncated", Boolean, nullable=False),
    Column("cancel_requested", Boolean, nullable=False),
    # Delivery: StartJob attempts that could not reach the node, the last error,
    # when to try again, and when the node accepted it.
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text, nullable=False),
    Column("next_attempt_ms", BigInteger, nullable=False),
    Column("dispatched_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),  # the manager last changed or heard of it
    PrimaryKeyConstraint("job_id", "node_id"),
    CheckConstraint("output_stored_bytes >= 0", name="output_stored_bytes"),
)

# A target's output: contiguous, non-overlapping chunks; the chunk at `pos` holds
# bytes [pos, pos + len(data)) of the output.
job_output = Table(
    "job_output",
    metadata,
    Column("job_id", String(64), nullable=False),
    Column("node_id", String(253), nullable=False),
    Column("pos", BigInteger, nullable=False),
    Column("data", LargeBinary, nullable=False),
    PrimaryKeyConstraint("job_id", "node_id", "pos"),
    ForeignKeyConstraint(
        ["job_id", "node_id"],
        ["job_targets.job_id", "job_targets.node_id"],
        ondelete="CASCADE",
    ),
)


# Enrollment (manager/storage/enrollment.py). Join tokens: only the secret's
# hash is kept. A use is spent in the transaction that records the certificate.
join_tokens = Table(
    "join_tokens",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("secret_hash", String(64), nullable=False),
    Column("node_name", String(63), nullable=False),  # "": not one fixed name
    Column("name_prefix", String(63), nullable=False),
    Column("labels", Text, nullable=False),  # JSON object, granted as operator labels
    Column("description", Text, nullable=False),
    Column("created_by", String(300), nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("expires_ms", BigInteger, nullable=False),
    Column("uses_total", Integer, nullable=False),
    Column("uses_left", Integer, nullable=False),
    Column("revoked_ms", BigInteger, nullable=False),  # 0: not revoked
    CheckConstraint("uses_left >= 0", name="uses_left"),
)

# Every certificate the manager issued to a node (enrollment or renewal), kept
# after the node is deleted: the history of who held which serial.
node_certificates = Table(
    "node_certificates",
    metadata,
    Column("serial", String(40), primary_key=True),  # hex
    Column("node_id", String(253), nullable=False),
    Column("token_id", String(16), nullable=False),  # "": a renewal
    Column("issued_ms", BigInteger, nullable=False),
    Column("not_before_ms", BigInteger, nullable=False),
    Column("not_after_ms", BigInteger, nullable=False),
    Index(None, "node_id", "issued_ms"),
)

# The deny list: a node's certificates whose notBefore is earlier than
# `not_before_ms` are refused. Kept when the node is deleted or enrolls again
# (its new certificate starts at or after the cutoff; the old ones stay refused).
node_revocations = Table(
    "node_revocations",
    metadata,
    Column("node_id", String(253), primary_key=True),
    Column("not_before_ms", BigInteger, nullable=False),
    Column("revoked_ms", BigInteger, nullable=False),
    Column("revoked_by", String(300), nullable=False),
    Column("reason", Text, nullable=False),
)


# Manager replicas (manager/service/replicas.py): each running replica with the
# address its peers reach it at, refreshed every few seconds; a row not seen
# recently is a replica that is gone.
manager_replicas = Table(
    "manager_replicas",
    metadata,
    Column("replica_id", String(253), primary_key=True),  # its manager certificate's name
    Column("address", String(300), nullable=False),
    Column("started_ms", BigInteger, nullable=False),
    Column("last_seen_ms", BigInteger, nullable=False),
)

# Which replica holds each node's control stream. `epoch` grows with every
# stream recorded over an existing record, and a replica deletes only (its id,
# the epoch it wrote): one that lost the stream cannot clear a newer record.
# No foreign keys: rows of a
# replica that died stay until its nodes reconnect elsewhere, and are ignored
# meanwhile (its `manager_replicas` row goes stale).
control_streams = Table(
    "control_streams",
    metadata,
    Column("node_id", String(253), primary_key=True),
    Column("replica_id", String(253), nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("opened_ms", BigInteger, nullable=False),
    Index(None, "replica_id"),
)
