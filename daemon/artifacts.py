"""The daemon's artifact cache: fetch, verify, unpack, check before use, keep what is needed.

A pushed agent spec may name an artifact (`fleet.artifacts.ArtifactRef`:
name, version, digest, size). `ArtifactCache.ensure(ref)` returns the path
`{artifact}` stands for in the agent's argv, cwd and env (`substitute`):
the unpacked directory of an archive, or the file itself. Under
``<state_dir>/artifacts/``::

    <hex>/          the unpacked tree (or a directory holding the single file)
    <hex>.json      its manifest (daemon.unpack.Manifest), written last: present = installed
    partial/<hex>   a download in progress, kept across daemon restarts
    tmp/            scratch space of an unpack in progress

`ensure` first checks an installed copy against its manifest (sizes and
SHA-256 of every file, nothing added or missing); a damaged copy is logged,
removed and fetched again. A download resumes from the size of its partial
file (ManagerService.DownloadArtifact from that offset); a stream that breaks
is retried a few times, then `ArtifactUnavailable` says how far it got and
the next `ensure` carries on from there. The whole file must hash to the
ref's digest (a mismatch after a resumed download is retried once from byte
0, in case the partial file was damaged). Archives are unpacked with limits
(daemon.unpack). `retain(refs)` deletes every artifact that is neither in
`refs` (the current and previous pushed sets) nor among the `keep_recent`
most recently used.

Every failure is an `ArtifactError` whose message names the artifact and the
reason, ready for an update error ("artifact web 1.4.2: digest mismatch ...").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, ClassVar

import grpc

from daemon.unpack import Manifest, UnpackLimits, UnpackRefused, detect, unpack, verify
from fleet.agentspec import AgentSpec
from fleet.artifacts import PLACEHOLDER, ArtifactRef, file_digest, format_size
from fleet.errors import FleetError
from fleet.retry import Backoff
from fleet.v1 import manager_pb2

__all__ = [
    "ArtifactCache",
    "ArtifactError",
    "ArtifactTooLarge",
    "ArtifactUnavailable",
    "CacheLimits",
    "DigestMismatch",
    "Fetch",
    "ManagerRefused",
    "UnpackFailed",
    "substitute",
]

log = logging.getLogger(__name__)

Fetch = Callable[[str, int], AsyncIterator[manager_pb2.DownloadArtifactResponse]]
"""DownloadArtifact(digest, offset): the pieces from `offset` on; raises FleetError."""
Progress = Callable[[int, int], None]
"""Told (bytes downloaded so far, total) after every piece."""

_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}
"""Answers worth retrying: the manager (or the way to it) failed, not the request."""


def substitute(spec: AgentSpec, path: Path | str) -> AgentSpec:
    """`spec` with every ``{artifact}`` in argv, cwd, env values and a health check's
    command replaced by `path`."""
    p = str(path)
    return dataclasses.replace(
        spec,
        argv=tuple(a.replace(PLACEHOLDER, p) for a in spec.argv),
        cwd=spec.cwd.replace(PLACEHOLDER, p),
        env={k: v.replace(PLACEHOLDER, p) for k, v in spec.env.items()},
        health=dataclasses.replace(
            spec.health, command=tuple(a.replace(PLACEHOLDER, p) for a in spec.health.command)
        ),
    )


class ArtifactError(Exception):
    """An artifact cannot be made ready; str() is one line naming it and saying why."""

    transient: ClassVar[bool] = False
    """True when trying again later may succeed without anything else changing."""

    def __init__(self, ref: ArtifactRef, reason: str) -> None:
        super().__init__(f"artifact {ref.label}: {reason}")
        self.ref = ref
        self.reason = reason


class ArtifactUnavailable(ArtifactError):
    """The manager could not be reached or the download broke; what arrived is kept and
    the next `ensure` resumes from there."""

    transient = True


class ManagerRefused(ArtifactError):
    """The manager refused the download (not assigned, not stored, ...): fix it there."""


class DigestMismatch(ArtifactError):
    """The bytes downloaded are not the ones the spec names (size or SHA-256 differ)."""


class ArtifactTooLarge(ArtifactError):
    """Over the daemon's [artifacts] max_bytes."""


