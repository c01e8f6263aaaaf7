"""docs/http-api.md's curl examples, run as written (Debian's curl) against a real manager.

Only the address is changed (the test manager's port) and the ids an earlier
answer gave (ROLLOUT_ID, JOB_ID, TOKEN_ID). Each must answer the status the
doc promises (200 unless its comment says otherwise) and never a mistake in
the call itself (a field the message lacks, a wrong path or content type).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
from artifact_helpers import push_requests
from http_helpers import http_env

from fleet.v1 import fleet_pb2

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "http-api.md"
CURL = shutil.which("curl")
if CURL is None and os.environ.get("CI") == "true":
    raise RuntimeError("curl is missing: apt-get install curl (docs/http-api.md's test runs it)")
pytestmark = pytest.mark.skipif(
    CURL is None, reason="curl is not installed (apt-get install curl); under CI=true: a failure"
)

_BLOCK = re.compile(r"```sh\n(curl.*?)\n```", re.S)
_ANSWER = {
    "ApplyDefinitions": ("ROLLOUT_ID", lambda a: a["changes"][0]["rolloutId"]),
    "RunJob": ("JOB_ID", lambda a: a["job"]["id"]),
    "CreateJoinToken": ("TOKEN_ID", lambda a: a["info"]["id"]),
}
"""Examples whose answer gives an id later examples use."""
_MISTAKES = ("the request body is not", "no such method", "Content-Type must be")


def examples(text: str) -> list[tuple[str, list[str], set[int]]]:
    """(method, argv, statuses it may answer) for each curl example, in order."""
    out = []
    for block in _BLOCK.findall(text):
        command = block.replace("\\\n", " ")
        command, _, comment = command.partition("#")
        statuses = {int(s) for s in re.findall(r"\d{3}", comment)} or {200}
        argv = shlex.split(command)
        method = argv[-1].rsplit("/", 1)[-1]
        out.append((method, argv, statuses))
    return out


def test_every_rpc_has_an_example() -> None:
    """Each FleetService RPC but the client stream PushArtifact has a curl example."""
    documented = {m for m, _, _ in examples(DOC.read_text())}
    service = fleet_pb2.DESCRIPTOR.services_by_name["FleetService"]
    assert documented == {m.name for m in service.methods if not m.client_streaming}


async def _curl(argv: list[str], cwd: Path, out: Path, *, stream: bool) -> tuple[int, int, str]:
    """Run one example: (curl's exit code, HTTP status, body)."""
    assert CURL is not None
    extra = ["-sS", "-o", str(out), "-w", "%{http_code}"]
    if stream:
        extra += ["--max-time", "4"]  # a followed stream stays open by design
    proc = await asyncio.create_subprocess_exec(
        CURL,
        *extra,
        *argv[1:],
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    read = await asyncio.to_thread(lambda: out.read_text() if out.exists() else None)
    body = stderr.decode() if read is None else read
    status = int(stdout.decode() or 0)
    return proc.returncode or 0, status, body


async def test_the_curl_examples_do_what_the_doc_says(pki: Any, tmp_path: Path) -> None:
    """Every example, in the doc's order, answers the documented status; streams give lines."""
    cwd = tmp_path / "client"
    cwd.mkdir()
    async with http_env(pki, tmp_path) as env:
        await env.add_nodes("web-1", "web-2", labels={"env": "prod"})
        await env.add_nodes("old-1", "old-2", labels={"env": "old"})
        await env.stub.PushArtifact(push_requests(b"a tool", name="tool", version="2.0"))
        alice = pki.issue("operator", "alice")
        shutil.copy(alice.cert_file, cwd / "operator.pem")
        shutil.copy(alice.key_file, cwd / "operator-key.pem")
        shutil.copy(alice.ca_file, cwd / "ca.pem")
        url = f"https://127.0.0.1:{env.manager.http_port}"
        ids: dict[str, str] = {}
        failures = []
        text = await asyncio.to_thread(DOC.read_text)
        for i, (method, argv, statuses) in enumerate(examples(text)):
            argv = [a.replace("https://127.0.0.1:7480", url) for a in argv]
            for placeholder, value in ids.items():
                argv = [a.replace(placeholder, value) for a in argv]
            stream = "-N" in argv
            rc, status, body = await _curl(argv, cwd, tmp_path / f"out-{i}", stream=stream)
            if stream and rc == 28:  # --max-time ended a followed stream
                rc = 0 if body.strip() else rc
            problem = rc != 0 or status not in statuses or any(m in body for m in _MISTAKES)
            if problem:
                failures.append(f"{method}: curl exit {rc}, HTTP {status}: {body[:300]}")
                continue
            if stream and status == 200:
                assert all("result" in json.loads(x) or "error" in x for x in body.splitlines())
            if method in _ANSWER and status == 200:
                placeholder, get = _ANSWER[method]
                ids[placeholder] = str(get(json.loads(body)))
        assert not failures, "\n".join(failures)

        # The doc's word on a call without a certificate.
        assert CURL is not None
        proc = await asyncio.create_subprocess_exec(
            CURL,
            "-sS",
            "--cacert",
            "ca.pem",
            "-H",
            "Content-Type: application/json",
            "-d",
            "{}",
            f"{url}/v1/fleet.v1.FleetService/ListNodes",
            cwd=cwd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode != 0
        assert stdout == b""
        # The server ends the handshake without a client certificate: curl sees the
        # connection closed (52) or reset (56), depending on timing; never an HTTP answer.
        said = stderr.decode().lower()
        assert "empty reply from server" in said or "connection reset by peer" in said, stderr
