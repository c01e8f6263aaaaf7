"""The manager's tables as SQLAlchemy Core objects (the migrations create the same).

`tests/integration/test_storage_schema.py` compares the migrated database with
this metadata, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

__all__ = [
    "agent_states",
    "events",
    "metadata",
    "metric_batches",
    "metric_rollup_state",
    "metric_rollups",
    "metric_samples",
    "nodes",
    "operations_audit",
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
