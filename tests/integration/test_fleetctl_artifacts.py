"""fleetctl artifacts against a real manager: push, list, show, delete, and every refusal.

Each error is one line (`fleetctl: error: ...`) with exit 2 for a wrong
command line or request, 1 for something that failed.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from artifact_helpers import Uses
from fleetctl_live import LiveFleet, live_fleet

from manager.config import ArtifactsConfig


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def uses() -> Uses:
    """Which definitions use which artifact (what the manager is told)."""
    return Uses()


@pytest.fixture
def fleet(pki: Any, tmp_path: Path, uses: Uses) -> Iterator[LiveFleet]:
    """A real manager (artifacts up to 20 MiB) and fleetctl as operator/alice."""
    limits = ArtifactsConfig(max_bytes=20 << 20)
    with live_fleet(pki, tmp_path, artifact_references=uses, config={"artifacts": limits}) as live:
        yield live


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fleetctl: error: "), stderr
    return lines[0].removeprefix("fleetctl: error: ")


def test_push_list_show_delete(fleet: LiveFleet, tmp_path: Path) -> None:
    """The operator's round trip: stored with its digest, listed, shown, deleted."""
    data = b"#!/bin/sh\necho web\n" * 1000
    path = tmp_path / "web.sh"
    path.write_bytes(data)

    pushed = fleet.fleetctl("artifacts", "push", str(path), "--name", "web", "--version", "1.4.2")
    assert pushed.exit_code == 0, pushed.output
    assert pushed.stdout.strip() == f"artifact web 1.4.2 stored: {sha(data)} (18.6 KiB)"

    listed = fleet.fleetctl("artifacts", "list")
    assert listed.exit_code == 0, listed.output
    header, row = listed.stdout.strip().splitlines()
    assert header.split()[:4] == ["NAME", "VERSION", "SIZE", "DIGEST"]
    assert row.split()[:5] == ["web", "1.4.2", "18.6", "KiB", sha(data)[:19]]
    assert "operator/alice" in row

    shown = fleet.fleetctl("artifacts", "show", "web:1.4.2", "-o", "json")
    assert shown.exit_code == 0, shown.output
    view = json.loads(shown.stdout)
    assert (view["digest"], view["size_bytes"], view["actor"]) == (
        sha(data),
        len(data),
        "operator/alice",
    )
    human = fleet.fleetctl("artifacts", "show", "web:1.4.2")
    assert "Used by:  no definition" in human.stdout

    deleted = fleet.fleetctl("artifacts", "delete", "web:1.4.2", "--yes")
    assert deleted.exit_code == 0, deleted.output
    assert deleted.stdout.strip() == "artifact web 1.4.2 deleted"
    empty = fleet.fleetctl("artifacts", "list", "web")
    assert empty.stdout.strip() == "No versions of artifact web."


def test_pushing_again_changes_nothing_and_other_content_is_refused(
    fleet: LiveFleet, tmp_path: Path
) -> None:
    """Same content: exit 0, nothing changed. Other content (8 MiB, refused before the end):
    exit 1 naming both digests, every time. 8 MiB already stored: exit 0 every time."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_bytes(b"first")
    data = random.Random(1).randbytes(8 << 20)
    second.write_bytes(data)
    args = ("artifacts", "push", "--name", "web", "--version", "1")
    assert fleet.fleetctl(*args, str(first)).exit_code == 0
    again = fleet.fleetctl(*args, str(first))
    assert again.exit_code == 0, again.output
    assert again.stdout.strip() == (
        f"artifact web 1 is already stored with this content ({sha(b'first')}); nothing changed"
    )
    for _ in range(5):  # the manager refuses before the last chunk: its reason must show
        refused = fleet.fleetctl(*args, str(second))
        assert refused.exit_code == 1, refused.output
        line = one_error_line(refused.stderr)
        assert line.startswith(f"artifact web 1 is stored with digest {sha(b'first')}")
        assert sha(data) in line
    big = ("artifacts", "push", "--name", "web", "--version", "2", str(second))
    assert fleet.fleetctl(*big).exit_code == 0
    for _ in range(3):  # answered before the last chunk too
        same = fleet.fleetctl(*big)
        assert same.exit_code == 0, same.output
        assert "is already stored with this content" in same.stdout


def test_an_artifact_over_the_managers_limit_is_refused(fleet: LiveFleet, tmp_path: Path) -> None:
    """Over [artifacts] max_bytes: exit 2 with the limit, nothing stored."""
    path = tmp_path / "huge"
    path.write_bytes(bytes(21 << 20))
    result = fleet.fleetctl("artifacts", "push", str(path), "--name", "huge", "--version", "1")
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert line == (
        "upload.size_bytes: 21.0 MiB is over this manager's limit of 20.0 MiB per artifact"
        " ([artifacts] max_bytes)"
    )
    assert fleet.fleetctl("artifacts", "list").stdout.strip() == "No artifacts stored."


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["push", "{missing}", "--name", "web", "--version", "1"], 1, "{missing}: no such file"),
        (["push", "{file}", "--name", "-web", "--version", "1"], 2, "artifact name '-web' must"),
        (["push", "{file}", "--name", "web", "--version", "1 2"], 2, "artifact version '1 2'"),
        (["show", "web"], 2, "'web': give the artifact as NAME:VERSION, e.g. web:1.4.2"),
        (
            ["show", "web:9"],
            1,
            "artifact web 9 is not stored (see `fleetctl artifacts list`)",
        ),
        (
            ["delete", "web:1"],
            2,
            "refusing to delete artifact web 1 (4 B, sha256:",
        ),
        (["delete", "web:9", "--yes"], 1, "artifact web 9 is not stored"),
        (["list", "no/such"], 2, "artifact name 'no/such' must"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_errors_are_one_line(
    fleet: LiveFleet, tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    """Bad arguments, unknown artifacts, an unconfirmed delete: one line, the right exit code."""
    path = tmp_path / "file"
    path.write_bytes(b"data")
    assert fleet.fleetctl("artifacts", "push", str(path), "--name", "web", "--version", "1")
    paths = {"{file}": str(path), "{missing}": str(tmp_path / "missing")}
    result = fleet.fleetctl("artifacts", *[paths.get(a, a) for a in args])
    assert result.exit_code == code, result.output
    assert message.format(missing=paths["{missing}"]) in one_error_line(result.stderr)


def test_a_referenced_artifact_is_not_deleted(fleet: LiveFleet, tmp_path: Path, uses: Uses) -> None:
    """delete names the definitions using it, exits 1, and the artifact stays."""
    path = tmp_path / "file"
    path.write_bytes(b"in use")
    fleet.fleetctl("artifacts", "push", str(path), "--name", "web", "--version", "2")
    uses.uses["web", "2"] = ["web@4"]
    result = fleet.fleetctl("artifacts", "delete", "web:2", "--yes")
    assert result.exit_code == 1, result.output
    assert one_error_line(result.stderr) == (
        "artifact web 2 is used by web@4; change or delete those definitions first"
    )
    shown = fleet.fleetctl("artifacts", "show", "web:2")
    assert "Used by:  web@4" in shown.stdout
