"""FleetService replies as plain dicts: what -o json/yaml print and tables read.

Enum values lose their prefix (``AGENT_STATUS_RUNNING`` -> ``RUNNING``) and
wire times (epoch ms) become RFC 3339 UTC strings, None for "never". These
shapes are fleetctl's documented output (docs/fleetctl.md): keep them stable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fleet import selectors
from fleet.artifacts import format_size
from fleet.v1 import common_pb2, desired_pb2, fleet_pb2, jobs_pb2
from fleetctl.deffile import definition_to_dict
from fleetctl.timespec import format_time

__all__ = [
    "agent_view",
    "artifact_view",
    "definition_change_view",
    "definition_status_view",
    "enum_name",
    "event_view",
    "job_spec_view",
    "job_target_view",
    "job_view",
    "last_exit_view",
    "metric_type_view",
    "node_agent_view",
    "node_view",
    "points_view",
    "policy_view",
    "revision_view",
    "rollout_node_view",
    "rollout_view",
    "spec_view",
    "summary_view",
    "target_view",
]


def enum_name(enum: Any, value: int, prefix: str) -> str:
    """``AGENT_STATUS_RUNNING`` -> ``RUNNING`` for a generated enum class; else the number."""
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix)


def _status(value: int) -> str:
    return enum_name(common_pb2.AgentStatus, value, "AGENT_STATUS_")


def node_view(node: fleet_pb2.Node) -> dict[str, Any]:
    """One node (ListNodes / GetNode / UpdateNodeLabels)."""
    return {
        "node_id": node.node_id,
        "status": enum_name(common_pb2.NodeStatus, node.status, "NODE_STATUS_"),
        "hostname": node.hostname,
        "ip": node.ip,
        "os": node.os,
        "arch": node.arch,
        "labels": dict(sorted(node.labels.items())),
        "daemon_labels": dict(sorted(node.daemon_labels.items())),
        "operator_labels": dict(sorted(node.operator_labels.items())),
        "daemon_version": node.daemon_version,
        "agent_version": node.agent_version,
        "daemon_address": node.daemon_address,
        "connection": enum_name(
            fleet_pb2.ConnectionState, node.connection_state, "CONNECTION_STATE_"
        ),
        "last_heartbeat": format_time(node.last_heartbeat),
        "last_heartbeat_ms": node.last_heartbeat,
        "registered_at": format_time(node.registered_at),
        "agents": {_status(c.status): c.count for c in node.agent_counts},
        "jobs_disabled": node.jobs_disabled,
        "desired_version": node.desired_version,
        "reported_version": node.reported_version,
        "drift": node.drift,
        "drift_reason": node.drift_reason,
        "update_errors": [
            {"agent_id": e.agent_id, "revision": e.revision, "reason": e.reason}
            for e in node.update_errors
        ],
        "stream": enum_name(
            fleet_pb2.ControlStreamState, node.stream_state, "CONTROL_STREAM_STATE_"
        ),
        "stream_since": format_time(node.stream_since),
        "stream_since_ms": node.stream_since,
        "stream_offline_at": format_time(node.stream_offline_at),
        "stream_replica": node.stream_replica,
        "cert_expire_time": format_time(node.cert_expire_time),
        "cert_expire_time_ms": node.cert_expire_time,
        # How far its clock is off the manager's (positive: ahead); None: unknown.
        "clock_offset_ms": node.clock_offset_ms if node.HasField("clock_offset_ms") else None,
        "revoke_time": format_time(node.revoke_time),
    }


def last_exit_view(agent: common_pb2.AgentInfo) -> dict[str, Any] | None:
    """How the agent's last process ended; None if none ever did."""
    if not agent.HasField("last_exit"):
        return None
    how = agent.last_exit
    return {
        "kind": enum_name(common_pb2.AgentExitKind, how.kind, "AGENT_EXIT_KIND_").lower(),
        "exit_code": how.exit_code,
        "reason": how.reason,
        "time": format_time(how.time),
        "time_ms": how.time,
    }


def spec_view(spec: common_pb2.AgentSpec) -> dict[str, Any]:
    """The spec a daemon runs, as `agents show` prints it (env: names only)."""
    health = enum_name(common_pb2.HealthCheckKind, spec.health.kind, "HEALTH_CHECK_KIND_")
    return {
        "argv": list(spec.argv),
        "env_keys": sorted(spec.env),
        "cwd": spec.cwd,
        "user": spec.user,
        "restart": enum_name(common_pb2.RestartPolicy, spec.restart, "RESTART_POLICY_").lower(),
        "autostart": spec.autostart,
        "start_secs": spec.start_secs,
        "max_retries": spec.max_retries,
        "stop_signal": spec.stop_signal,
        "stop_timeout_seconds": spec.stop_timeout_seconds,
        "health": "none"
        if health == "UNSPECIFIED"
        else f"{health.lower()} (timeout {spec.health.timeout_seconds:g}s)",
    }


