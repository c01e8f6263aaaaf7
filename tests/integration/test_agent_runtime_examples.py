"""The example agents doing real work: probing 127.0.0.1 listeners, checksumming files."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent_runtime import Agent, AgentOptions
from agent_runtime.examples import probe, worker
from agent_runtime.testing import FakeDaemon

FAST = AgentOptions(metrics_flush_interval=0.1)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 200 if self.path.startswith("/ok") else 500
        body = b"fine" if status == 200 else b"broken"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[int]:
    """A real HTTP server on 127.0.0.1: /ok answers 200, anything else 500."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
async def tcp_port() -> AsyncIterator[int]:
    """A TCP listener on 127.0.0.1 that accepts and closes."""

    async def handle(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_probe_measures_a_real_tcp_listener(tcp_port: int) -> None:
    """tcp:// to a listening port is up with a latency; a closed port is down."""
    up = await probe.check(probe.Target("db", f"tcp://127.0.0.1:{tcp_port}"), 2.0)
    assert up.up
    assert 0 < up.latency_ms < 2000
    assert up.detail == "connected"
    down = await probe.check(probe.Target("gone", f"tcp://127.0.0.1:{_closed_port()}"), 2.0)
    assert not down.up


async def test_probe_reads_the_http_status(http_server: int) -> None:
    """HTTP 200 is up, HTTP 500 is down; both report the status they got."""
    ok = await probe.check(probe.Target("web", f"http://127.0.0.1:{http_server}/ok"), 2.0)
    assert ok.up
    assert ok.detail == "HTTP 200"
    bad = await probe.check(probe.Target("web", f"http://127.0.0.1:{http_server}/x?y=1"), 2.0)
    assert not bad.up
    assert bad.detail == "HTTP 500"


async def test_probe_times_out_on_a_silent_server() -> None:
    """A server that accepts but never answers is down after timeout_seconds."""

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()
        w.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        result = await probe.check(probe.Target("slow", f"http://127.0.0.1:{port}/"), 0.2)
    assert not result.up
    assert "no answer within 0.2s" in result.detail


async def test_probe_agent_reports_per_target_and_follows_config(
    tcp_port: int, http_server: int
) -> None:
    """The probe agent reports up/latency per target and switches targets on a config push."""
    first = {
        "targets": [
            {"name": "db", "url": f"tcp://127.0.0.1:{tcp_port}"},
            {"name": "web", "url": f"http://127.0.0.1:{http_server}/fail"},
        ],
        "interval_seconds": 0.1,
    }
    async with (
        FakeDaemon(config=first) as daemon,
        Agent("probe", environ=daemon.env, options=FAST) as agent,
    ):
        task = asyncio.create_task(probe.main(agent))
        await daemon.wait_for(lambda d: {m.type for m in d.metrics} >= {"probe.db", "probe.web"})
        by_type = {m.type: m.values for m in daemon.metrics}
        assert by_type["probe.db"]["up"] == 1.0
        assert by_type["probe.db"]["latency_ms"] > 0
        assert by_type["probe.web"] == {"up": 0.0}
        daemon.set_config(
            {"targets": [{"name": "api", "url": f"http://127.0.0.1:{http_server}/ok"}]}
        )
        await daemon.wait_for(lambda d: any(m.type == "probe.api" for m in d.metrics))
        api = next(m for m in daemon.metrics if m.type == "probe.api")
        assert api.values["up"] == 1.0
        agent.request_stop()
        await asyncio.wait_for(task, 2)


async def test_probe_ignores_a_bad_config_and_keeps_probing(
    tcp_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A config the probe cannot use is logged and the previous targets stay in force."""
    good = {
        "targets": [{"name": "db", "url": f"tcp://127.0.0.1:{tcp_port}"}],
        "interval_seconds": 0.1,
    }
    async with (
        FakeDaemon(config=good) as daemon,
        Agent("probe", environ=daemon.env, options=FAST) as agent,
    ):
        task = asyncio.create_task(probe.main(agent))
        await daemon.wait_metrics(1)
        version = daemon.set_config({"targets": [{"name": "x", "url": "gopher://h"}]})
        await daemon.wait_for(lambda d: agent.config.version == version)
        count = len(daemon.metrics)
        await daemon.wait_metrics(count + 2)
        assert {m.type for m in daemon.metrics[count:]} == {"probe.db"}
        agent.request_stop()
        await asyncio.wait_for(task, 2)
    assert any(f"config version {version} ignored" in r.getMessage() for r in caplog.records)


async def test_worker_checksums_inbox_files_and_follows_batch_size(tmp_path: Path) -> None:
    """Files in the inbox are checksummed into the manifest and moved; batch size is live."""
    inbox, outbox = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    for i in range(5):
        (inbox / f"f{i}.bin").write_bytes(bytes([i]) * (1000 + i))
    (inbox / ".partial").write_bytes(b"still uploading")
    config = {"inbox": str(inbox), "outbox": str(outbox), "batch_size": 2, "pace_seconds": 0.1}
    async with (
        FakeDaemon(config=config) as daemon,
        Agent("worker", environ=daemon.env, options=FAST) as agent,
    ):
        task = asyncio.create_task(worker.main(agent))
        await daemon.wait_for(lambda d: sum(m.values.get("files", 0) for m in d.metrics) >= 5)
        batches = [m.values["files"] for m in daemon.metrics if "files" in m.values]
        assert max(batches) == 2
        daemon.set_config({**config, "batch_size": 50})
        await daemon.wait_for(lambda d: agent.config.version == 2)
        await asyncio.sleep(0.2)  # let the next batch use the new size
        for i in range(10):
            (inbox / f"g{i}.bin").write_bytes(b"x" * i)
        await daemon.wait_for(lambda d: sum(m.values.get("files", 0) for m in d.metrics) >= 15)
        assert max(m.values["files"] for m in daemon.metrics if "files" in m.values) == 10
        agent.request_stop()
        await asyncio.wait_for(task, 2)
    lines = [json.loads(x) for x in (outbox / worker.MANIFEST).read_text().splitlines()]
    assert len(lines) == 15
    f3 = next(x for x in lines if x["name"] == "f3.bin")
    assert f3["sha256"] == hashlib.sha256(bytes([3]) * 1003).hexdigest()
    assert (outbox / "f3.bin").exists()
    assert not (inbox / "f3.bin").exists()
    assert (inbox / ".partial").exists()
