"""Jobs through the real manager over mTLS: RunJob to the last result, with test
daemons that report back as their nodes (tests/integration/job_helpers.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from fleet_harness import selector
from job_helpers import command, job_env
from manager_harness import node_stub, rpc_error

from fleet.v1 import fleet_pb2, jobs_pb2, manager_pb2
from manager.service.jobs import format_time

S = jobs_pb2


async def finished(stub: Any, job_id: str) -> jobs_pb2.Job:
    """Follow WatchJob until the job ended; GetJob's answer then."""
    async with asyncio.timeout(20):
        async for msg in stub.WatchJob(fleet_pb2.FleetServiceWatchJobRequest(job_id=job_id)):
            if msg.job.ended_at:
                break
    reply = await stub.GetJob(fleet_pb2.FleetServiceGetJobRequest(job_id=job_id))
    job: jobs_pb2.Job = reply.job
    return job


def states(job: jobs_pb2.Job) -> dict[str, str]:
    return {t.node_id: S.JobTargetState.Name(t.state) for t in job.targets}


@pytest.fixture
async def env(pki: Any, tmp_path: Path, database_url: str) -> Any:
    async with job_env(pki, tmp_path, database_url) as running:
        yield running


async def test_a_job_runs_on_every_selected_node_and_ends_successful(env: Any) -> None:
    """Every node of the selector gets the job once; the results, output and events are stored."""
    _manager, stub, start = env
    nodes = [await start(f"web-{i}", output=f"hello from web-{i}\n".encode()) for i in range(3)]
    await start("db-1", labels={"env": "dev"})
    reply = await stub.RunJob(
        fleet_pb2.FleetServiceRunJobRequest(
            spec=command("echo", "hi", selector=selector("env=prod"), max_concurrency="2")
        )
    )
    job_id = reply.job.id
    assert sorted(t.node_id for t in reply.job.targets) == ["web-0", "web-1", "web-2"]
    job = await finished(stub, job_id)
    assert S.JobState.Name(job.state) == "JOB_STATE_SUCCESS"
    assert set(states(job).values()) == {"JOB_TARGET_STATE_SUCCESS"}
    assert job.actor == "operator/alice"
    assert all(n.daemon.starts == [job_id] for n in nodes)
    out = [
        m
        async for m in stub.ReadJobOutput(
            fleet_pb2.FleetServiceReadJobOutputRequest(job_id=job_id, node_id="web-1")
        )
    ]
    assert b"".join(m.data for m in out) == b"hello from web-1\n"
    assert out[-1].eof
    assert not out[-1].truncated
    events = [
        m.event
        async for m in stub.WatchEvents(
            fleet_pb2.FleetServiceWatchEventsRequest(
                kinds=[
                    fleet_pb2.EVENT_KIND_JOB_STARTED,
                    fleet_pb2.EVENT_KIND_JOB_TARGET_FINISHED,
                    fleet_pb2.EVENT_KIND_JOB_FINISHED,
                ]
            )
        )
    ]
    kinds = [fleet_pb2.EventKind.Name(e.kind) for e in events]
    assert kinds.count("EVENT_KIND_JOB_TARGET_FINISHED") == 3
    assert kinds[0] == "EVENT_KIND_JOB_STARTED"
    assert kinds[-1] == "EVENT_KIND_JOB_FINISHED"
    assert "SUCCESS" in events[-1].message
    listed = await stub.ListJobs(fleet_pb2.FleetServiceListJobsRequest())
    assert [j.id for j in listed.jobs] == [job_id]
    assert {(c.state, c.count) for c in listed.jobs[0].counts} == {(S.JOB_TARGET_STATE_SUCCESS, 3)}


