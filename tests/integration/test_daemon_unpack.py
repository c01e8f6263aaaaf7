"""Unpacking artifacts on real files: tar, tar.gz/xz, zip; every unsafe archive refused.

Each refused archive leaves nothing behind: not its directory, and nothing
outside it (a sentinel directory next to it stays empty).
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from artifact_helpers import tar_bytes, zip_bytes

from daemon.unpack import Kind, UnpackLimits, UnpackRefused, detect, unpack, verify

LIMITS = UnpackLimits(max_bytes=1 << 20, max_files=100)
D = "sha256:" + "0" * 64


def tar_with(*members: tuple[tarfile.TarInfo, bytes | None], mode: str = "w") -> bytes:
    """A tar of hand-made members (data for regular files)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tar:  # type: ignore[call-overload]
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


def zip_link(name: str, target: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        info = zipfile.ZipInfo(name)
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, target)
    return out.getvalue()


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "download"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"#!/bin/sh\necho hi\n", "file"),
        (tar_bytes({"a": b"x"}, mode="w"), "tar"),
        (tar_bytes({"a": b"x"}, mode="w:gz"), "tar"),
        (tar_bytes({"a": b"x"}, mode="w:xz"), "tar"),
        (tar_bytes({"a": b"x"}, mode="w:bz2"), "tar"),
        (zip_bytes({"a": b"x"}), "zip"),
        (__import__("gzip").compress(b"just gzip, no tar"), "file"),
        (b"PK but not really a zip", "file"),
    ],
    ids=["script", "tar", "tar.gz", "tar.xz", "tar.bz2", "zip", "plain gzip", "PK text"],
)
def test_the_kind_comes_from_the_content(tmp_path: Path, data: bytes, kind: Kind) -> None:
    """Archives are told apart by their bytes, not their name; anything else is one file."""
    assert detect(write(tmp_path, data)) == kind


def test_a_tar_gz_unpacks_with_modes_links_and_a_manifest(tmp_path: Path) -> None:
    """Files, executable bits, inner links and implicit directories; the manifest matches."""
    data = tar_with(
        (member("./"), None),
        (member("bin/run.sh"), b"#!/bin/sh\n"),
        (member("lib/data.txt"), b"payload"),
        (member("bin/data", tarfile.SYMTYPE, "../lib/data.txt"), None),
        (member("lib/copy.txt", tarfile.LNKTYPE, "lib/data.txt"), None),
        mode="w:gz",
    )
    dest = tmp_path / "tree"
    manifest = unpack(write(tmp_path, data), dest, LIMITS, digest=D, kind="tar")
    assert (dest / "bin" / "data").read_bytes() == b"payload"
    assert (dest / "lib" / "copy.txt").read_bytes() == b"payload"
    assert not (dest / "lib" / "copy.txt").samefile(dest / "lib" / "data.txt")
    assert stat.S_IMODE((dest / "lib" / "data.txt").stat().st_mode) == 0o644
    assert manifest.dirs == {"bin", "lib"}
    assert manifest.links == {"bin/data": "../lib/data.txt"}
    assert set(manifest.files) == {"bin/run.sh", "lib/data.txt", "lib/copy.txt"}
    assert verify(dest, manifest) is None


