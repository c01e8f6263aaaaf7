"""Agent log files: copy-truncate rotation with backups, chunked reads from an offset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.supervisor.logs import LogSpace, read_log, rotate_if_needed


def test_read_chunks_from_offsets(tmp_path: Path) -> None:
    """Reads continue at next_offset; a negative offset counts from the end."""
    path = tmp_path / "a.log"
    path.write_bytes(b"0123456789")
    first = read_log(path, 0, 4)
    assert (first.data, first.offset, first.next_offset, first.rotated) == (b"0123", 0, 4, False)
    second = read_log(path, first.next_offset, 100)
    assert (second.data, second.next_offset) == (b"456789", 10)
    assert read_log(path, 10, 5).data == b""
    tail = read_log(path, -3, 100)
    assert (tail.data, tail.offset) == (b"789", 7)
    assert read_log(path, -100, 2).data == b"01"


def test_offset_past_the_end_means_rotated(tmp_path: Path) -> None:
    """An offset beyond the current size reports rotated and reads from the start."""
    path = tmp_path / "a.log"
    path.write_bytes(b"new")
    chunk = read_log(path, 50, 10)
    assert chunk.rotated
    assert (chunk.data, chunk.offset, chunk.next_offset) == (b"new", 0, 3)


def test_missing_file_and_bad_size(tmp_path: Path) -> None:
    """A missing log reads empty; max_bytes < 1 is refused."""
    assert read_log(tmp_path / "none.log", 0, 10).data == b""
    with pytest.raises(ValueError, match="max_bytes must be >= 1"):
        read_log(tmp_path / "none.log", 0, 0)


def test_rotation_keeps_backups_and_the_writer_keeps_appending(tmp_path: Path) -> None:
    """Past the limit the log moves to .1 (older to .2), an O_APPEND writer continues at 0."""
    path = tmp_path / "a.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    os.fchmod(fd, 0o640)  # as the daemon creates an agent's log
    try:
        for generation in range(4):
            os.write(fd, f"gen{generation} ".encode() * 10)
            assert rotate_if_needed(path, max_bytes=25, backups=2)
        os.write(fd, b"after")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"after"
    assert path.with_name("a.log.1").read_bytes() == b"gen3 " * 10
    assert path.with_name("a.log.2").read_bytes() == b"gen2 " * 10
    assert not path.with_name("a.log.3").exists()
    assert path.with_name("a.log.1").stat().st_mode & 0o777 == 0o640  # as private as the log


def test_a_backup_keeps_at_most_twice_the_limit_from_a_line_start(tmp_path: Path) -> None:
    """A log far past its limit (a `yes` agent) leaves a bounded backup saying what it dropped."""
    path = tmp_path / "a.log"
    lines = [f"line {i:06d}\n".encode() for i in range(10_000)]  # 12 bytes each, 120 kB
    path.write_bytes(b"".join(lines))
    assert rotate_if_needed(path, max_bytes=1000, backups=1)
    backup = path.with_name("a.log.1").read_bytes()
    marker, _, kept = backup.partition(b"\n")
    assert marker.startswith(b"[fleet-daemon: ")
    assert marker.endswith(b"bytes of this log dropped, older than the newest part kept]")
    dropped = int(marker.split()[1])
    assert kept == b"".join(lines)[dropped:]  # the newest part, whole lines
    assert kept.startswith(b"line ")
    assert len(kept) <= 2000
    assert path.read_bytes() == b""


def test_no_rotation_below_limit_or_when_disabled(tmp_path: Path) -> None:
    """Small files and max_bytes=0 are left alone; backups=0 just truncates."""
    path = tmp_path / "a.log"
    path.write_bytes(b"x" * 50)
    assert not rotate_if_needed(path, max_bytes=100, backups=3)
    assert not rotate_if_needed(path, max_bytes=0, backups=3)
    assert rotate_if_needed(path, max_bytes=10, backups=0)
    assert path.read_bytes() == b""
    assert not path.with_name("a.log.1").exists()


def test_log_space_says_a_full_filesystem_once_and_its_end_after_quiet() -> None:
    """Full: said once however long it lasts; space back: said once it has stayed free
    for quiet_s (space freed and filled again at once is the same episode)."""
    space = LogSpace(quiet_s=5.0)
    assert space.observe(4096, 0.0) is None  # space: nothing to say
    assert space.observe(0, 1.0) == "full"
    assert [space.observe(0, t) for t in (2.0, 3.0, 60.0)] == [None, None, None]
    assert space.observe(8192, 61.0) is None  # freed...
    assert space.observe(0, 62.0) is None  # ...and filled again: still the same episode
    assert space.full_since == 1.0
    assert [space.observe(8192, t) for t in (63.0, 67.0)] == [None, None]
    assert space.observe(8192, 68.0) == "back"
    assert space.full_since is None
    assert space.observe(8192, 100.0) is None
    assert space.observe(0, 101.0) == "full"  # a new episode
