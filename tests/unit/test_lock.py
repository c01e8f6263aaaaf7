"""requirements.lock pins every dependency pyproject.toml asks for, with hashes.

`make setup` installs only from the lock (`pip install --require-hashes`),
so a dependency added to pyproject.toml without `make lock` would not be
installed at all; this test says which one and what to run.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)")


def locked(lock: str = "requirements.lock") -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) from a lock file."""
    out: dict[str, tuple[str, int]] = {}
    name = ""
    for line in (ROOT / lock).read_text().splitlines():
        match = _PIN.match(line)
        if match:
            name = canonicalize_name(match.group(1))
            out[name] = (match.group(2), 0)
        elif line.strip().startswith("--hash=sha256:") and name:
            version, hashes = out[name]
            out[name] = (version, hashes + 1)
    return out


def wanted(*, dev: bool = True) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *(project["optional-dependencies"]["dev"] if dev else [])]
    return [Requirement(spec) for spec in specs]


def test_every_dependency_is_pinned_with_hashes_and_satisfies_pyproject() -> None:
    """Each pyproject dependency has a pin in the lock that its specifier accepts."""
    pins = locked()
    problems = []
    for req in wanted():
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req.name}: not in requirements.lock (run `make lock`)")
            continue
        version, hashes = pins[name]
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name}: locked {version} does not satisfy {req.specifier}")
        if hashes == 0:
            problems.append(f"{req.name}: no hash in requirements.lock")
    assert problems == []


def test_every_locked_package_has_hashes() -> None:
    """Transitive pins carry hashes too, or pip --require-hashes refuses the whole lock."""
    pins = locked()
    assert len(pins) > 30
    assert [name for name, (_, hashes) in pins.items() if hashes == 0] == []


def test_runtime_lock_is_the_runtime_part_of_the_lock() -> None:
    """requirements-runtime.lock (what `make dist` packs) pins every runtime dependency with
    hashes, at exactly the versions of requirements.lock, and no development tool."""
    full, runtime = locked(), locked("requirements-runtime.lock")
    missing = [r.name for r in wanted(dev=False) if canonicalize_name(r.name) not in runtime]
    assert missing == [], "run `make lock`"
    assert {name: version for name, (version, _) in runtime.items()} == {
        name: full[name][0] for name in runtime
    }
    assert [name for name, (_, hashes) in runtime.items() if hashes == 0] == []
    dev_only = {canonicalize_name(r.name) for r in wanted()} - {
        canonicalize_name(r.name) for r in wanted(dev=False)
    }
    assert sorted(dev_only & runtime.keys()) == []
