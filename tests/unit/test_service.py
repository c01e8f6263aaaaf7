"""fleet.service / fleet.systemd / fleet.observability: the shared process lifecycle."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import grpc
import prometheus_client
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fleet.errors import ConfigError
from fleet.interceptors import ErrorMappingInterceptor
from fleet.observability import setup_logging, start_metrics_http_server
from fleet.service import (
    add_health_and_reflection,
    open_files_target,
    raise_open_files_limit,
    run_until_signalled,
)
from fleet.systemd import SystemdNotifier
from fleet.v1 import daemon_pb2_grpc

# --- run_until_signalled ------------------------------------------------------


@pytest.fixture
def own_sigterm_handler() -> Iterator[list[int]]:
    """A Python SIGTERM handler installed before the test; records what it catches."""
    caught: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)

    before = signal.signal(signal.SIGTERM, handler)
    yield caught
    assert signal.getsignal(signal.SIGTERM) is handler, "the test's handler was not restored"
    signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_stops_the_service_and_restores_handlers(
    own_sigterm_handler: list[int], sig: signal.Signals
) -> None:
    """A real signal to our own process runs stop(grace); old handlers are back afterwards."""
    sigint_before = signal.getsignal(signal.SIGINT)
    events: list[str] = []

    async def start() -> None:
        events.append("start")
        os.kill(os.getpid(), sig)

    async def stop(grace: float) -> None:
        events.append(f"stop {grace}")

    await asyncio.wait_for(run_until_signalled(start, stop, grace=2.5), timeout=10)

    assert events == ["start", "stop 2.5"]
    assert own_sigterm_handler == [], "the old handler ran while the service owned the signal"
    assert signal.getsignal(signal.SIGINT) is sigint_before
    os.kill(os.getpid(), signal.SIGTERM)  # the restored handler really receives signals again
    assert own_sigterm_handler == [signal.SIGTERM]


async def test_plain_callables_and_stop_event(own_sigterm_handler: list[int]) -> None:
    """Sync start/stop work too, and setting stop_event stops like a signal."""
    events: list[str] = []
    stop_event = asyncio.Event()

    def start() -> None:
        events.append("start")
        asyncio.get_running_loop().call_soon(stop_event.set)

    def stop(grace: float) -> None:
        events.append(f"stop {grace}")

    await asyncio.wait_for(
        run_until_signalled(start, stop, grace=0, stop_event=stop_event), timeout=10
    )
    assert events == ["start", "stop 0"]


async def test_failing_start_restores_handlers_and_skips_stop(
    own_sigterm_handler: list[int],
) -> None:
    """If start() raises, the error surfaces, stop() is not called, handlers are restored."""
    stopped: list[float] = []

    async def start() -> None:
        raise RuntimeError("port in use")

    async def stop(grace: float) -> None:
        stopped.append(grace)

    with pytest.raises(RuntimeError, match="port in use"):
        await run_until_signalled(start, stop, grace=1)
    assert stopped == []


# --- SystemdNotifier ----------------------------------------------------------


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""
    # Short directory: AF_UNIX paths are limited to ~107 bytes.
    with tempfile.TemporaryDirectory(prefix="fleet-") as directory:
        path = str(Path(directory) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(5)
            yield sock, path


def test_ready_status_stopping_reach_the_socket(notify_socket: tuple[socket.socket, str]) -> None:
    """Each notification arrives as one sd_notify datagram."""
    sock, path = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    notifier.ready()
    notifier.status("serving 3 nodes\nall fine")
    notifier.watchdog_ping()
    notifier.stopping()
    received = [sock.recv(4096) for _ in range(4)]
    assert received == [
        b"READY=1",
        b"STATUS=serving 3 nodes all fine",
        b"WATCHDOG=1",
        b"STOPPING=1",
    ]


def test_abstract_namespace_socket() -> None:
    """NOTIFY_SOCKET=@name addresses Linux's abstract namespace."""
    name = f"fleet-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(4096) == b"READY=1"


