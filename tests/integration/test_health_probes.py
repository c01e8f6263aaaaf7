"""HTTP, TCP and command health probes run by the supervisor against real agent processes.

Real time (the probes do real I/O), short intervals. The agent program is a
tiny HTTP server whose behaviour a file in its directory steers: "ok" answers
200, "500" answers 500, "hang" accepts and never answers, "closed" closes the
listening socket (connections are refused) while the process keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from supervisor_helpers import (
    Recorder,
    agent,
    alive,
    make_supervisor,
    marker,
    processes_with,
    script,
)

from daemon.supervisor.probes import run_probe
from daemon.supervisor.spec import AgentSpec, HealthSpec
from daemon.supervisor.states import AgentStatus
from daemon.supervisor.supervisor import Supervisor

S = AgentStatus

SERVER = """
import http.server, pathlib, socket, sys, threading, time

port, mode_file = int(sys.argv[1]), pathlib.Path(sys.argv[2])

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        mode = mode_file.read_text().strip()
        if mode == "hang":
            time.sleep(30)
        self.send_response(500 if mode == "500" else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
server.daemon_threads = True
threading.Thread(target=server.serve_forever, daemon=True).start()
while mode_file.read_text().strip() != "closed":
    time.sleep(0.05)
server.shutdown()
server.server_close()
time.sleep(600)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def rec() -> Recorder:
    """Records every snapshot the supervisor reports."""
    return Recorder()


@pytest.fixture
async def sup(tmp_path: Path, rec: Recorder) -> AsyncIterator[Supervisor]:
    """A supervisor on the real clock that stops its agents at the end."""
    supervisor = make_supervisor(tmp_path, rec)
    yield supervisor
    await supervisor.stop(stop_agents=True)


class Server:
    """The steerable HTTP agent: its port, and its mode file."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = _free_port()
        self.mode_file = tmp_path / "mode"
        self.mode_file.write_text("ok")
        self.program = script(tmp_path, "server", SERVER)

    def set(self, mode: str) -> None:
        """Switch the server's behaviour."""
        self.mode_file.write_text(mode)

    def spec(self, health: HealthSpec, **kw: object) -> AgentSpec:
        """The agent, with `health` as its check."""
        return agent(
            "web", str(self.program), str(self.port), str(self.mode_file), health=health, **kw
        )


def _http(server: Server, **kw: object) -> HealthSpec:
    fields: dict[str, object] = {"interval": 0.1, "timeout": 3.0}
    fields.update(kw)
    return HealthSpec(kind="http", url=f"http://127.0.0.1:{server.port}/healthz", **fields)  # type: ignore[arg-type]


async def test_http_check_turns_unhealthy_on_500_and_healthy_again(
    sup: Supervisor, rec: Recorder, tmp_path: Path
) -> None:
    """200 is healthy; 500 turns it unhealthy with the status as the reason; it is left running."""
    server = Server(tmp_path)
    await sup.start([server.spec(_http(server))])
    await rec.until(lambda: sup.get("web").health == "healthy")
    healthy = sup.get("web")
    assert healthy.status is S.RUNNING
    assert healthy.health_message == ""
    assert healthy.health_since_ms > 0
    pid = healthy.pid
    server.set("500")
    await rec.until(lambda: sup.get("web").health == "unhealthy")
    sick = sup.get("web")
    url = f"http://127.0.0.1:{server.port}/healthz"
    assert sick.health_message == (
        f"GET {url}: status 500 Internal Server Error (expected 200..399)"
    )
    assert sick.health_since_ms >= healthy.health_since_ms
    assert sick.message.startswith(f"unhealthy: GET {url}: status 500")
    assert sick.message.endswith("left running (restart_when_unhealthy = false)")
    assert sick.pid == pid
    server.set("ok")
    await rec.until(lambda: sup.get("web").health == "healthy")
    assert sup.get("web").pid == pid
    assert sup.get("web").restart_count == 0
    assert sup.get("web").health_message == ""


async def test_http_check_fails_when_the_server_stops_answering(
    sup: Supervisor, rec: Recorder, tmp_path: Path
) -> None:
    """A server that accepts but never answers fails on the timeout; a closed port on refusal."""
    server = Server(tmp_path)
    await sup.start([server.spec(_http(server, timeout=0.3))])
    await rec.until(lambda: sup.get("web").health == "healthy")
    server.set("hang")
    await rec.until(lambda: sup.get("web").health == "unhealthy")
    assert sup.get("web").health_message.endswith(": no answer within 0.3s")
    server.set("closed")
    await rec.until(lambda: "refused" in sup.get("web").health_message)
    assert sup.get("web").health == "unhealthy"
    assert sup.get("web").status is S.RUNNING


async def test_tcp_check_follows_the_listening_socket(
    sup: Supervisor, rec: Recorder, tmp_path: Path
) -> None:
    """TCP: healthy while the port accepts; unhealthy ("connection refused") once it is closed."""
    server = Server(tmp_path)
    check = HealthSpec(kind="tcp", address=f"127.0.0.1:{server.port}", interval=0.1, timeout=1)
    await sup.start([server.spec(check)])
    await rec.until(lambda: sup.get("web").health == "healthy")
    server.set("closed")
    await rec.until(lambda: sup.get("web").health == "unhealthy")
    # A connection already queued when the socket closed is reset rather than refused.
    assert sup.get("web").health_message in (
        f"connect 127.0.0.1:{server.port}: connection refused",
        f"connect 127.0.0.1:{server.port}: connection reset by peer",
    )


async def test_failure_threshold_and_initial_delay(
    sup: Supervisor, rec: Recorder, tmp_path: Path
) -> None:
    """Failures below the threshold: pending, with the reason; no probe before initial_delay."""
    server = Server(tmp_path)
    server.set("500")
    check = _http(server, failure_threshold=1000, initial_delay=1.5)
    await sup.start([server.spec(check)])
    await rec.until(lambda: sup.get("web").status is S.RUNNING)
    assert sup.get("web").health == "pending"
    assert sup.get("web").health_message == "", "no probe before initial_delay"
    await rec.until(lambda: "status 500" in sup.get("web").health_message)
    assert sup.get("web").health == "pending"


async def test_command_check_runs_as_the_agent_and_reports_its_output(
    sup: Supervisor, rec: Recorder, tmp_path: Path
) -> None:
    """The command runs in the agent's cwd with its env; its exit code and output are the reason."""
    flag = tmp_path / "ready"
    probe = (
        "import os, sys; ok = os.path.exists('ready');"
        " print('not ready:', os.environ['APP_MODE'], os.environ['FLEET_AGENT_ID']);"
        " sys.exit(0 if ok else 3)"
    )
    check = HealthSpec(
        kind="command", command=(sys.executable, "-c", probe), interval=0.1, timeout=5
    )
    spec = agent(
        "cmd",
        "-c",
        "import time; time.sleep(600)",
        cwd=str(tmp_path),
        env={"APP_MODE": "blue"},
        health=check,
    )
    await sup.start([spec])
    await rec.until(lambda: sup.get("cmd").health == "unhealthy")
    assert sup.get("cmd").health_message == (
        f"command {sys.executable!r}: exit code 3: not ready: blue cmd"
    )
    flag.write_text("")
    await rec.until(lambda: sup.get("cmd").health == "healthy")


async def test_a_command_over_its_timeout_is_killed_with_its_children(
    sup: Supervisor, rec: Recorder
) -> None:
    """A hanging command fails on the timeout and its whole process group is killed."""
    mark = marker()
    probe = (
        "import subprocess, sys, time; print('checking', flush=True);"
        f" subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '{mark}']);"
        " time.sleep(60)"
    )
    check = HealthSpec(
        kind="command", command=(sys.executable, "-c", probe, mark), interval=30, timeout=3
    )
    await sup.start([agent("cmd", "-c", "import time; time.sleep(600)", health=check)])
    await rec.until(lambda: sup.get("cmd").health == "unhealthy")
    assert sup.get("cmd").health_message == (
        f"command {sys.executable!r}: no exit within 3s; killed: checking"
    )
    await rec.until(lambda: not processes_with(mark), within=5)


async def test_restart_when_unhealthy_restarts_through_the_health_check_path(
    sup: Supervisor, rec: Recorder, tmp_path: Path
) -> None:
    """restart_when_unhealthy: an unhealthy agent is killed and started again, with the reason."""
    server = Server(tmp_path)
    check = _http(server, failure_threshold=2, restart_when_unhealthy=True)
    await sup.start([server.spec(check, restart="on-failure")])
    await rec.until(lambda: sup.get("web").health == "healthy")
    pid = sup.get("web").pid
    server.set("500")
    await rec.until(lambda: sup.get("web").pid not in (0, pid) and sup.get("web").restart_count)
    server.set("ok")
    assert not alive(pid)
    how = sup.get("web").last_exit
    assert how is not None
    url = f"http://127.0.0.1:{server.port}/healthz"
    assert how.kind == "unhealthy"
    assert how.reason == (
        f"killed by the health check: GET {url}: status 500 Internal Server Error"
        " (expected 200..399) (2 times in a row)"
    )
    unhealthy = [s for s in rec.changes if s.id == "web" and s.health == "unhealthy"]
    assert unhealthy[0].message.endswith("; restarting")
    await rec.until(lambda: sup.get("web").health == "healthy")


async def test_restart_never_wins_over_restart_when_unhealthy(
    sup: Supervisor, rec: Recorder, tmp_path: Path
) -> None:
    """restart = "never": an unhealthy agent is only reported, never restarted."""
    server = Server(tmp_path)
    server.set("500")
    check = _http(server, restart_when_unhealthy=True)
    await sup.start([server.spec(check, restart="never")])
    await rec.until(lambda: sup.get("web").health == "unhealthy")
    pid = sup.get("web").pid
    assert sup.get("web").message.endswith("left running (restart = never)")
    await asyncio.sleep(0.5)  # five more failed probes
    assert sup.get("web").pid == pid
    assert sup.get("web").restart_count == 0


async def test_a_check_changes_in_place_without_a_restart(
    sup: Supervisor, rec: Recorder, tmp_path: Path
) -> None:
    """Adding, changing and removing the check of a running agent applies it without a restart."""
    server = Server(tmp_path)
    await sup.start([server.spec(HealthSpec())])
    await rec.until(lambda: sup.get("web").status is S.RUNNING)
    pid = sup.get("web").pid
    assert sup.get("web").health == "none"
    closed = HealthSpec(kind="tcp", address=f"127.0.0.1:{_free_port()}", interval=0.1, timeout=1)
    await sup.reload([server.spec(closed)])
    await rec.until(lambda: sup.get("web").health == "unhealthy")
    assert "connection refused" in sup.get("web").health_message
    await sup.reload([server.spec(_http(server))])
    await rec.until(lambda: sup.get("web").health == "healthy")
    await sup.reload([server.spec(HealthSpec())])
    await rec.until(lambda: sup.get("web").health == "none")
    assert sup.get("web").health_message == ""
    assert sup.get("web").pid == pid
    assert sup.get("web").restart_count == 0


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A CA-less self-signed certificate for 127.0.0.1 (cert file, key file)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "probe-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_https_verifies_the_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An untrusted certificate fails the probe; trusting its CA via SSL_CERT_FILE passes it."""
    import ssl

    from daemon.supervisor.probes import run_probe

    cert_file, key_file = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    check = HealthSpec(kind="http", url=f"https://127.0.0.1:{port}/healthz", timeout=5)
    owner = agent("web", "-c", "pass")
    try:
        untrusted = await run_probe(check, owner)
        assert not untrusted.ok
        assert untrusted.detail.startswith(
            f"GET https://127.0.0.1:{port}/healthz: certificate verification failed"
        ), untrusted.detail
        monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
        trusted = await run_probe(check, owner)
        assert trusted.ok, trusted.detail
        assert trusted.detail == f"GET https://127.0.0.1:{port}/healthz: status 204 No Content"
    finally:
        server.close()
        await server.wait_closed()


async def test_restarts_by_the_health_check_back_off_until_healthy(
    sup: Supervisor, rec: Recorder, tmp_path: Path
) -> None:
    """An agent that never gets healthy is restarted at once, then after the backoff delays."""
    from daemon.supervisor.spec import BackoffSpec

    server = Server(tmp_path)
    server.set("500")
    check = _http(server, restart_when_unhealthy=True)
    backoff = BackoffSpec(initial=1.5, multiplier=2.0, max=10.0, jitter=0.0)
    await sup.start([server.spec(check, restart="always", backoff=backoff)])
    await rec.until(lambda: sup.get("web").restart_count == 1)
    await rec.until(lambda: sup.get("web").health == "unhealthy")
    assert sup.get("web").message.endswith("; restarting in 1.5s (backoff)")
    first = sup.get("web").start_time_ms
    await rec.until(lambda: sup.get("web").restart_count == 2)
    assert sup.get("web").start_time_ms - first >= 1500
    server.set("ok")
    await rec.until(lambda: sup.get("web").health == "healthy")
    mark = len(rec.changes)
    server.set("500")
    await rec.until(lambda: sup.get("web").restart_count == 3)
    sick = [s for s in rec.changes[mark:] if s.health == "unhealthy" and s.restart_count == 2]
    assert sick, "reported unhealthy before the restart"
    assert sick[0].message.endswith("; restarting"), "healthy in between: at once again"


async def test_a_cancelled_probe_is_cancelled_even_as_it_ends() -> None:
    """Cancelling a probe task always raises CancelledError, also when the probe ends in the
    same turn: a swallowed cancel kept the probe loop running after its watcher was cancelled,
    so a restart by the health check, and the daemon's shutdown, waited for it forever."""
    server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    check = HealthSpec(kind="tcp", address=f"127.0.0.1:{port}", timeout=2.0)
    spec = AgentSpec(id="a", argv=("true",))
    swallowed = tried = 0
    try:
        for turns in range(60):  # cancel after 0..59 loop turns: the probe ends in one of them
            for _ in range(5):
                task = asyncio.create_task(run_probe(check, spec))
                for _ in range(turns):
                    await asyncio.sleep(0)
                if task.done():
                    continue
                tried += 1
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    continue
                swallowed += 1
    finally:
        server.close()
        await server.wait_closed()
    assert tried > 0
    assert swallowed == 0, f"{swallowed} of {tried} cancelled probes returned a result"
