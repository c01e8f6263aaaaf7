"""The examples in docs/agents.md run as written, so the page never rots."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "agents.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture
def doc_modules(tmp_path: Path) -> Iterator[Path]:
    """The 20-line agent of the page saved as count_files.py and importable."""
    agent_block = next(b for b in _blocks() if "count-files" in b and "run_agent" in b)
    (tmp_path / "count_files.py").write_text(agent_block)
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("count_files", None)


def test_the_twenty_line_agent_is_twenty_lines() -> None:
    """The page's promise holds: the example agent fits in 20 lines of code."""
    agent_block = next(b for b in _blocks() if "count-files" in b and "run_agent" in b)
    code = [line for line in agent_block.splitlines() if line.strip()]
    assert len(code) <= 20


async def test_the_fake_daemon_example_passes(doc_modules: Path, tmp_path: Path) -> None:
    """The page's FakeDaemon test, run against the page's agent, passes."""
    test_block = next(b for b in _blocks() if "async def test_counts_the_spool" in b)
    namespace: dict[str, Any] = {}
    exec(compile(test_block, str(DOC), "exec"), namespace)
    spool = tmp_path / "spool"
    spool.mkdir()
    await namespace["test_counts_the_spool"](spool)