def test_without_notify_socket_everything_is_a_no_op() -> None:
    """Outside systemd the notifier does nothing and reports no watchdog."""
    notifier = SystemdNotifier({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready()
    notifier.status("x")
    notifier.watchdog_ping()
    notifier.stopping()


def test_unreachable_socket_logs_instead_of_raising(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A vanished systemd socket must not crash the service; it is logged."""
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level(logging.WARNING, logger="fleet.systemd"):
        notifier.ready()
    assert "READY=1" in caplog.text
    assert "failed" in caplog.text


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "3000000"}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    env: dict[str, str], interval: float | None
) -> None:
    """Ping at half WATCHDOG_USEC, only if the watchdog is meant for this process."""
    notifier = SystemdNotifier({"NOTIFY_SOCKET": "/run/systemd/notify", **env})
    assert notifier.watchdog_interval == interval


async def test_watchdog_loop_pings_repeatedly(notify_socket: tuple[socket.socket, str]) -> None:
    """watchdog_loop sends WATCHDOG=1 again and again until cancelled."""
    sock, path = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
    assert notifier.watchdog_interval == 0.01
    task = asyncio.create_task(notifier.watchdog_loop())
    try:
        pings = [await asyncio.to_thread(sock.recv, 4096) for _ in range(3)]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert pings == [b"WATCHDOG=1"] * 3


async def test_watchdog_loop_returns_without_a_watchdog() -> None:
    """With no WATCHDOG_USEC the loop ends at once instead of spinning."""
    await asyncio.wait_for(SystemdNotifier({}).watchdog_loop(), timeout=5)


# --- metrics HTTP server ------------------------------------------------------


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode()


def test_metrics_served_on_an_ephemeral_port_and_stop_closes_it() -> None:
    """GET /metrics returns the registry; after stop() the port refuses connections."""
    registry = prometheus_client.CollectorRegistry()
    counter = prometheus_client.Counter("fleet_test_requests", "Requests.", registry=registry)
    counter.inc(3)
    stop, port = start_metrics_http_server("127.0.0.1:0", registry)
    try:
        assert port > 0
        status, body = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert "fleet_test_requests_total 3.0" in body
    finally:
        stop()
    stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        get(f"http://127.0.0.1:{port}/metrics")


@pytest.mark.parametrize("addr", ["9100", "localhost:http", "127.0.0.1:70000"])
def test_metrics_bad_address_is_a_config_error(addr: str) -> None:
    """A malformed listen address is named in a one-line ConfigError."""
    with pytest.raises(ConfigError, match="expected host:port"):
        start_metrics_http_server(addr, prometheus_client.CollectorRegistry())


def test_metrics_port_in_use_is_a_config_error() -> None:
    """A port already taken is reported, not a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}.*cannot listen"):
            start_metrics_http_server(f"127.0.0.1:{port}", prometheus_client.CollectorRegistry())


# --- logging ------------------------------------------------------------------


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    """Put the root logger's handlers and level back after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.mark.usefixtures("restore_root_logger")
def test_plain_logging_is_one_line_with_extras() -> None:
    """Plain lines carry time, level, logger, message and extra fields; tracebacks stay on it."""
    out = io.StringIO()
    setup_logging("info", json=False, stream=out)
    log = logging.getLogger("fleet.test")
    log.debug("hidden")
    log.info("node %s joined", "n1", extra={"node_id": "n1", "agents": 2, "note": "two words"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed\nbadly")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(
        ' INFO fleet.test: node n1 joined node_id=n1 agents=2 note="two words"'
    )
    assert lines[0][:4].isdigit()
    assert " ERROR fleet.test: failed\\nbadly exc_info=" in lines[1]
    assert "ValueError: boom" in lines[1]


@pytest.mark.usefixtures("restore_root_logger")
def test_json_logging_is_one_object_per_line() -> None:
    """JSON mode writes parseable objects with the standard keys and the extras."""
    out = io.StringIO()
    setup_logging("DEBUG", json=True, stream=out)
    logging.getLogger("fleet.test").debug("hello", extra={"node_id": "n1", "path": Path("/x")})
    logging.getLogger("other").warning("multi\nline")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["level"] == "DEBUG"
    assert first["logger"] == "fleet.test"
    assert first["message"] == "hello"
    assert first["node_id"] == "n1"
    assert first["path"] == "/x"
    assert first["ts"].endswith("Z")
    assert second["message"] == "multi\nline"


@pytest.mark.usefixtures("restore_root_logger")
def test_setup_logging_twice_replaces_its_handler() -> None:
    """Reconfiguring does not duplicate every line."""
    first, second = io.StringIO(), io.StringIO()
    setup_logging("info", json=False, stream=first)
    setup_logging("info", json=True, stream=second)
    logging.getLogger("fleet.test").info("once")
    assert first.getvalue() == ""
    assert len(second.getvalue().splitlines()) == 1


def test_unknown_log_level_is_rejected() -> None:
    """A typo in the level names the allowed ones."""
    with pytest.raises(ValueError, match="unknown log level 'verbose'; use one of debug, info"):
        setup_logging("verbose", json=False)


# --- health and reflection ----------------------------------------------------


async def test_health_and_reflection_over_a_real_server() -> None:
    """Health answers SERVING for the given services; reflection lists and describes them."""
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    # The generated base answers UNIMPLEMENTED; only the service's name matters here.
    unimplemented = daemon_pb2_grpc.DaemonServiceServicer()  # type: ignore[abstract]
    daemon_pb2_grpc.add_DaemonServiceServicer_to_server(unimplemented, server)
    add_health_and_reflection(server, ["fleet.v1.DaemonService"])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("fleet.v1.DaemonService", ""):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health.Check(health_pb2.HealthCheckRequest(service="nope.X"), timeout=5)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            requests = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="fleet.v1.DaemonService"
                ),
            ]
            replies = [r async for r in reflect.ServerReflectionInfo(iter(requests), timeout=5)]
    finally:
        await server.stop(None)
    listed = {s.name for s in replies[0].list_services_response.service}
    assert {"fleet.v1.DaemonService", "grpc.health.v1.Health"} <= listed
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in replies[1].file_descriptor_response.file_descriptor_proto
    ]
    services = {s.name for f in files if f.package == "fleet.v1" for s in f.service}
    assert "DaemonService" in services


# --- the open files limit (a descriptor per daemon connection) ---


def test_open_files_target_is_the_hard_limit() -> None:
    assert open_files_target(1024, 20000) == 20000
    assert open_files_target(20000, 20000) == 20000
    assert open_files_target(1024, resource.RLIM_INFINITY) == 1 << 20
    assert open_files_target(resource.RLIM_INFINITY, resource.RLIM_INFINITY) == (
        resource.RLIM_INFINITY
    )


def test_raise_open_files_limit_in_a_process_started_low() -> None:
    """A child started with soft 256 ends with soft == its hard limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    code = (
        "import resource; from fleet.service import raise_open_files_limit;"
        "print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    # prlimit (util-linux) starts it low; a preexec_fn would run Python between fork and
    # exec in a pytest worker whose gRPC threads make that unsafe (it aborted once).
    out = subprocess.run(
        ["prlimit", f"--nofile=256:{limit}", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout.split()
    assert [int(v) for v in out] == [open_files_target(256, hard)] * 2
    assert raise_open_files_limit() >= 256
