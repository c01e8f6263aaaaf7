"""Archives into directories, safely, with a manifest to check them before every use.

An artifact is a single file or a tar (plain, gzip, bzip2 or xz) or zip
archive, told apart by content, never by name (`detect`). `unpack` extracts
into a directory of its own under limits (bytes written, entries), and
refuses, leaving nothing, anything that could reach outside it or is no
plain content: absolute names, ``..``, duplicates, entries below a file or a
link, links whose target leaves the directory (checked as written and again
after extraction, by resolving every link), devices, fifos, sockets.
Byte counts are what was written, not what headers claim, so a zip bomb
stops at the limit. Modes are normalised: directories 0755, files 0755 or
0644 (executable or not), never setuid.

The `Manifest` lists every directory, file (size and SHA-256) and link as
extracted. `verify` compares a directory with it exactly, so a cached
artifact that was changed, truncated or added to is noticed before use.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import json
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

__all__ = ["Kind", "Manifest", "UnpackLimits", "UnpackRefused", "detect", "unpack", "verify"]

Kind = Literal["file", "tar", "zip"]

_BLOCK = 64 * 1024
_MAX_LINK_TARGET = 4096


class UnpackRefused(Exception):
    """The archive cannot be unpacked safely (or within the limits); the message says why.

    Nothing was left behind. Fix the artifact; unpacking it again fails the same way.
    """


@dataclass(frozen=True)
class UnpackLimits:
    """What one artifact may unpack to."""

    max_bytes: int
    """Bytes written for all its files together."""
    max_files: int
    """Entries (files, directories, links)."""


@dataclass
class Manifest:
    """What an artifact's directory holds, as unpacked."""

    digest: str
    """The artifact's ``sha256:<hex>``."""
    kind: Kind
    """What it was: a single file, a tar or a zip archive."""
    entry: str = ""
    """The path `{artifact}` names, relative to the directory ("" for an archive's
    directory itself, the file's name for a single file)."""
    files: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Relative path -> (size, SHA-256 hex) of every regular file."""
    dirs: set[str] = field(default_factory=set)
    """Relative path of every directory."""
    links: dict[str, str] = field(default_factory=dict)
    """Relative path -> target of every symbolic link."""

    def dumps(self) -> str:
        """As JSON text (sorted, so equal manifests are equal files)."""
        return json.dumps(
            {
                "version": 1,
                "digest": self.digest,
                "kind": self.kind,
                "entry": self.entry,
                "files": {p: list(v) for p, v in sorted(self.files.items())},
                "dirs": sorted(self.dirs),
                "links": dict(sorted(self.links.items())),
            },
            indent=1,
        )

    @classmethod
    def loads(cls, text: str) -> Manifest:
        """Inverse of `dumps`; ValueError (or KeyError, TypeError) for anything else."""
        data = json.loads(text)
        if data.get("version") != 1 or data["kind"] not in ("file", "tar", "zip"):
            raise ValueError("not a version 1 manifest")
        return cls(
            digest=str(data["digest"]),
            kind=data["kind"],
            entry=str(data["entry"]),
            files={str(p): (int(s), str(h)) for p, (s, h) in data["files"].items()},
            dirs={str(d) for d in data["dirs"]},
            links={str(p): str(t) for p, t in data["links"].items()},
        )


def detect(path: Path) -> Kind:
    """What the file at `path` is, by its content."""
    with path.open("rb") as f:
        head = f.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if _is_tar_header(head):
        return "tar"
    opener = _DECOMPRESSORS.get(next((m for m in _DECOMPRESSORS if head.startswith(m)), b""))
    if opener is not None:
        try:
            with opener(path) as inner:
                if _is_tar_header(inner.read(512)):
                    return "tar"
        except (OSError, EOFError, lzma.LZMAError):
            pass  # compressed, but not a tar (or damaged): a plain file
    return "file"


def _is_tar_header(block: bytes) -> bool:
    return len(block) >= 262 and block[257:262] == b"ustar"


_DECOMPRESSORS: dict[bytes, Any] = {
    b"\x1f\x8b": gzip.open,
    b"BZh": bz2.open,
    b"\xfd7zXZ\x00": lzma.open,
}


class _Extraction:
    """The state of one extraction: what was written, and the checks every entry passes."""

    def __init__(self, dest: Path, limits: UnpackLimits, manifest: Manifest) -> None:
        self.dest = dest
        self.limits = limits
        self.manifest = manifest
        self.written = 0
        self.entries = 0
        self.explicit_dirs: set[str] = set()
        """Directories the archive lists (others were made for the entries below them)."""

    def name(self, raw: str) -> str | None:
        """The entry's safe relative path; None for the archive's root ("./")."""
        if "\0" in raw:
            raise UnpackRefused(f"{raw!r}: a name with a NUL byte")
        if raw.startswith("/"):
            raise UnpackRefused(f"{raw!r}: an absolute path")
        parts = [p for p in raw.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise UnpackRefused(f"{raw!r}: a path with '..' (it could leave the directory)")
        return "/".join(parts) or None

    def count(self, rel: str, *, is_dir: bool) -> None:
        """One more entry: within max_files, not a duplicate, not below a file or link."""
        self.entries += 1
        if self.entries > self.limits.max_files:
            raise UnpackRefused(
                f"more than {self.limits.max_files} entries (the daemon's [artifacts] max_files)"
            )
        m = self.manifest
        # A directory made for earlier entries below it may still come as an entry itself.
        repeated_dir = rel in m.dirs and (not is_dir or rel in self.explicit_dirs)
        if rel in m.files or rel in m.links or repeated_dir:
            raise UnpackRefused(f"{rel!r}: appears twice in the archive")
        parent = posixpath.dirname(rel)
        while parent:
            if parent in m.files or parent in m.links:
                what = "a file" if parent in m.files else "a link"
                raise UnpackRefused(f"{rel!r}: is below {parent!r}, which is {what}")
            parent = posixpath.dirname(parent)

    def parents(self, rel: str) -> None:
        """Create the missing directories above `rel` (they join the manifest)."""
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in self.manifest.dirs:
                (self.dest / sub).mkdir(mode=0o755)
                self.manifest.dirs.add(sub)

    def directory(self, rel: str) -> None:
        self.explicit_dirs.add(rel)
        self.parents(rel)
        if rel not in self.manifest.dirs:
            (self.dest / rel).mkdir(mode=0o755)
            self.manifest.dirs.add(rel)

    def file(self, rel: str, source: IO[bytes], mode: int) -> None:
        self.parents(rel)
        digest = hashlib.sha256()
        size = 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        perm = 0o755 if mode & 0o111 else 0o644
        fd = os.open(self.dest / rel, flags, perm)
        with os.fdopen(fd, "wb") as out:
            while block := source.read(_BLOCK):
                size += len(block)
                self.written += len(block)
                if self.written > self.limits.max_bytes:
                    raise UnpackRefused(
                        f"unpacks to more than {self.limits.max_bytes} bytes (the daemon's"
                        " [artifacts] max_unpacked_bytes)"
                    )
                digest.update(block)
                out.write(block)
        os.chmod(self.dest / rel, perm)  # the umask may have taken bits off
        self.manifest.files[rel] = (size, digest.hexdigest())

    def copy(self, rel: str, of: str) -> None:
        """A hard link in the archive: a copy of a file extracted before it."""
        if of not in self.manifest.files:
            raise UnpackRefused(f"{rel!r}: a hard link to {of!r}, which is not a file before it")
        with (self.dest / of).open("rb") as source:
            self.file(rel, source, os.stat(self.dest / of).st_mode)

    def link(self, rel: str, target: str) -> None:
        if not target or "\0" in target or len(target) > _MAX_LINK_TARGET:
            raise UnpackRefused(f"{rel!r}: a link with an unusable target")
        if target.startswith("/"):
            raise UnpackRefused(f"{rel!r}: a link to the absolute path {target!r}")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
        if resolved == ".." or resolved.startswith("../"):
            raise UnpackRefused(f"{rel!r}: a link to {target!r}, outside the artifact")
        self.parents(rel)
        os.symlink(target, self.dest / rel)
        self.manifest.links[rel] = target

    def check_links(self) -> None:
        """Every link, resolved through the others as written, stays inside."""
        root = os.path.realpath(self.dest)
        for rel, target in self.manifest.links.items():
            real = os.path.realpath(self.dest / rel)
            if real != root and not real.startswith(root + os.sep):
                raise UnpackRefused(f"{rel!r}: a link to {target!r}, which leads outside")


def unpack(archive: Path, dest: Path, limits: UnpackLimits, *, digest: str, kind: Kind) -> Manifest:
    """Extract the tar or zip `archive` into `dest` (created; must not exist).

    UnpackRefused, with `dest` removed, for anything unsafe, over the limits
    or unreadable.
    """
    extract = {"tar": _untar, "zip": _unzip}[kind]  # KeyError for "file": not an archive
    dest.mkdir(mode=0o755)
    manifest = Manifest(digest=digest, kind=kind)
    work = _Extraction(dest, limits, manifest)
    try:
        extract(archive, work)
        work.check_links()
    except UnpackRefused:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, lzma.LZMAError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise UnpackRefused(f"not a readable {kind} archive: {exc}") from None
    except OSError as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise UnpackRefused(f"cannot unpack: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return manifest


_TAR_TYPES = {
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "fifo",
}


def _untar(archive: Path, work: _Extraction) -> None:
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            rel = work.name(member.name)
            if rel is None:
                continue
            work.count(rel, is_dir=member.isdir())
            if member.isdir():
                work.directory(rel)
            elif member.isreg():
                source = tar.extractfile(member)
                assert source is not None  # a regular member always has a file
                with source:
                    work.file(rel, source, member.mode)
            elif member.issym():
                work.link(rel, member.linkname)
            elif member.islnk():
                of = work.name(member.linkname)
                work.copy(rel, of or "")
            else:
                what = _TAR_TYPES.get(member.type, f"tar entry of type {member.type!r}")
                raise UnpackRefused(
                    f"{rel!r}: is a {what} (only files, directories and links are unpacked)"
                )


def _unzip(archive: Path, work: _Extraction) -> None:
    with zipfile.ZipFile(archive) as z:
        infos = z.infolist()
        if len(infos) > work.limits.max_files:
            raise UnpackRefused(
                f"more than {work.limits.max_files} entries (the daemon's [artifacts] max_files)"
            )
        for info in infos:
            rel = work.name(info.filename)
            if rel is None:
                continue
            work.count(rel, is_dir=info.is_dir())
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if stat.S_ISLNK(mode):
                with z.open(info) as source:
                    target = source.read(_MAX_LINK_TARGET + 1)
                work.link(rel, target.decode("utf-8", errors="replace"))
            elif info.is_dir():
                work.directory(rel)
            elif kind in (0, stat.S_IFREG):
                with z.open(info) as source:
                    work.file(rel, source, mode)
            else:
                raise UnpackRefused(
                    f"{rel!r}: is a special file (mode {oct(mode)}); only files, directories"
                    " and links are unpacked"
                )


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of everything below `root`, links not followed."""
    for top, dirnames, filenames in os.walk(root, followlinks=False):
        for name in (*dirnames, *filenames):
            path = os.path.join(top, name)
            yield os.path.relpath(path, root).replace(os.sep, "/"), os.lstat(path)