class UnpackFailed(ArtifactError):
    """The archive is unsafe, over the unpack limits, or unreadable (daemon.unpack)."""


class _Broken(Exception):
    """A download attempt failed in a way worth retrying (the message says how)."""


@dataclass(frozen=True)
class CacheLimits:
    """What the cache accepts and keeps ([artifacts] of the daemon's config)."""

    max_bytes: int = 1024**3
    """Largest artifact downloaded."""
    max_unpacked_bytes: int = 4 * 1024**3
    """Most bytes one archive may unpack to."""
    max_files: int = 100_000
    """Most entries one archive may unpack to."""
    keep_recent: int = 3
    """Artifacts kept beyond those still referenced: the most recently used ones."""


class ArtifactCache:
    """Artifacts by digest under `root`, fetched with `fetch`."""

    def __init__(
        self,
        root: Path,
        fetch: Fetch,
        limits: CacheLimits | None = None,
        *,
        attempts: int = 3,
        backoff: Backoff | None = None,
    ) -> None:
        self.root = root
        self._fetch = fetch
        self.limits = limits or CacheLimits()
        self._attempts = attempts
        self._backoff = backoff or Backoff(initial=0.5, maximum=5.0)
        self._locks: dict[str, asyncio.Lock] = {}

    # --- where things are ---------------------------------------------------

    def _tree(self, hex_: str) -> Path:
        return self.root / hex_

    def _manifest(self, hex_: str) -> Path:
        return self.root / f"{hex_}.json"

    def _partial(self, hex_: str) -> Path:
        return self.root / "partial" / hex_

    def downloaded(self, ref: ArtifactRef) -> int:
        """Bytes of `ref` downloaded so far (0 when none or when installed)."""
        try:
            return self._partial(_hex(ref)).stat().st_size
        except (OSError, ArtifactError):
            return 0

    def waiting_message(self, ref: ArtifactRef) -> str:
        """'waiting for artifact web 1.4.2 (3.1 MiB of 10.0 MiB)', for an agent not started yet."""
        done = format_size(self.downloaded(ref))
        return f"waiting for artifact {ref.label} ({done} of {format_size(ref.size_bytes)})"

    # --- ensure ---------------------------------------------------------------

    async def ensure(self, ref: ArtifactRef, progress: Progress | None = None) -> Path:
        """The path of `ref`, ready to use: checked if cached, else fetched, verified, unpacked.

        Raises an ArtifactError subclass: ArtifactUnavailable (retry later;
        the download resumes), ManagerRefused, DigestMismatch,
        ArtifactTooLarge, UnpackFailed.
        """
        hex_ = _hex(ref)
        async with self._locks.setdefault(hex_, asyncio.Lock()):
            try:
                ready = await asyncio.to_thread(self._check_installed, ref, hex_)
                if ready is not None:
                    return ready
                if ref.size_bytes > self.limits.max_bytes:
                    raise ArtifactTooLarge(ref, self._too_large(ref.size_bytes))
                await self._download(ref, hex_, progress)
                return await asyncio.to_thread(self._install, ref, hex_)
            except OSError as exc:
                raise ArtifactError(
                    ref, f"the cache at {self.root} is unusable: {exc.strerror or exc}"
                ) from exc

    async def installed(self, ref: ArtifactRef) -> Path | None:
        """The path of `ref` if an intact copy is installed (checked as `ensure` does; a
        damaged one is removed); None otherwise. Never downloads."""
        hex_ = _hex(ref)
        async with self._locks.setdefault(hex_, asyncio.Lock()):
            try:
                return await asyncio.to_thread(self._check_installed, ref, hex_)
            except OSError as exc:
                raise ArtifactError(
                    ref, f"the cache at {self.root} is unusable: {exc.strerror or exc}"
                ) from exc

    def _too_large(self, size: int) -> str:
        return (
            f"{format_size(size)} is over this daemon's limit of"
            f" {format_size(self.limits.max_bytes)} ([artifacts] max_bytes)"
        )

    def _check_installed(self, ref: ArtifactRef, hex_: str) -> Path | None:
        """The installed copy's path if it is intact; a damaged one is removed (None)."""
        tree, manifest_path = self._tree(hex_), self._manifest(hex_)
        try:
            manifest = Manifest.loads(manifest_path.read_text())
        except FileNotFoundError:
            if tree.exists():  # an install that did not finish
                shutil.rmtree(tree, ignore_errors=True)
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problem: str | None = f"its manifest is unreadable ({exc})"
        else:
            problem = verify(tree, manifest)
            if problem is None and manifest.digest != ref.digest:
                problem = f"its manifest is for {manifest.digest}"
        if problem is None:
            os.utime(manifest_path)  # last use, for retain's "most recent"
            return tree / manifest.entry if manifest.entry else tree
        log.warning("artifact %s: the cached copy is damaged (%s); fetching it again", ref.label,
                    problem)  # fmt: skip
        self._remove(hex_)
        return None

    async def _download(self, ref: ArtifactRef, hex_: str, progress: Progress | None) -> None:
        """Leave the verified whole file at partial/<hex>, resuming what is there."""
        part = self._partial(hex_)
        await asyncio.to_thread(part.parent.mkdir, parents=True, exist_ok=True)
        from_zero_again = False
        while True:
            resumed = await self._fetch_all(ref, part, progress)
            actual = await asyncio.to_thread(file_digest, part)
            if actual == ref.digest:
                return
            await asyncio.to_thread(part.unlink, missing_ok=True)
            if resumed and not from_zero_again:
                log.warning(
                    "artifact %s: the resumed download hashes to %s, not %s; the kept part may"
                    " have been damaged, downloading it again from the start",
                    ref.label,
                    actual,
                    ref.digest,
                )
                from_zero_again = True
                continue
            raise DigestMismatch(
                ref,
                f"digest mismatch: the {format_size(ref.size_bytes)} downloaded hash to"
                f" {actual}, the spec says {ref.digest}",
            )

    async def _fetch_all(self, ref: ArtifactRef, part: Path, progress: Progress | None) -> bool:
        """Download until `part` has all `ref.size_bytes`; True if it resumed earlier bytes."""
        resumed = False
        failure = "no attempt was made"
        for attempt in range(self._attempts):
            have = await asyncio.to_thread(_size, part)
            if have > ref.size_bytes:  # not this artifact's beginning
                await asyncio.to_thread(part.unlink)
                have = 0
            resumed = resumed or have > 0
            if have == ref.size_bytes and ref.size_bytes > 0:
                return resumed
            try:
                await self._stream(ref, part, have, progress)
            except _Broken as exc:
                failure = str(exc)
                if attempt + 1 < self._attempts:
                    log.info("artifact %s: %s; retrying", ref.label, failure)
                    await asyncio.sleep(self._backoff.delay(attempt))
            else:
                return resumed
        have = await asyncio.to_thread(_size, part)
        raise ArtifactUnavailable(
            ref,
            f"{failure}; {format_size(have)} of {format_size(ref.size_bytes)} downloaded,"
            " the next attempt resumes from there",
        )

    async def _stream(
        self, ref: ArtifactRef, part: Path, offset: int, progress: Progress | None
    ) -> None:
        """Append DownloadArtifact's pieces from `offset` to `part` until the end."""
        position = offset
        with part.open("ab") as out:
            try:
                pieces = self._fetch(ref.digest, offset)
                async for piece in pieces:
                    if piece.size != ref.size_bytes:
                        raise DigestMismatch(
                            ref,
                            f"size mismatch: the manager has {piece.size} bytes for"
                            f" {ref.digest}, the spec says {ref.size_bytes}",
                        )
                    if piece.offset != position:
                        raise _Broken(f"the manager sent bytes at {piece.offset}, not {position}")
                    if position + len(piece.data) > ref.size_bytes:
                        raise _Broken("the manager sent more bytes than the artifact has")
                    await asyncio.to_thread(out.write, piece.data)
                    position += len(piece.data)
                    if progress is not None:
                        progress(position, ref.size_bytes)
            except FleetError as exc:
                if exc.code in _TRANSIENT:
                    raise _Broken(f"the download broke ({exc.message})") from None
                raise ManagerRefused(
                    ref, f"the manager refused the download: {exc.message}"
                ) from None
            finally:
                await asyncio.to_thread(_flush, out)
        if position < ref.size_bytes:
            raise _Broken(
                f"the download ended at {format_size(position)} of {format_size(ref.size_bytes)}"
            )

    def _install(self, ref: ArtifactRef, hex_: str) -> Path:
        """Unpack (or place) the verified download and write its manifest; its path."""
        part, tree = self._partial(hex_), self._tree(hex_)
        scratch = self.root / "tmp" / f"{hex_}-{secrets.token_hex(4)}"
        scratch.parent.mkdir(parents=True, exist_ok=True)
        if tree.exists():
            shutil.rmtree(tree)
        kind = detect(part)
        if kind == "file":
            name = ref.name or "artifact"
            scratch.mkdir(mode=0o755)
            os.replace(part, scratch / name)
            os.chmod(scratch / name, 0o755)  # noqa: S103  # a single file is often the program
            manifest = Manifest(
                digest=ref.digest,
                kind="file",
                entry=name,
                files={name: (ref.size_bytes, hex_)},
            )
        else:
            limits = UnpackLimits(self.limits.max_unpacked_bytes, self.limits.max_files)
            try:
                manifest = unpack(part, scratch, limits, digest=ref.digest, kind=kind)
            except UnpackRefused as exc:
                part.unlink(missing_ok=True)  # it would be refused again
                raise UnpackFailed(ref, f"the {kind} archive cannot be unpacked: {exc}") from None
            part.unlink()
        os.replace(scratch, tree)
        _write_atomic(self._manifest(hex_), manifest.dumps())
        log.info("artifact %s ready at %s", ref.label, tree)
        return tree / manifest.entry if manifest.entry else tree

    # --- retain -----------------------------------------------------------------

    async def retain(self, refs: Iterable[ArtifactRef]) -> list[str]:
        """Delete what neither `refs` nor the keep_recent most recent use; the digests removed.

        Pass the artifacts of the current and the previous pushed sets, so a
        rollback finds its artifact still here. Downloads and unpacks in
        progress are left alone.
        """
        wanted: set[str] = set()
        for ref in refs:
            with contextlib.suppress(ArtifactError):
                wanted.add(_hex(ref))
        busy = {h for h, lock in self._locks.items() if lock.locked()}
        return await asyncio.to_thread(self._prune, wanted, busy)

    def _prune(self, wanted: set[str], busy: set[str]) -> list[str]:
        if not self.root.exists():
            return []
        installed: dict[str, float] = {}
        for manifest in self.root.glob("*.json"):
            with contextlib.suppress(OSError):
                installed[manifest.stem] = manifest.stat().st_mtime
        spare = sorted((h for h in installed if h not in wanted), key=installed.__getitem__)
        recent = spare[-self.limits.keep_recent :] if self.limits.keep_recent > 0 else []
        keep = wanted | busy | set(recent)
        removed = sorted(h for h in installed if h not in keep)
        for hex_ in removed:
            self._remove(hex_)
        partials = self.root / "partial"
        for part in partials.glob("*") if partials.exists() else ():
            if part.name not in keep:
                part.unlink(missing_ok=True)
        scratch = self.root / "tmp"
        for leftover in scratch.glob("*") if scratch.exists() else ():
            if leftover.name.split("-", 1)[0] not in busy:
                shutil.rmtree(leftover, ignore_errors=True)
        if removed:
            log.info("removed %d artifact(s) no pushed set uses", len(removed))
        return [f"sha256:{h}" for h in removed]

    def _remove(self, hex_: str) -> None:
        self._manifest(hex_).unlink(missing_ok=True)  # first: a half-removed copy is not installed
        shutil.rmtree(self._tree(hex_), ignore_errors=True)


def _hex(ref: ArtifactRef) -> str:
    try:
        ref.check()
    except FleetError as exc:
        raise ArtifactError(ref, f"unusable reference: {exc.message}") from None
    return ref.digest.removeprefix("sha256:")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _flush(out: IO[bytes]) -> None:
    out.flush()
    os.fsync(out.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