def agent_view(node_id: str, agent: common_pb2.AgentInfo) -> dict[str, Any]:
    """One agent on its node (ListAgents / OperateAgent / a fan-out result)."""
    return {
        "node_id": node_id,
        "agent_id": agent.id,
        "type": agent.type,
        "status": _status(agent.status),
        "pid": agent.pid or None,
        "version": agent.version,
        "start_time": format_time(agent.start_time),
        "start_time_ms": agent.start_time,
        "restart_count": agent.restart_count,
        "last_heartbeat": format_time(agent.last_heartbeat),
        "exit_code": agent.exit_code,
        "message": agent.message,
        "labels": dict(sorted(agent.labels.items())),
        "health": enum_name(common_pb2.AgentHealth, agent.health, "AGENT_HEALTH_").replace(
            "UNSPECIFIED", "NONE"
        ),
        "health_message": agent.health_message,
        "log_problem": agent.log_problem,
        "health_since": format_time(agent.health_since),
        "health_since_ms": agent.health_since,
        "backoff_until": format_time(agent.backoff_until),
        "config_version": agent.config_version,
        "revision": agent.revision,
        "last_exit": last_exit_view(agent),
    }


def node_agent_view(item: fleet_pb2.NodeAgent) -> dict[str, Any]:
    """An agent of ListAgents: the agent, plus whether its node's report is stale."""
    view = agent_view(item.node_id, item.agent)
    view["stale"] = item.stale
    view["reported_at"] = format_time(item.reported_at)
    view["reported_at_ms"] = item.reported_at
    if item.agent.HasField("spec"):
        view["spec"] = spec_view(item.agent.spec)
        view["log_path"] = item.agent.log_path
    return view


def target_view(result: fleet_pb2.TargetResult) -> dict[str, Any]:
    """One fan-out target's outcome."""
    return {
        "node_id": result.node_id,
        "agent_id": result.agent_id,
        "outcome": enum_name(fleet_pb2.TargetOutcome, result.outcome, "TARGET_OUTCOME_"),
        "message": result.message,
        "duration_ms": result.duration_ms,
        "status": _status(result.agent.status) if result.HasField("agent") else None,
        "pid": (result.agent.pid or None) if result.HasField("agent") else None,
    }


def summary_view(summary: fleet_pb2.OperationSummary) -> dict[str, Any]:
    """A fan-out's closing summary."""
    return {
        "operation_id": summary.operation_id,
        "total": summary.total,
        "ok": summary.ok,
        "failed": summary.failed,
        "skipped": summary.skipped,
        "planned": summary.planned,
        "duration_ms": summary.duration_ms,
    }


def event_view(event: fleet_pb2.Event) -> dict[str, Any]:
    """One event of the feed."""
    return {
        "id": event.id,
        "time": format_time(event.timestamp),
        "kind": enum_name(fleet_pb2.EventKind, event.kind, "EVENT_KIND_"),
        "node_id": event.node_id,
        "agent_id": event.agent_id,
        "actor": event.actor,
        "message": event.message,
        "attributes": dict(sorted(event.attributes.items())),
    }


def points_view(name: str, points: Sequence[tuple[int, float]]) -> dict[str, Any]:
    """One metric series with its points (bucket start ms, value)."""
    return {
        "name": name,
        "points": [{"timestamp": format_time(t), "timestamp_ms": t, "value": v} for t, v in points],
    }


def metric_type_view(info: fleet_pb2.MetricTypeInfo) -> dict[str, Any]:
    """One metric type a node reported; `reported_by` lists "host" and the agents."""
    return {
        "type": info.type,
        "names": list(info.names),
        "host": info.host,
        "agent_ids": list(info.agent_ids),
        "reported_by": (["host"] if info.host else []) + list(info.agent_ids),
        "newest": format_time(info.newest_timestamp),
        "newest_ms": info.newest_timestamp,
    }


