"""A daemon's live AgentInfo as the manager's agent record (ListAgents live, `agents show`)."""

from __future__ import annotations

from fleet.v1 import common_pb2
from manager.service.operations import record_from_info


def test_the_live_record_keeps_the_revision_and_the_health_reason() -> None:
    """The daemon's answer keeps the definition revision, the health's reason and since when."""
    info = common_pb2.AgentInfo(
        id="probe",
        status=common_pb2.AGENT_STATUS_RUNNING,
        health=common_pb2.AGENT_HEALTH_UNHEALTHY,
        revision=6,
        health_message="connect 127.0.0.1:1: connection refused",
        health_since=1_796_641_700_000,
        log_problem="no space left on the filesystem of /logs/probe.log: ...",
    )
    record = record_from_info("node-1", info, received_ms=1_796_641_800_000)
    assert (record.status, record.health) == ("RUNNING", "UNHEALTHY")
    assert record.revision == 6
    assert record.health_message == "connect 127.0.0.1:1: connection refused"
    assert record.health_since_ms == 1_796_641_700_000
    assert record.log_problem == "no space left on the filesystem of /logs/probe.log: ..."