def verify(root: Path, manifest: Manifest) -> str | None:
    """None if `root` holds exactly what `manifest` lists, else the first difference in words."""
    if not root.is_dir() or root.is_symlink():
        return f"{root} is missing"
    seen_files: set[str] = set()
    seen_dirs: set[str] = set()
    seen_links: set[str] = set()
    for rel, st in _walk(root):
        if stat.S_ISDIR(st.st_mode):
            seen_dirs.add(rel)
        elif stat.S_ISLNK(st.st_mode):
            seen_links.add(rel)
            if manifest.links.get(rel) != os.readlink(root / rel):
                return f"{rel} is not the link it was unpacked as"
        elif stat.S_ISREG(st.st_mode):
            seen_files.add(rel)
            expected = manifest.files.get(rel)
            if expected is None:
                return f"{rel} was added"
            if st.st_size != expected[0]:
                return f"{rel} has {st.st_size} bytes, not {expected[0]}"
        else:
            return f"{rel} is not a file, directory or link"
    for label, found, listed in (
        ("file", seen_files, set(manifest.files)),
        ("directory", seen_dirs, manifest.dirs),
        ("link", seen_links, set(manifest.links)),
    ):
        if found != listed:
            missing, extra = sorted(listed - found), sorted(found - listed)
            if missing:
                return f"{label} {missing[0]} is missing"
            return f"{label} {extra[0]} was added"
    for rel in sorted(seen_files):
        if _sha256(root / rel) != manifest.files[rel][1]:
            return f"{rel} was changed (its SHA-256 differs)"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with contextlib.suppress(OSError), path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