def artifact_view(artifact: desired_pb2.Artifact) -> dict[str, Any]:
    """One stored artifact (ListArtifacts / GetArtifact / PushArtifact)."""
    return {
        "name": artifact.name,
        "version": artifact.version,
        "digest": artifact.digest,
        "size_bytes": artifact.size_bytes,
        "size": format_size(artifact.size_bytes),
        "created_at": format_time(artifact.created_at),
        "created_at_ms": artifact.created_at,
        "actor": artifact.actor,
        "referenced_by": list(artifact.referenced_by),
    }


def _rollout_state(value: int) -> str:
    return enum_name(desired_pb2.RolloutState, value, "ROLLOUT_STATE_")


def policy_view(policy: desired_pb2.UpdatePolicy) -> dict[str, Any]:
    """A rollout's update policy; None for a duration left to the manager's default."""

    def opt(field: str) -> float | None:
        return getattr(policy, field) if policy.HasField(field) else None  # type: ignore[arg-type]

    return {
        "max_parallel": policy.max_parallel or None,
        "canary": policy.canary or None,
        "auto_promote": policy.auto_promote,
        "auto_revert": policy.auto_revert,
        "min_healthy_time_seconds": opt("min_healthy_time_seconds"),
        "healthy_deadline_seconds": opt("healthy_deadline_seconds"),
        "progress_deadline_seconds": opt("progress_deadline_seconds"),
        "pause_between_batches_seconds": opt("pause_between_batches_seconds"),
    }


def rollout_node_view(node: desired_pb2.RolloutNode) -> dict[str, Any]:
    """One node of a rollout."""
    return {
        "node_id": node.node_id,
        "phase": enum_name(desired_pb2.RolloutNodePhase, node.phase, "ROLLOUT_NODE_PHASE_"),
        "batch": node.batch,
        "since": format_time(node.since),
        "since_ms": node.since,
        "offline": node.offline,
        "reason": node.reason,
        "running_revision": node.running_revision,
        "status": _status(node.status),
        "health": enum_name(common_pb2.AgentHealth, node.health, "AGENT_HEALTH_").replace(
            "UNSPECIFIED", "NONE"
        ),
    }


def rollout_view(rollout: desired_pb2.Rollout) -> dict[str, Any]:
    """One rollout (GetRollout / ListRollouts / WatchRollout / the control RPCs)."""
    return {
        "id": rollout.id,
        "name": rollout.name,
        "target_revision": rollout.target_revision,
        "previous_revision": rollout.previous_revision,
        "state": _rollout_state(rollout.state),
        "reason": rollout.reason,
        "batch": rollout.batch,
        "promoted": rollout.promoted,
        "reverted_from": rollout.reverted_from,
        "created_at": format_time(rollout.created_at),
        "created_at_ms": rollout.created_at,
        "updated_at": format_time(rollout.updated_at),
        "ended_at": format_time(rollout.ended_at),
        "actor": rollout.actor,
        "message": rollout.message,
        "pending": rollout.pending,
        "updating": rollout.updating,
        "done": rollout.done,
        "failed": rollout.failed,
        "offline": rollout.offline,
        "total": rollout.pending + rollout.updating + rollout.done + rollout.failed,
        "policy": policy_view(rollout.policy),
        "nodes": [rollout_node_view(n) for n in rollout.nodes],
    }


def definition_change_view(change: desired_pb2.DefinitionChange) -> dict[str, Any]:
    """What applying (or planning, deleting, undoing) one definition does."""
    return {
        "name": change.name,
        "revision": change.revision,
        "previous_revision": change.previous_revision,
        "changed": change.changed,
        "summary": change.summary,
        "rollout_id": change.rollout_id,
        "nodes": [
            {
                "node_id": n.node_id,
                "action": enum_name(
                    desired_pb2.NodeChangeAction, n.action, "NODE_CHANGE_ACTION_"
                ).lower(),
                "reason": n.reason,
            }
            for n in change.nodes
        ],
        "batches": [{"number": b.number, "node_ids": list(b.node_ids)} for b in change.batches],
    }


def revision_view(revision: desired_pb2.DefinitionRevision) -> dict[str, Any]:
    """One stored revision of a definition, its body in the file's spelling."""
    return {
        "name": revision.definition.name,
        "revision": revision.revision,
        "actor": revision.actor,
        "message": revision.message,
        "created_at": format_time(revision.created_at),
        "created_at_ms": revision.created_at,
        "deleted": revision.deleted,
        "definition": definition_to_dict(revision.definition),
    }


