"""Agent log files: size rotation with backups, and chunked reads from an offset.

The agent writes its log itself (the child holds an O_APPEND fd), so the
daemon cannot switch files under it. Rotation is therefore copy-truncate:

1. shift ``<id>.log.N-1`` -> ``.N`` (dropping the oldest), then
2. copy ``<id>.log`` to ``<id>.log.1``, reading until end of file, and
3. ``ftruncate`` the original to 0: the child's O_APPEND writes continue at
   the new end of file, i.e. at offset 0.

Lines the agent writes between the last read of step 2 and the truncate of
step 3 are lost. Step 2 reads to the end of file right before truncating, so
that window is one read() + ftruncate() long (microseconds), not the length of
the whole copy. The daemon never sits in the agent's write path.

An agent can write faster than the copy reads (`yes` writes ~1 GB/s), so the
copy is bounded: a backup holds at most ``2 * max_bytes``, the newest part of
the file from a line start. What is older, or written during a copy that hit
that bound, is dropped, and a marker line in the backup says how many bytes
(unbounded, the copy chased the writer forever while the disk filled). The
supervisor checks sizes every second, so a file exceeds the limit by at most
about one second of output.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "MAX_READ_BYTES",
    "LogChunk",
    "LogSpace",
    "log_path",
    "read_log",
    "rotate_if_needed",
]

MAX_READ_BYTES = 4 * 1024 * 1024
"""Largest chunk `read_log` returns at once."""
_COPY_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class LogChunk:
    """A piece of an agent's current log file."""

    data: bytes
    """The bytes read (possibly empty at end of file)."""
    offset: int
    """Where `data` starts in the current file."""
    next_offset: int
    """Pass this as the next offset to continue reading."""
    rotated: bool
    """True when the requested offset was past the end: the file was rotated, read from 0."""


@dataclass
class LogSpace:
    """Whether an agent's output is being lost to a full log filesystem, said once per
    episode (pure: the free space and the time are passed in).

    The agent writes its log itself: on a full filesystem its writes fail and its
    output is gone, silently. An episode starts when no space is free and ends once
    space has been free for `quiet_s` (an agent writing fast would fill freed space
    at once, and the episode would flap).
    """

    quiet_s: float = 5.0
    """Seconds of free space before the episode is over."""
    full_since: float | None = None
    """When the episode started (None: no episode)."""
    free_since: float | None = None
    """During an episode: since when space has been free."""

    def observe(self, free_bytes: int, now: float) -> str | None:
        """One look at the free space: "full" when an episode starts, "back" when it
        ends, else None."""
        if free_bytes <= 0:
            self.free_since = None
            if self.full_since is None:
                self.full_since = now
                return "full"
            return None
        if self.full_since is None:
            return None
        if self.free_since is None:
            self.free_since = now
        if now - self.free_since < self.quiet_s:
            return None
        self.full_since = self.free_since = None
        return "back"


def log_path(log_dir: Path, agent_id: str) -> Path:
    """``<log_dir>/<agent_id>.log`` (agent ids are label values: no "/", never "..")."""
    return log_dir / f"{agent_id}.log"


def read_log(path: Path, offset: int, max_bytes: int) -> LogChunk:
    """Read up to `max_bytes` from `offset`; negative offsets count from the end.

    A missing file reads as empty. `ValueError` when max_bytes < 1.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    max_bytes = min(max_bytes, MAX_READ_BYTES)
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return LogChunk(b"", 0, 0, rotated=offset > 0)
    with f:
        size = os.fstat(f.fileno()).st_size
        rotated = False
        if offset < 0:
            start = max(0, size + offset)
        elif offset > size:
            start, rotated = 0, True
        else:
            start = offset
        f.seek(start)
        data = f.read(max_bytes)
    return LogChunk(data, start, start + len(data), rotated)


def rotate_if_needed(path: Path, max_bytes: int, backups: int) -> bool:
    """Copy-truncate `path` when larger than `max_bytes` (0 = never); True if rotated."""
    if max_bytes <= 0:
        return False
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    if backups > 0:
        for n in range(backups - 1, 0, -1):
            older = path.with_name(f"{path.name}.{n}")
            with contextlib.suppress(FileNotFoundError):
                older.replace(path.with_name(f"{path.name}.{n + 1}"))
        backup = path.with_name(f"{path.name}.1")
        tmp = path.with_name(f".{path.name}.1.tmp")
        try:
            with path.open("r+b") as src:
                # The backup is as private as the log (0640), not the umask's 0644.
                mode = stat.S_IMODE(os.fstat(src.fileno()).st_mode)
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                fd = os.open(tmp, flags, mode)
                os.fchmod(fd, mode)  # an older tmp file keeps its mode through O_CREAT
                with os.fdopen(fd, "wb") as dst:
                    _copy_bounded(src, dst, 2 * max_bytes)
                    dst.flush()
                    os.fsync(dst.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()  # a half copy gives its space back
            raise
        tmp.replace(backup)
    else:
        with path.open("r+b") as src:
            src.truncate(0)
    return True


def _copy_bounded(src: BinaryIO, dst: BinaryIO, budget: int) -> None:
    """Copy src's newest <= `budget` bytes to dst, then truncate src; mark what was dropped."""
    size = os.fstat(src.fileno()).st_size
    start = max(0, size - budget)
    if start:
        src.seek(start)
        head = src.read(min(_COPY_CHUNK, budget))
        cut = head.find(b"\n") + 1  # begin at a line start when there is one
        start += cut
        dst.write(_dropped(start, "older than the newest part kept")[1:])
        dst.write(head[cut:])
        budget -= len(head) - cut
    while budget > 0 and (chunk := src.read(min(_COPY_CHUNK, budget))):
        dst.write(chunk)
        budget -= len(chunk)
    # At the budget the writer outpaces the copy: stop chasing it, drop the rest.
    rest = os.fstat(src.fileno()).st_size - src.tell()
    # On disk before the truncate: a full disk fails here, and the log is kept.
    dst.flush()
    os.fsync(dst.fileno())
    src.truncate(0)
    if rest > 0:
        dst.write(_dropped(rest, "written faster than the log could be rotated"))


def _dropped(count: int, why: str) -> bytes:
    return f"\n[fleet-daemon: {count} bytes of this log dropped, {why}]\n".encode()
