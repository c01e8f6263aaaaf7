"""The security matrix: every RPC of every service against every identity, over real mTLS.

The expected outcome of each cell comes from the architecture's rules (§3),
written once in `expected()`. The RPCs come from the generated descriptors:
an RPC added to a .proto without a request in `live_env.requests()` fails
the test. The table of
what really happened is printed (`pytest -s`) and shown in the terminal
summary, and every cell is asserted.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
import pytest
import pytest_asyncio
from artifact_helpers import Grants
from daemon_helpers import agent, eventually, short_tmp
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from http_matrix import HttpOutcome, http_clients, http_invoke
from live_env import (
    EMPTY_DIGEST,
    MATRIX_REPORT,
    SERVICES,
    SLEEP,
    ModulePki,
    Outcome,
    artifact_upload,
    bad_credentials,
    channels,
    invoke,
    live_daemon,
    live_manager,
    manager_name,
    methods,
    node_name,
    requests,
    rpc_name,
)

from daemon.server import DaemonServer
from fleet.pki import Role
from fleet.v1 import fleet_pb2_grpc
from manager.server import ManagerServer

Expect = Literal["refused", "denied", "allowed"]

# --- the rules (ARCHITECTURE.md §3), in one place ---------------------------

TLS_IDENTITIES = (
    "none",
    "other CA",
    "expired",
    "not yet valid",
    "node/a",
    "node/b",
    "manager",
    "operator",
)
"""Who dials the TCP services. The four bad ones claim the service's allowed role."""
AGENT_IDENTITIES = ("supervised agent", "unsupervised process", "agent for another")
"""Who calls AgentService on the daemon's Unix socket."""
HANDSHAKE_REFUSED = frozenset({"none", "other CA", "expired", "not yet valid"})
"""No (valid) certificate of this fleet: the TLS handshake fails, no RPC runs."""
ALLOWED = {
    "ManagerService": "node/a",  # node certificates only, and a node speaks only for itself
    "FleetService": "operator",
    "DaemonService": "manager",
    "AgentService": "supervised agent",  # a process of the agent it names
    "EnrollmentService": "anyone",  # its own port asks for no certificate: the token decides
    "ReplicaService": "manager",  # another replica of the same fleet
}
"""The one identity each service accepts. The ManagerService requests speak for node a."""
OPEN = frozenset({"EnrollmentService"})
"""Services every caller reaches (on the manager's enrollment port, TLS without client
certificates); a certificate offered there is never asked for, so none is refused."""
CLAIMED: dict[str, tuple[Role, str]] = {
    "ManagerService": ("node", "a"),
    "FleetService": ("operator", "alice"),
    "DaemonService": ("manager", "m1"),
    "EnrollmentService": ("node", "a"),
    "ReplicaService": ("manager", "m1"),
}
"""Who the refused identities claim to be, so only the certificate itself is wrong."""
CALLER = {
    "node/a": "node/a",
    "node/b": "node/b",
    "manager": "manager/m1",
    "operator": "operator/alice",
}
"""The identity a denial message must name for each allowed-to-connect column."""


def expected(service: str, identity: str) -> Expect:
    """The outcome the architecture promises for `identity` calling any RPC of `service`."""
    if service in OPEN:
        return "allowed"
    if identity in HANDSHAKE_REFUSED:
        return "refused"
    return "allowed" if identity == ALLOWED[service] else "denied"


def category(code: grpc.StatusCode) -> Expect | Literal["bug"]:
    """What a status code shows about the authorisation decision."""
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED):
        return "refused"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return "denied"
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        return "bug"  # never for a client, allowed or not
    return "allowed"


NODE = "a"
"""The node whose daemon runs, and whom every ManagerService request speaks for."""


# --- the AgentService callers: real processes on the agent socket -----------

# Calls each planned RPC with pre-serialised bytes (no Fleet import needed),
# prints one JSON line per call, then "done". A stream counts as answered at
# its first message.
PROBE = r"""
import base64, json, os, sys, time, grpc
plan = json.load(open(sys.argv[1]))
socket = sys.argv[2] if len(sys.argv) > 2 else os.environ["FLEET_DAEMON_SOCKET"]
channel = grpc.insecure_channel("unix:" + socket)
for item in plan:
    req = base64.b64decode(item["request"])
    try:
        if item["stream"]:
            call = channel.unary_stream(item["path"])(req, timeout=5)
            next(iter(call))
            call.cancel()
        else:
            channel.unary_unary(item["path"])(req, timeout=5)
        code, details = "OK", ""
    except grpc.RpcError as e:
        code, details = e.code().name, e.details()
    print(json.dumps({"label": item["label"], "rpc": item["rpc"], "code": code,
                      "details": details}), flush=True)
print(json.dumps({"label": "done"}), flush=True)
if len(sys.argv) <= 2:
    time.sleep(10000)
"""