async def test_max_errors_skips_the_rest_and_a_disabled_host_fails_at_once(env: Any) -> None:
    """One failure with max_errors=1 skips what was not launched, with the reason."""
    _, stub, start = env
    await start("a-1", result=S.JOB_TARGET_STATE_FAILED, exit_code=3)
    for name in ("a-2", "a-3"):
        await start(name)
    await start("a-0", jobs_disabled=True)
    reply = await stub.RunJob(
        fleet_pb2.FleetServiceRunJobRequest(
            spec=command(
                "false", node_ids=["a-0", "a-1", "a-2", "a-3"], max_concurrency="1", max_errors=2
            )
        )
    )
    job = await finished(stub, reply.job.id)
    got = {t.node_id: t for t in job.targets}
    assert S.JobTargetState.Name(got["a-0"].state) == "JOB_TARGET_STATE_FAILED"
    assert "enabled = false" in got["a-0"].reason
    assert got["a-1"].state == S.JOB_TARGET_STATE_FAILED
    assert got["a-1"].exit_code == 3
    assert got["a-2"].state == S.JOB_TARGET_STATE_SKIPPED
    assert got["a-3"].state == S.JOB_TARGET_STATE_SKIPPED
    assert got["a-2"].reason.startswith("max_errors=2 reached")
    assert job.state == S.JOB_STATE_FAILED
    assert "max_errors=2" in job.reason


async def test_cancel_stops_running_targets_and_cancels_pending_ones(env: Any) -> None:
    """CancelJob asks the node to stop; the job ends CANCELLED; cancelling again changes nothing."""
    _, stub, start = env
    node = await start("c-1", hold=True)
    await start("c-2")
    reply = await stub.RunJob(
        fleet_pb2.FleetServiceRunJobRequest(
            spec=command("sleep", "1000", node_ids=["c-1", "c-2"], max_concurrency="1")
        )
    )
    job_id = reply.job.id
    async with asyncio.timeout(10):
        while not node.daemon.starts:  # noqa: ASYNC110  # a test daemon's record, no event
            await asyncio.sleep(0.02)
    await stub.CancelJob(fleet_pb2.FleetServiceCancelJobRequest(job_id=job_id))
    job = await finished(stub, job_id)
    assert job.state == S.JOB_STATE_CANCELLED
    assert states(job) == {
        "c-1": "JOB_TARGET_STATE_CANCELLED",
        "c-2": "JOB_TARGET_STATE_CANCELLED",
    }
    assert node.daemon.cancels == [job_id]
    again = await stub.CancelJob(fleet_pb2.FleetServiceCancelJobRequest(job_id=job_id))
    assert again.job.ended_at == job.ended_at


