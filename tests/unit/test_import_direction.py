"""The four tiers (manager, daemon, agent_runtime, fleetctl) import only `fleet`,
never each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIERS = ("manager", "daemon", "agent_runtime", "fleetctl")
OURS = {"fleet", *TIERS}


def _imported_top_levels(path: Path) -> set[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[tuple[int, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.lineno, node.module.split(".")[0]))
    return found


def _violations(package: str, allowed: set[str]) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for lineno, top in _imported_top_levels(path):
            if top in OURS and top not in allowed:
                bad.append(f"{path.relative_to(ROOT)}:{lineno} imports {top}")
    return bad


@pytest.mark.parametrize("tier", TIERS)
def test_tier_imports_only_fleet(tier: str) -> None:
    """A tier may import `fleet` and itself, but no other tier."""
    assert (ROOT / tier).is_dir()
    assert _violations(tier, {"fleet", tier}) == []


def test_fleet_imports_no_tier() -> None:
    """The shared `fleet` package imports none of the tiers."""
    assert _violations("fleet", {"fleet"}) == []


def test_checker_catches_a_cross_tier_import(tmp_path: Path) -> None:
    """The walker really sees `from daemon... import` in a module (guards the guard)."""
    module = tmp_path / "m.py"
    module.write_text("import os\nfrom daemon.supervisor import x\nimport manager.pool\n")
    assert _imported_top_levels(module) == {(1, "os"), (2, "daemon"), (3, "manager")}
