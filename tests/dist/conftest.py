"""Fixtures of the artifact tests: the tarball `make dist` built, and a namespace.

`make test-dist` builds the artifact and names it in FLEET_DIST_TARBALL. The
namespace needs root and `ip netns`: without them these tests skip saying
why, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import os
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import Netns, NetnsUnavailableError, netns

# The real-process manager of the system tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "system"))


def _unusable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"the artifact test must run under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture
def tarball() -> Path:
    """dist/fleet-<version>-<tag>.tar.gz, as `make test-dist` built it."""
    named = os.environ.get("FLEET_DIST_TARBALL", "")
    if not named:
        pytest.skip("FLEET_DIST_TARBALL is not set: run `make test-dist`, which builds it first")
    path = Path(named)
    if not path.is_file():
        pytest.fail(f"FLEET_DIST_TARBALL={named}: no such file")
    return path


@pytest.fixture
def ns() -> Iterator[Netns]:
    """A fresh network namespace whose only peer is the host end of a veth pair."""
    try:
        with netns() as made:
            yield made
    except NetnsUnavailableError as exc:
        _unusable(f"cannot make a network namespace: {exc}")


@pytest.fixture
def unpacked(tarball: Path, tmp_path: Path) -> Path:
    """The tarball's directory, unpacked on the host (for tests that need no namespace)."""
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    (top,) = (tmp_path / "unpacked").iterdir()
    return top