async def test_bad_specs_are_refused_naming_the_field_and_store_nothing(env: Any) -> None:
    """INVALID_ARGUMENT names the field; no job is stored."""
    _, stub, start = env
    await start("v-1")
    cases = {
        "spec.steps[0].command.argv": command(node_ids=["v-1"]),
        "spec.selector": command("true"),
        "spec.timeout_seconds": command("true", node_ids=["v-1"], timeout_seconds=0),
        "spec.max_concurrency": command("true", node_ids=["v-1"], max_concurrency="x"),
        "spec.node_ids[0]": command("true", node_ids=["nope"]),
        "spec.lock": command("true", node_ids=["v-1"], lock="Bad Lock"),
    }
    for field, spec in cases.items():
        err = await rpc_error(stub.RunJob(fleet_pb2.FleetServiceRunJobRequest(spec=spec)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in (err.details() or ""), (field, err.details())
    none = await rpc_error(
        stub.RunJob(
            fleet_pb2.FleetServiceRunJobRequest(spec=command("true", selector=selector("x=y")))
        )
    )
    assert none.code() == grpc.StatusCode.FAILED_PRECONDITION
    planned = await stub.RunJob(
        fleet_pb2.FleetServiceRunJobRequest(spec=command("true", node_ids=["v-1"]), plan=True)
    )
    assert planned.job.id == ""
    assert [t.node_id for t in planned.job.targets] == ["v-1"]
    assert not (await stub.ListJobs(fleet_pb2.FleetServiceListJobsRequest())).jobs


async def test_a_plan_says_which_targets_will_wait_or_fail(env: Any) -> None:
    """--plan tells, from the same read, a target whose node is offline (it waits for the
    delivery timeout) and one whose daemon refuses jobs, in the driver's words; the rest
    have no note. Nothing is stored."""
    manager, stub, start = env
    for name in ("p-1", "p-3"):
        await start(name)
    await start("p-2", jobs_disabled=True)
    now_ms = int(time.time() * 1000)
    assert await manager.nodes.mark_offline(cutoff_ms=now_ms + 1, now_ms=now_ms, only=["p-3"])
    seen = (await manager.nodes.get("p-3")).last_seen_ms / 1000
    planned = await stub.RunJob(
        fleet_pb2.FleetServiceRunJobRequest(
            spec=command("true", node_ids=["p-1", "p-2", "p-3"], delivery_timeout_seconds=120.0),
            plan=True,
        )
    )
    assert {t.node_id: t.reason for t in planned.job.targets} == {
        "p-1": "",
        "p-2": "will fail: p-2 refuses remote jobs (its daemon has [jobs] enabled = false)",
        "p-3": f"offline since {format_time(seen)}: runs if it returns within the delivery"
        " timeout of 120s, else UNDELIVERABLE",
    }
    assert not (await stub.ListJobs(fleet_pb2.FleetServiceListJobsRequest())).jobs


async def test_nodes_report_and_upload_only_for_their_own_targets(env: Any, pki: Any) -> None:
    """Another node's target is PERMISSION_DENIED, an unknown job NOT_FOUND; chunks are
    offset-idempotent, a gap is FAILED_PRECONDITION, the bound truncates."""
    manager, stub, start = env
    await start("o-1", hold=True)
    await start("o-2")
    reply = await stub.RunJob(
        fleet_pb2.FleetServiceRunJobRequest(spec=command("x", node_ids=["o-1"]))
    )
    job_id = reply.job.id
    async with node_stub(pki, "o-2", manager.port) as other:
        err = await rpc_error(
            other.ReportJobStatus(
                manager_pb2.ReportJobStatusRequest(
                    node_id="o-2", job_id=job_id, state=S.JOB_TARGET_STATE_SUCCESS
                )
            )
        )
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        err = await rpc_error(
            other.UploadJobOutput(
                manager_pb2.UploadJobOutputRequest(node_id="o-1", job_id=job_id, data=b"x")
            )
        )
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    async with node_stub(pki, "o-1", manager.port) as own:
        err = await rpc_error(
            own.UploadJobOutput(
                manager_pb2.UploadJobOutputRequest(node_id="o-1", job_id="nope", data=b"x")
            )
        )
        assert err.code() == grpc.StatusCode.NOT_FOUND

        async def up(offset: int, data: bytes) -> manager_pb2.UploadJobOutputResponse:
            reply: manager_pb2.UploadJobOutputResponse = await own.UploadJobOutput(
                manager_pb2.UploadJobOutputRequest(
                    node_id="o-1", job_id=job_id, offset=offset, data=data
                )
            )
            return reply

        assert (await up(0, b"abc")).acked_offset == 3
        assert (await up(0, b"abcdef")).acked_offset == 6  # the repeated part is not stored again
        err = await rpc_error(up(10, b"gap"))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (await up(0, b"")).acked_offset == 6
        big = await up(6, b"z" * (1024 * 1024))
        assert big.truncated
        out = [
            m
            async for m in stub.ReadJobOutput(
                fleet_pb2.FleetServiceReadJobOutputRequest(job_id=job_id, node_id="o-1")
            )
        ]
        data = b"".join(m.data for m in out)
        assert data.startswith(b"abcdef")
        assert len(data) == 1024 * 1024
        assert out[-1].truncated