def definition_status_view(status: desired_pb2.DefinitionStatus) -> dict[str, Any]:
    """A definition (ListDefinitions / GetDefinition) and how far the fleet is with it."""
    current = status.current
    return {
        "name": current.definition.name,
        "revision": current.revision,
        "stable_revision": status.stable_revision,
        "deleted": current.deleted,
        "selector": str(selectors.from_proto(current.definition.selector)),
        "actor": current.actor,
        "message": current.message,
        "updated_at": format_time(current.created_at),
        "updated_at_ms": current.created_at,
        "nodes": status.nodes,
        "nodes_current": status.nodes_current,
        "nodes_failed": status.nodes_failed,
        "unplaced": status.unplaced,
        "unplaced_reason": status.unplaced_reason,
        "rollout": rollout_view(status.rollout) if status.HasField("rollout") else None,
    }


def _job_target_state(value: int) -> str:
    return enum_name(jobs_pb2.JobTargetState, value, "JOB_TARGET_STATE_")


def _seconds_between(start_ms: int, end_ms: int) -> float | None:
    return (end_ms - start_ms) / 1000 if start_ms and end_ms else None


def job_spec_view(spec: jobs_pb2.JobSpec) -> dict[str, Any]:
    """What a job runs and where (env: names only, as `agents show` does)."""

    def opt(field: str) -> float | None:
        return getattr(spec, field) if spec.HasField(field) else None  # type: ignore[arg-type]

    steps = []
    for i, step in enumerate(spec.steps):
        command = step.command
        steps.append(
            {
                "index": i,
                "name": step.name or f"step-{i + 1}",
                "argv": list(command.argv),
                "script": command.script,
                "interpreter": list(command.interpreter),
                "env_keys": sorted(command.env),
                "cwd": command.cwd,
                "user": command.user,
                "timeout_seconds": command.timeout_seconds or None,
                "when": enum_name(jobs_pb2.StepWhen, step.when, "STEP_WHEN_")
                .replace("UNSPECIFIED", "ON_SUCCESS")
                .lower(),
            }
        )
    return {
        "name": spec.name,
        "selector": str(selectors.from_proto(spec.selector)) if spec.HasField("selector") else None,
        "node_ids": list(spec.node_ids),
        "max_concurrency": spec.max_concurrency or None,
        "max_errors": spec.max_errors,
        "canary": spec.canary,
        "delivery_timeout_seconds": opt("delivery_timeout_seconds"),
        "timeout_seconds": opt("timeout_seconds"),
        "lock": spec.lock,
        "steps": steps,
    }


def job_target_view(target: jobs_pb2.JobTarget) -> dict[str, Any]:
    """One target (a node) of a job, with its steps."""
    return {
        "node_id": target.node_id,
        "state": _job_target_state(target.state),
        "exit_code": target.exit_code,
        "started_at": format_time(target.started_at),
        "started_at_ms": target.started_at,
        "ended_at": format_time(target.ended_at),
        "ended_at_ms": target.ended_at,
        "duration_seconds": _seconds_between(target.started_at, target.ended_at),
        "reason": target.reason,
        "stage": target.stage,
        "output_bytes": target.output_bytes,
        "output_stored_bytes": target.output_stored_bytes,
        "output_truncated": target.output_truncated,
        "steps": [
            {
                "index": s.index,
                "name": s.name or f"step-{s.index + 1}",
                "state": _job_target_state(s.state),
                "exit_code": s.exit_code,
                "started_at": format_time(s.started_at),
                "started_at_ms": s.started_at,
                "ended_at": format_time(s.ended_at),
                "ended_at_ms": s.ended_at,
                "duration_seconds": _seconds_between(s.started_at, s.ended_at),
                "reason": s.reason,
            }
            for s in target.steps
        ],
    }


def job_view(job: jobs_pb2.Job) -> dict[str, Any]:
    """One job (RunJob / GetJob / ListJobs / WatchJob / CancelJob / RerunJob)."""
    return {
        "id": job.id,
        "name": job.spec.name,
        "state": enum_name(jobs_pb2.JobState, job.state, "JOB_STATE_"),
        "actor": job.actor,
        "created_at": format_time(job.created_at),
        "created_at_ms": job.created_at,
        "ended_at": format_time(job.ended_at),
        "ended_at_ms": job.ended_at,
        "duration_seconds": _seconds_between(job.created_at, job.ended_at),
        "rerun_of": job.rerun_of,
        "reason": job.reason,
        "counts": {_job_target_state(c.state): c.count for c in job.counts if c.count},
        "spec": job_spec_view(job.spec),
        "targets": [job_target_view(t) for t in job.targets],
    }
