"""`fleet-agent run probe`: is a TCP or HTTP(S) target up, and how fast does it answer?

Config (JSON, from the daemon's spec or ``--config``)::

    {"targets": [{"name": "web", "url": "http://127.0.0.1:8080/health"},
                 {"name": "db", "url": "tcp://127.0.0.1:5432"}],
     "interval_seconds": 5, "timeout_seconds": 2}

Every interval each target is checked once, concurrently: ``tcp://`` opens a
connection; ``http://`` and ``https://`` send a GET and count a 2xx/3xx
status as up. Per target it reports metric type ``probe.<name>`` with
``up`` (1/0) and, when up, ``latency_ms`` (connect, or time to the status
line), and logs one line. A new config applies at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from agent_runtime import Agent
from agent_runtime._metrics import check_name
from agent_runtime.examples._follow import BadSettings, Follower

__all__ = ["ProbeConfig", "ProbeResult", "Target", "check", "main", "parse_config"]

log = logging.getLogger("agent_runtime.examples.probe")

_SCHEMES = {"tcp": 0, "http": 80, "https": 443}


@dataclass(frozen=True)
class Target:
    """One thing to check."""

    name: str
    """Metric-safe name; metrics go to type "probe.<name>"."""
    url: str
    """tcp://host:port, http://host[:port]/path or https://..."""

    @property
    def scheme(self) -> str:
        """ "tcp", "http" or "https"."""
        return urlsplit(self.url).scheme

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to connect to."""
        parts = urlsplit(self.url)
        return parts.hostname or "", parts.port or _SCHEMES[parts.scheme]


@dataclass(frozen=True)
class ProbeConfig:
    """The probe's settings."""

    targets: tuple[Target, ...] = ()
    """What to check."""
    interval_seconds: float = 5.0
    """Seconds between rounds."""
    timeout_seconds: float = 2.0
    """A check slower than this counts as down."""


def _target(index: int, item: Any) -> Target:
    where = f"targets[{index}]"
    if not isinstance(item, Mapping):
        raise BadSettings(f"{where}: expected an object with name and url")
    unknown = set(item) - {"name", "url"}
    if unknown:
        raise BadSettings(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    name, url = item.get("name"), item.get("url")
    if not isinstance(name, str):
        raise BadSettings(f"{where}.name: expected a string")
    check_name(name, f"{where}.name")
    if not isinstance(url, str):
        raise BadSettings(f"{where}.url: expected a string")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BadSettings(f"{where}.url: {url!r}: {exc}") from None
    if parts.scheme not in _SCHEMES:
        raise BadSettings(f"{where}.url: {url!r}: scheme must be tcp, http or https")
    if not parts.hostname:
        raise BadSettings(f"{where}.url: {url!r}: no host")
    if parts.scheme == "tcp" and port is None:
        raise BadSettings(f"{where}.url: {url!r}: tcp needs a port (tcp://host:port)")
    return Target(name=name, url=url)


def _seconds(data: Mapping[str, Any], key: str, default: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise BadSettings(f"{key}: expected a number > 0, got {value!r}")
    return float(value)


def parse_config(data: Any) -> ProbeConfig:
    """ProbeConfig from JSON data; ValueError naming the bad key."""
    if not isinstance(data, Mapping):
        raise BadSettings("expected a JSON object")
    unknown = set(data) - {"targets", "interval_seconds", "timeout_seconds"}
    if unknown:
        raise BadSettings(f"unknown key(s) {', '.join(sorted(unknown))}")
    items = data.get("targets", [])
    if not isinstance(items, list):
        raise BadSettings("targets: expected a list")
    targets = tuple(_target(i, item) for i, item in enumerate(items))
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise BadSettings("targets: names must be unique")
    return ProbeConfig(
        targets=targets,
        interval_seconds=_seconds(data, "interval_seconds", 5.0),
        timeout_seconds=_seconds(data, "timeout_seconds", 2.0),
    )


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of one check."""

    up: bool
    """The target answered as expected."""
    latency_ms: float
    """Time to connect (tcp) or to the status line (http), or until it failed."""
    detail: str
    """Human-readable outcome ("connected", "HTTP 200", "refused", ...)."""


async def _http_status(target: Target) -> int:
    parts = urlsplit(target.url)
    host, port = target.address
    context = ssl.create_default_context() if parts.scheme == "https" else None
    reader, writer = await asyncio.open_connection(
        host, port, ssl=context, server_hostname=host if context else None
    )
    try:
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        hostport = parts.netloc.rsplit("@", 1)[-1]
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: fleet-agent-probe\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        line = await reader.readline()
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    fields = line.decode("latin-1").split()
    if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
        raise ConnectionError(f"not an HTTP response: {line[:40]!r}")
    return int(fields[1])


async def check(target: Target, within: float) -> ProbeResult:
    """Check `target` once; slower than `within` seconds counts as down."""
    started = time.perf_counter()

    def elapsed() -> float:
        return (time.perf_counter() - started) * 1000

    try:
        async with asyncio.timeout(within):
            if target.scheme == "tcp":
                _, writer = await asyncio.open_connection(*target.address)
                latency = elapsed()
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return ProbeResult(True, latency, "connected")
            status = await _http_status(target)
            latency = elapsed()
    except TimeoutError:
        return ProbeResult(False, elapsed(), f"no answer within {within:g}s")
    except (OSError, ssl.SSLError, ConnectionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return ProbeResult(False, elapsed(), reason or type(exc).__name__)
    return ProbeResult(200 <= status < 400, latency, f"HTTP {status}")


async def probe_round(agent: Agent, targets: Sequence[Target], within: float) -> None:
    """Check every target concurrently; one metric sample and one log line each."""
    results = await asyncio.gather(*(check(t, within) for t in targets))
    for target, result in zip(targets, results, strict=True):
        values = {"up": 1.0 if result.up else 0.0}
        if result.up:
            values["latency_ms"] = round(result.latency_ms, 3)
        agent.record(f"probe.{target.name}", values)
        if result.up:
            log.info(
                "%s %s up: %s in %.1f ms", target.name, target.url, result.detail, result.latency_ms
            )
        else:
            log.warning("%s %s DOWN: %s", target.name, target.url, result.detail)


async def main(agent: Agent, default: ProbeConfig | None = None) -> None:
    """Probe the configured targets until the agent stops."""
    settings = Follower(agent, parse_config, default or ProbeConfig())
    applied = -1

    @agent.on_stop
    def _said_goodbye() -> None:
        log.info("probe stopping after config version %d", settings.version)

    while not agent.stopping:
        config = settings.current
        if settings.version != applied:
            applied = settings.version
            log.info(
                "probing %d target(s) every %gs (timeout %gs, config version %d)",
                len(config.targets),
                config.interval_seconds,
                config.timeout_seconds,
                applied,
            )
        if config.targets:
            await probe_round(agent, config.targets, config.timeout_seconds)
        if not await settings.wait(config.interval_seconds):
            break