def test_a_zip_unpacks_with_its_executables(tmp_path: Path) -> None:
    """A zip's files and unix modes come out as written."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        info = zipfile.ZipInfo("tool/run")
        info.external_attr = (stat.S_IFREG | 0o755) << 16
        z.writestr(info, b"#!/bin/sh\n")
        z.writestr("tool/README", b"read me")
    dest = tmp_path / "tree"
    manifest = unpack(write(tmp_path, out.getvalue()), dest, LIMITS, digest=D, kind="zip")
    assert os.access(dest / "tool" / "run", os.X_OK)
    assert not os.access(dest / "tool" / "README", os.X_OK)
    assert verify(dest, manifest) is None


def _fifo() -> tarfile.TarInfo:
    return member("pipe", tarfile.FIFOTYPE)


BAD: dict[str, tuple[Callable[[], bytes], Kind, str]] = {
    "absolute path": (lambda: tar_with((member("/etc/evil"), b"x")), "tar", "an absolute path"),
    "dot-dot": (lambda: tar_with((member("a/../../evil"), b"x")), "tar", "'..'"),
    "link to an absolute path": (
        lambda: tar_with((member("l", tarfile.SYMTYPE, "/etc/passwd"), None)),
        "tar",
        "a link to the absolute path",
    ),
    "link leaving the directory": (
        lambda: tar_with((member("d/l", tarfile.SYMTYPE, "../../x"), None)),
        "tar",
        "outside the artifact",
    ),
    "links chained out": (
        lambda: tar_with(
            (member("b", tarfile.SYMTYPE, "."), None),
            (member("a", tarfile.SYMTYPE, "b/.."), None),
        ),
        "tar",
        "which leads outside",
    ),
    "file through a link": (
        lambda: tar_with(
            (member("sub", tarfile.DIRTYPE), None),
            (member("l", tarfile.SYMTYPE, "sub"), None),
            (member("l/x"), b"x"),
        ),
        "tar",
        "is below 'l', which is a link",
    ),
    "hard link outside": (
        lambda: tar_with((member("h", tarfile.LNKTYPE, "/etc/passwd"), None)),
        "tar",
        "an absolute path",
    ),
    "character device": (
        lambda: tar_with((member("tty", tarfile.CHRTYPE), None)),
        "tar",
        "is a character device",
    ),
    "fifo": (lambda: tar_with((_fifo(), None)), "tar", "is a fifo"),
    "duplicate": (
        lambda: tar_with((member("a"), b"1"), (member("a"), b"2")),
        "tar",
        "appears twice",
    ),
    "too many files": (
        lambda: tar_bytes({f"f{i}": b"" for i in range(101)}),
        "tar",
        "more than 100 entries",
    ),
    "tar bomb": (
        lambda: tar_bytes({"zeros": bytes(2 << 20)}),
        "tar",
        "unpacks to more than 1048576 bytes",
    ),
    "zip bomb": (lambda: zip_bytes({"zeros": bytes(2 << 20)}), "zip", "more than 1048576"),
    "zip dot-dot": (lambda: zip_bytes({"../evil": b"x"}), "zip", "'..'"),
    "zip link outside": (lambda: zip_link("l", "../../etc"), "zip", "outside the artifact"),
    "truncated tar.gz": (
        lambda: tar_bytes({"a": os.urandom(50_000)})[:20_000],
        "tar",
        "not a readable tar archive",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_unsafe_archives_are_refused_and_leave_nothing(tmp_path: Path, case: str) -> None:
    """Escapes, specials, duplicates, bombs, damage: refused naming why; nothing written."""
    make, kind, why = BAD[case]
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = outside / "tree"
    with pytest.raises(UnpackRefused, match=f".*{__import__('re').escape(why)}"):
        unpack(write(tmp_path, make()), dest, LIMITS, digest=D, kind=kind)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    ("damage", "found"),
    [
        (lambda d: (d / "lib" / "data.txt").write_bytes(b"PAYLOAD"), "lib/data.txt was changed"),
        (lambda d: (d / "lib" / "data.txt").write_bytes(b"pay"), "lib/data.txt has 3 bytes"),
        (lambda d: (d / "lib" / "data.txt").unlink(), "file lib/data.txt is missing"),
        (lambda d: (d / "lib" / "new").write_bytes(b""), "lib/new was added"),
        (
            lambda d: (d / "bin" / "data").unlink() or (d / "bin" / "data").symlink_to("/etc"),
            "bin/data is not the link",
        ),
        (lambda d: (d / "extra").mkdir(), "directory extra was added"),
    ],
    ids=["changed", "truncated", "deleted", "added", "relinked", "new directory"],
)
def test_verify_names_what_changed(
    tmp_path: Path, damage: Callable[[Path], object], found: str
) -> None:
    """Any change to an unpacked tree is found, and said in words."""
    data = tar_with(
        (member("lib/data.txt"), b"payload"),
        (member("bin/data", tarfile.SYMTYPE, "../lib/data.txt"), None),
    )
    dest = tmp_path / "tree"
    manifest = unpack(write(tmp_path, data), dest, LIMITS, digest=D, kind="tar")
    damage(dest)
    assert (verify(dest, manifest) or "").startswith(found)