def agent_plan(reqs: dict[str, Message], *, labels: dict[str, str]) -> list[dict[str, Any]]:
    """The probe's calls: each AgentService RPC once per label, agent_id set to its value."""
    plan = []
    for label, agent_id in labels.items():
        for method in methods("AgentService"):
            request = type(reqs[rpc_name(method)])()
            request.CopyFrom(reqs[rpc_name(method)])
            setattr(request, "agent_id", agent_id)  # noqa: B010  # every AgentService request has it
            plan.append(
                {
                    "label": label,
                    "rpc": rpc_name(method),
                    "path": f"/{method.containing_service.full_name}/{method.name}",
                    "stream": method.server_streaming,
                    "request": base64.b64encode(request.SerializeToString()).decode(),
                }
            )
    return plan


def probe_results(log: bytes) -> dict[tuple[str, str], Outcome] | None:
    """(label, rpc) -> outcome from the probe's output; None until it printed 'done'."""
    results: dict[tuple[str, str], Outcome] = {}
    for line in log.decode(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        item = json.loads(line)
        if item["label"] == "done":
            return results
        code = grpc.StatusCode[item["code"]]
        results[item["label"], item["rpc"]] = Outcome(code, item["details"])
    return None


# --- the fleet under test -----------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    """The module's live manager and node a's daemon."""

    pki: ModulePki
    manager: ManagerServer
    daemon: DaemonServer
    root: Path
    """A short directory (Unix socket paths are limited)."""


REPO = Path(__file__).resolve().parents[2]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(module_pki: ModulePki) -> AsyncIterator[Fleet]:
    """A manager (node a is assigned the matrix's artifact), and node a's daemon
    supervising 'sleeper' and the 'sdk' probe agent."""
    with short_tmp() as root:
        script = root / "probe.py"
        script.write_text(PROBE)
        plan_file = root / "plan.json"
        reqs = requests(0)
        plan_file.write_text(
            json.dumps(
                agent_plan(reqs, labels={"supervised agent": "sdk", "agent for another": "sleeper"})
            )
        )
        agents = (
            agent("sleeper", SLEEP, "1000", start_secs=0.0),
            agent("sdk", sys.executable, str(script), str(plan_file), config='{"v": 1}'),
        )
        grants = Grants({NODE: [EMPTY_DIGEST]})
        async with (
            live_manager(module_pki, root, artifact_access=grants) as manager,
            live_daemon(module_pki, root / "d", NODE, agents) as daemon,
        ):
            yield Fleet(module_pki, manager, daemon, root)


async def unsupervised_probe(fleet: Fleet, reqs: dict[str, Message]) -> dict[Any, Outcome]:
    """Run the probe as a process the daemon does not supervise, naming agent sdk."""
    plan = fleet.root / "plan-unsupervised.json"
    plan.write_text(json.dumps(agent_plan(reqs, labels={"unsupervised process": "sdk"})))
    script = fleet.root / "probe.py"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        str(plan),
        str(fleet.daemon.socket_path),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    results = probe_results(out)
    assert results is not None, out.decode(errors="replace")
    return results


async def tls_column_runs(fleet: Fleet, reqs: dict[str, Message]) -> dict[Any, Outcome]:
    """(identity, rpc) -> outcome for every TCP service and identity."""
    pki = fleet.pki
    good = {
        "node/a": pki.issue("node", "a"),
        "node/b": pki.issue("node", "b"),
        "manager": pki.issue("manager", "m1"),
        "operator": pki.issue("operator", "alice"),
    }
    assert fleet.manager.enroll_port
    targets = {
        "ManagerService": (fleet.manager.port, manager_name(pki)),
        "FleetService": (fleet.manager.port, manager_name(pki)),
        "DaemonService": (fleet.daemon.port, node_name(pki, NODE)),
        "EnrollmentService": (fleet.manager.enroll_port, manager_name(pki)),
        "ReplicaService": (fleet.manager.port, manager_name(pki)),
    }
    results: dict[Any, Outcome] = {}
    for service, (port, server_name) in targets.items():
        creds: dict[str, Any] = {**bad_credentials(pki, *CLAIMED[service]), **good}
        async with channels(port, creds, server_name) as chans:
            for method in methods(service):
                for identity in TLS_IDENTITIES:
                    results[identity, rpc_name(method)] = await invoke(
                        chans[identity], method, reqs[rpc_name(method)], deadline=15.0
                    )
    return results


async def http_column_runs(fleet: Fleet, reqs: dict[str, Message]) -> dict[Any, HttpOutcome]:
    """(identity, rpc) -> outcome for every FleetService route of the JSON/HTTP API."""
    pki = fleet.pki
    good = {
        "node/a": pki.issue("node", "a"),
        "node/b": pki.issue("node", "b"),
        "manager": pki.issue("manager", "m1"),
        "operator": pki.issue("operator", "alice"),
    }
    assert fleet.manager.http_port
    role, name = CLAIMED["FleetService"]
    clients = http_clients(pki, fleet.manager.http_port, role, name, good, pki.root)
    results: dict[Any, HttpOutcome] = {}
    try:
        for method in methods("FleetService"):
            for identity in TLS_IDENTITIES:
                results[identity, rpc_name(method)] = await http_invoke(
                    clients[identity], method, reqs[rpc_name(method)]
                )
    finally:
        for client in clients.values():
            await client.aclose()
    return results


def render_http(rows: list[MethodDescriptor], results: dict[Any, HttpOutcome]) -> str:
    """The HTTP rows as a markdown table: cells are the HTTP status and the error's code."""
    head = ["HTTP route (POST /v1/...)", *TLS_IDENTITIES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in rows:
        cells = [f"{method.containing_service.full_name}/{method.name}"]
        for identity in TLS_IDENTITIES:
            outcome = results[identity, rpc_name(method)]
            want = expected("FleetService", identity)
            cells.append(outcome.cell + ("" if outcome.category == want else f" != {want}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(
    rows: list[MethodDescriptor],
    identities: tuple[str, ...],
    results: dict[Any, Outcome],
) -> str:
    """A markdown table: one row per RPC, one column per identity; cells are status codes.

    A cell that differs from `expected()` is marked with "!=".
    """
    head = ["RPC", *identities]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in rows:
        cells = [rpc_name(method)]
        for identity in identities:
            outcome = results[identity, rpc_name(method)]
            mark = (
                ""
                if _ok(method, identity, outcome)
                else " != " + expected(method.containing_service.name, identity)
            )
            cells.append(outcome.code.name + mark)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ok(method: MethodDescriptor, identity: str, outcome: Outcome) -> bool:
    return category(outcome.code) == expected(method.containing_service.name, identity)


def test_every_rpc_has_a_matrix_row() -> None:
    """The matrix covers exactly the RPCs the generated descriptors declare."""
    declared = {rpc_name(m) for service in SERVICES for m in methods(service)}
    assert set(requests(0)) == declared
    assert set(ALLOWED) == set(SERVICES)


@pytest.mark.asyncio(loop_scope="module")
async def test_security_matrix(fleet: Fleet, request: pytest.FixtureRequest) -> None:
    """Every identity gets exactly the outcome the architecture promises, for every RPC."""
    reqs = requests(fleet.daemon.port)
    # Node a must be known (with its daemon's real address) for FleetService's calls,
    # and the artifact it downloads stored.
    async with channels(
        fleet.manager.port,
        {"a": fleet.pki.issue("node", NODE), "operator": fleet.pki.issue("operator", "setup")},
        manager_name(fleet.pki),
    ) as chans:
        register = SERVICES["ManagerService"].methods_by_name["RegisterNode"]
        setup = await invoke(chans["a"], register, reqs["ManagerService.RegisterNode"])
        assert setup.code == grpc.StatusCode.OK, setup
        push = SERVICES["FleetService"].methods_by_name["PushArtifact"]
        setup = await invoke(chans["operator"], push, artifact_upload())
        assert setup.code == grpc.StatusCode.OK, setup
        # Enroll: a token for its node name, with a use for every column.
        operator = fleet_pb2_grpc.FleetServiceStub(chans["operator"])
        token = await operator.CreateJoinToken(reqs["FleetService.CreateJoinToken"], timeout=10)
        reqs["EnrollmentService.Enroll"].token = token.token  # type: ignore[attr-defined]

    results = await tls_column_runs(fleet, reqs)

    async def supervised() -> dict[Any, Outcome] | None:
        return probe_results(fleet.daemon.supervisor.read_log("sdk", 0, 1 << 20).data)

    agent_results = await eventually(supervised, lambda r: r is not None, within=60)
    assert agent_results is not None
    agent_results.update(await unsupervised_probe(fleet, reqs))
    http_results = await http_column_runs(fleet, reqs)

    tcp_services = (
        "ManagerService",
        "FleetService",
        "DaemonService",
        "EnrollmentService",
        "ReplicaService",
    )
    tcp_rows = [m for s in tcp_services for m in methods(s)]
    tables = [
        render(tcp_rows, TLS_IDENTITIES, results),
        render(methods("AgentService"), AGENT_IDENTITIES, agent_results),
        render_http(methods("FleetService"), http_results),
    ]
    print("\n\n".join(tables))
    request.config.stash.setdefault(MATRIX_REPORT, []).extend(tables)
    if out := os.environ.get("FLEET_SECURITY_MATRIX_OUT"):
        await asyncio.to_thread(Path(out).write_text, "\n\n".join(tables) + "\n")

    wrong = [
        f"{identity} -> {rpc_name(m)}: {o.code.name} {o.details!r}, "
        f"expected {expected(m.containing_service.name, identity)}"
        for rows, idents, res in (
            (tcp_rows, TLS_IDENTITIES, results),
            (methods("AgentService"), AGENT_IDENTITIES, agent_results),
        )
        for m in rows
        for identity in idents
        if not _ok(m, identity, o := res[identity, rpc_name(m)])
    ]
    wrong += [
        f"HTTP {identity} -> {rpc_name(m)}: {o.cell} {o.message!r}, "
        f"expected {expected('FleetService', identity)}"
        for m in methods("FleetService")
        for identity in TLS_IDENTITIES
        if (o := http_results[identity, rpc_name(m)]).category != expected("FleetService", identity)
    ]
    wrong += [
        f"HTTP {identity} -> {rpc_name(m)}: {o.message!r} does not name {CALLER[identity]}"
        for m in methods("FleetService")
        for identity in CALLER
        if (o := http_results[identity, rpc_name(m)]).status == 403
        and CALLER[identity] not in o.message
    ]
    # A denial names the caller, so an operator can tell which certificate was wrong.
    wrong += [
        f"{identity} -> {rpc_name(m)}: {o.details!r} does not name {CALLER[identity]}"
        for m in tcp_rows
        for identity in CALLER
        if (o := results[identity, rpc_name(m)]).code == grpc.StatusCode.PERMISSION_DENIED
        and CALLER[identity] not in o.details
    ]
    assert not wrong, "\n".join(wrong)

    # docs/security.md shows the matrix as run; it must not drift from it.
    doc = await asyncio.to_thread((REPO / "docs" / "security.md").read_text)
    assert all(table in doc for table in tables), (
        "docs/security.md does not hold the matrix as run: regenerate it with "
        "FLEET_SECURITY_MATRIX_OUT=/tmp/matrix.md and paste the tables"
    )


@pytest.mark.asyncio(loop_scope="module")
async def test_the_enrollment_port_serves_enroll_and_nothing_else(fleet: Fleet) -> None:
    """On the enrollment port every other RPC, gRPC health and reflection are UNIMPLEMENTED,
    with or without a certificate; the mTLS port does not serve Enroll."""
    pki = fleet.pki
    reqs = requests(fleet.daemon.port)
    creds: dict[str, Any] = {
        "none": grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem),
        "node/a": pki.issue("node", NODE),
        "operator": pki.issue("operator", "alice"),
    }
    others = [m for service in SERVICES if service not in OPEN for m in methods(service)]
    wrong = []
    assert fleet.manager.enroll_port
    async with channels(fleet.manager.enroll_port, creds, manager_name(pki)) as chans:
        for label, channel in chans.items():
            for method in others:
                got = await invoke(channel, method, reqs[rpc_name(method)], deadline=10.0)
                if got.code != grpc.StatusCode.UNIMPLEMENTED:
                    wrong.append(f"{label} -> {rpc_name(method)}: {got.code.name}")
            for path, request in (
                ("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest()),
                *(
                    (
                        f"/grpc.reflection.{v}.ServerReflection/ServerReflectionInfo",
                        reflection_pb2.ServerReflectionRequest(list_services=""),
                    )
                    for v in ("v1", "v1alpha")
                ),
            ):
                code = await _raw_code(channel, path, request)
                if code != grpc.StatusCode.UNIMPLEMENTED:
                    wrong.append(f"{label} -> {path}: {code.name}")
    assert not wrong, "\n".join(wrong)
    enroll = methods("EnrollmentService")[0]
    async with channels(fleet.manager.port, creds, manager_name(pki)) as chans:
        got = await invoke(chans["none"], enroll, reqs["EnrollmentService.Enroll"])
        assert got.code == grpc.StatusCode.UNAVAILABLE, got  # no certificate, no handshake
        got = await invoke(chans["operator"], enroll, reqs["EnrollmentService.Enroll"])
        assert got.code == grpc.StatusCode.UNIMPLEMENTED, got


async def _raw_code(channel: Any, path: str, request: Message) -> grpc.StatusCode:
    """The status of one call to `path` (unary, or a stream of one message for reflection)."""
    serialize = request.SerializeToString
    try:
        if "Reflection" in path:
            call = channel.stream_stream(path)(iter([serialize()]), timeout=10)
            async for _ in call:
                pass
        else:
            await channel.unary_unary(path)(serialize(), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK
