"""`fleet-agent run worker`: checksums the files dropped into an inbox, in batches.

Config (JSON, from the daemon's spec or ``--config``)::

    {"inbox": "/var/spool/fleet-worker/inbox", "outbox": "/var/spool/fleet-worker/done",
     "batch_size": 10, "pace_seconds": 1.0}

Each batch takes up to `batch_size` files from `inbox` (oldest name first;
names starting with "." are in-progress uploads and skipped), computes each
file's SHA-256, appends ``{"name", "bytes", "sha256", "at"}`` to
``<outbox>/checksums.jsonl`` and moves the file to `outbox`. Then it waits
`pace_seconds`. Metrics: type "worker" with files, bytes and batch_ms per
batch, and inbox_depth. A new config applies from the next batch; on SIGTERM
the file in progress is finished (its checksum written, the file moved)
before the agent exits.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_runtime import Agent
from agent_runtime.examples._follow import BadSettings, Follower

__all__ = ["WorkerConfig", "main", "parse_config", "process_file"]

log = logging.getLogger("agent_runtime.examples.worker")

_CHUNK = 1 << 20
MANIFEST = "checksums.jsonl"
"""The file in the outbox that gets one JSON line per processed file."""


@dataclass(frozen=True)
class WorkerConfig:
    """The worker's settings."""

    inbox: Path = Path("inbox")
    """Directory to take files from (created if missing; relative to the agent's cwd)."""
    outbox: Path = Path("done")
    """Directory the processed files and checksums.jsonl go to."""
    batch_size: int = 10
    """Files per batch."""
    pace_seconds: float = 1.0
    """Pause between batches (and between looks at an empty inbox)."""


def parse_config(data: Any) -> WorkerConfig:
    """WorkerConfig from JSON data; ValueError naming the bad key."""
    if not isinstance(data, Mapping):
        raise BadSettings("expected a JSON object")
    unknown = set(data) - {"inbox", "outbox", "batch_size", "pace_seconds"}
    if unknown:
        raise BadSettings(f"unknown key(s) {', '.join(sorted(unknown))}")
    default = WorkerConfig()
    paths = {}
    for key in ("inbox", "outbox"):
        value = data.get(key, str(getattr(default, key)))
        if not isinstance(value, str) or not value:
            raise BadSettings(f"{key}: expected a directory path, got {value!r}")
        paths[key] = Path(value)
    if paths["inbox"].resolve() == paths["outbox"].resolve():
        raise BadSettings("outbox: must differ from inbox")
    batch = data.get("batch_size", default.batch_size)
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 10_000:
        raise BadSettings(f"batch_size: expected an integer 1..10000, got {batch!r}")
    pace = data.get("pace_seconds", default.pace_seconds)
    if isinstance(pace, bool) or not isinstance(pace, int | float) or not 0 <= pace <= 3600:
        raise BadSettings(f"pace_seconds: expected a number 0..3600, got {pace!r}")
    return WorkerConfig(paths["inbox"], paths["outbox"], batch, float(pace))


@dataclass(frozen=True)
class Processed:
    """One file done."""

    name: str
    """File name (also its name in the outbox)."""
    size: int
    """Bytes hashed."""
    sha256: str
    """Hex SHA-256 of the content."""


def pending(inbox: Path, limit: int) -> list[Path]:
    """Up to `limit` regular files waiting in `inbox`, oldest name first."""
    try:
        names = sorted(e.name for e in os.scandir(inbox) if e.is_file() and e.name[0] != ".")
    except FileNotFoundError:
        return []
    return [inbox / n for n in names[:limit]]


async def process_file(path: Path, outbox: Path) -> Processed:
    """Hash `path` in chunks (off the loop), record it in the manifest, move it to `outbox`."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := await asyncio.to_thread(f.read, _CHUNK):
            digest.update(chunk)
            size += len(chunk)
    done = Processed(path.name, size, digest.hexdigest())
    line = {"name": done.name, "bytes": size, "sha256": done.sha256, "at": time.time()}
    with (outbox / MANIFEST).open("a") as manifest:
        manifest.write(json.dumps(line) + "\n")
    os.replace(path, outbox / path.name)
    return done


async def main(agent: Agent, default: WorkerConfig | None = None) -> None:
    """Process batches until the agent stops; the file in progress is always finished."""
    settings = Follower(agent, parse_config, default or WorkerConfig())
    idle = asyncio.Event()
    idle.set()
    total = 0

    @agent.on_stop
    async def _finish_current_item() -> None:
        if not idle.is_set():
            log.info("stop requested: finishing the file in progress")
        await idle.wait()
        log.info("worker stopped after %d file(s)", total)

    applied = -1
    while True:  # leaves through settings.wait() once the agent stops
        config = settings.current
        if settings.version != applied:
            applied = settings.version
            log.info(
                "watching %s (batch %d, pace %gs, config version %d)",
                config.inbox,
                config.batch_size,
                config.pace_seconds,
                applied,
            )
        try:
            for directory in (config.inbox, config.outbox):
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.error("cannot create %s: %s", exc.filename, exc.strerror)  # noqa: TRY400
            if not await settings.wait(max(config.pace_seconds, 1.0)):
                break
            continue
        batch = pending(config.inbox, config.batch_size)
        started = time.perf_counter()
        done_bytes = done_files = 0
        for path in batch:
            if agent.stopping:  # between items only: the current one is always finished
                break
            idle.clear()
            log.info("processing %s", path.name)
            try:
                item = await process_file(path, config.outbox)
            except OSError as exc:
                log.error("%s: skipped: %s", path, exc.strerror or exc)  # noqa: TRY400
                continue
            finally:
                idle.set()
            done_files += 1
            done_bytes += item.size
            total += 1
            log.info("processed %s: %d bytes, sha256 %s", item.name, item.size, item.sha256)
        if done_files:
            agent.record(
                "worker",
                {
                    "files": done_files,
                    "bytes": done_bytes,
                    "batch_ms": round((time.perf_counter() - started) * 1000, 3),
                },
            )
        agent.metric("inbox_depth", len(pending(config.inbox, 100_000)), type="worker")
        if not await settings.wait(config.pace_seconds):
            break
