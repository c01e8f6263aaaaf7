"""Health probes (the I/O half; `daemon.supervisor.health` decides).

`run_probe` runs one HTTP, TCP or command probe of an agent and returns a
`ProbeResult`; it never raises for a failed probe, and always returns within
about the check's `timeout` (real time, not the supervisor's clock: it
bounds real I/O).

- http: one ``GET`` over HTTP/1.1 with ``Connection: close``; passes when
  the status is in the expected range. Redirects are not followed (3xx is in
  the default range 200..399). ``https`` verifies the server's certificate
  and host name against the system's trust store (OpenSSL's defaults, so
  ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` in the daemon's environment point it
  at a private CA); there is no way to turn verification off.
- tcp: a connection to host:port is accepted (then closed at once).
- command: the argv (no shell) runs like the agent: its cwd, env and user,
  in its own session; it must exit 0 within the timeout, else its process
  group is killed. The first 512 bytes of its output go into the detail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import ssl
import time
from urllib.parse import urlsplit

from daemon.supervisor.health import ProbeResult
from daemon.supervisor.process import _DAEMON_ONLY_ENV as DAEMON_ONLY_ENV
from daemon.supervisor.spec import AgentSpec, HealthSpec, resolve_executable
from fleet.agentspec import split_host_port

__all__ = ["OUTPUT_LIMIT", "run_probe"]

OUTPUT_LIMIT = 512
"""Bytes of a command's output (or an HTTP status line) kept in a failure detail."""
_USER_AGENT = "fleet-daemon-health"


async def run_probe(check: HealthSpec, agent: AgentSpec) -> ProbeResult:
    """Run one probe of `agent`'s `check` (kind http, tcp or command)."""
    # asyncio.timeout, never wait_for: on Python 3.11 wait_for returns the result of a
    # probe that ended just as its task was cancelled, swallowing the cancellation; the
    # agent's probe loop then outlived its watcher, whose restart (and the daemon's
    # shutdown) waited for it forever.
    try:
        if check.kind == "http":
            async with asyncio.timeout(check.timeout):
                ok, detail = await _http(check)
        elif check.kind == "tcp":
            async with asyncio.timeout(check.timeout):
                ok, detail = await _tcp(check.address)
        else:
            ok, detail = await _command(check, agent)
    except TimeoutError:
        ok, detail = False, f"{_what(check)}: no answer within {check.timeout:g}s"
    except (OSError, ssl.SSLError, ValueError, UnicodeError) as exc:
        ok, detail = False, f"{_what(check)}: {_oserror(exc)}"
    return ProbeResult(ok, detail, time.time())


def _what(check: HealthSpec) -> str:
    if check.kind == "http":
        return f"GET {check.url}"
    if check.kind == "tcp":
        return f"connect {check.address}"
    return f"command {check.command[0]!r}" if check.command else "command"


def _oserror(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, OSError) and exc.errno:
        # asyncio says "Connect call failed ('127.0.0.1', 80)"; the errno says why.
        text = os.strerror(exc.errno)
        return text[0].lower() + text[1:]
    return str(exc) or type(exc).__name__


async def _tcp(address: str) -> tuple[bool, str]:
    host, port = split_host_port(address)
    _, writer = await asyncio.open_connection(host, port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True, f"connect {address}: accepted"


async def _http(check: HealthSpec) -> tuple[bool, str]:
    url = urlsplit(check.url)
    host = url.hostname or ""
    tls = url.scheme == "https"
    port = url.port or (443 if tls else 80)
    context = ssl.create_default_context() if tls else None
    reader, writer = await asyncio.open_connection(
        host, port, ssl=context, server_hostname=host if tls else None
    )
    try:
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        netloc = f"[{host}]" if ":" in host else host
        if url.port:
            netloc += f":{url.port}"
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: {netloc}\r\nUser-Agent: {_USER_AGENT}\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n".encode("ascii")
        )
        await writer.drain()
        line = await reader.readline()
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    status_line = line[:OUTPUT_LIMIT].decode("latin-1").strip()
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        shown = status_line or "the connection closed without an answer"
        return False, f"GET {check.url}: not an HTTP response: {shown!r}"
    status = int(parts[1])
    ok = check.expected_status_min <= status <= check.expected_status_max
    detail = f"GET {check.url}: status {' '.join(parts[1:])}"
    if not ok:
        detail += f" (expected {check.expected_status_min}..{check.expected_status_max})"
    return ok, detail


def _agent_env(agent: AgentSpec) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DAEMON_ONLY_ENV}
    env.update(agent.env)
    env["FLEET_AGENT_ID"] = agent.id
    return env


async def _command(check: HealthSpec, agent: AgentSpec) -> tuple[bool, str]:
    env = _agent_env(agent)
    what = _what(check)
    user: int | None = None
    group: int | None = None
    groups: list[int] | None = None
    if agent.user and os.geteuid() == 0:
        pw = pwd.getpwnam(agent.user)  # KeyError: the agent itself cannot start either
        user, group, groups = pw.pw_uid, pw.pw_gid, os.getgrouplist(pw.pw_name, pw.pw_gid)
        env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
    executable = resolve_executable(check.command[0], env=env, cwd=agent.cwd)
    if executable is None:
        return False, f"{what}: not found or not executable"
    proc = await asyncio.create_subprocess_exec(
        *check.command,
        executable=executable,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=agent.cwd or None,
        env=env,
        start_new_session=True,
        user=user,
        group=group,
        extra_groups=groups,
    )
    assert proc.stdout is not None
    output = bytearray()

    async def collect() -> int:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(4096):
            if len(output) < OUTPUT_LIMIT:
                output.extend(chunk[: OUTPUT_LIMIT - len(output)])
        return await proc.wait()

    try:
        async with asyncio.timeout(check.timeout):  # not wait_for: see run_probe
            code = await collect()
    except TimeoutError:
        _kill_group(proc.pid)
        await proc.wait()
        # What it wrote before it was killed (a child that left the group may hold the pipe).
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(0.2):
                rest = await proc.stdout.read(OUTPUT_LIMIT)
            output.extend(rest[: OUTPUT_LIMIT - len(output)])
        return False, f"{what}: no exit within {check.timeout:g}s; killed{_shown(output)}"
    except asyncio.CancelledError:
        _kill_group(proc.pid)
        raise
    if code == 0:
        return True, f"{what}: exit code 0"
    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    return False, f"{what}: {how}{_shown(output)}"


def _shown(output: bytes | bytearray) -> str:
    text = " ".join(output.decode("utf-8", "replace").split())
    return f": {text}" if text else ""


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
