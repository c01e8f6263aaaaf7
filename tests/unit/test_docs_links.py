"""Every relative link in the repository's Markdown resolves inside the repository.

The README once sent readers to a design page outside the checkout; someone
with only the repository must be able to follow every link.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# [text](target) with an optional #anchor; absolute URLs and pure anchors are not files.
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _markdown_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [ROOT / name for name in listed]


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of `page` that do not name a file or directory under `root`."""
    bad = []
    for target in _LINK.findall(page.read_text()):
        path = target.split("#", 1)[0]
        if not path or re.match(r"^[a-z][a-z0-9+.-]*:", path):
            continue  # an anchor on the same page, or a URL
        resolved = (page.parent / path).resolve()
        if not resolved.is_relative_to(root) or not resolved.exists():
            bad.append(f"{page.relative_to(root)}: {target}")
    return bad


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(page: Path) -> None:
    """Each page's relative links point at files that exist in this repository."""
    assert broken_links(page) == []


def test_checker_flags_a_link_outside_the_repository(tmp_path: Path) -> None:
    """A link leaving the checkout is reported, one to a file inside is not (guards the guard)."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "ARCHITECTURE.md").write_text("# outside\n")
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "docs" / "other.md").write_text("# inside\n")
    page = repo / "README.md"
    page.write_text(
        "[design](../shared/ARCHITECTURE.md) [doc](docs/other.md#top) [ok](#anchor)"
        " [web](https://example.org) [gone](docs/missing.md)"
    )
    assert broken_links(page, repo) == [
        "README.md: ../shared/ARCHITECTURE.md",
        "README.md: docs/missing.md",
    ]
