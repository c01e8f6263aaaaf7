"""fleetctl's shell completion (Typer's) completes nouns, verbs and choices in a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _complete(words: str, cword: int) -> list[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "_FLEETCTL_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(cword),
    }
    result = subprocess.run(
        [sys.executable, "-c", "from fleetctl.app import main; main()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.split()


@pytest.mark.parametrize(
    ("words", "cword", "expected"),
    [
        ("fleetctl ag", 1, ["agents"]),
        ("fleetctl agents re", 2, ["restart"]),
        ("fleetctl -o j", 2, ["json"]),
        ("fleetctl pki issue ", 3, ["manager", "node", "operator"]),
        ("fleetctl ru", 1, ["run"]),
        ("fleetctl jobs re", 2, ["rerun"]),
        ("fleetctl jobs l", 2, ["list", "logs"]),
    ],
)
def test_bash_completion(words: str, cword: int, expected: list[str]) -> None:
    """Tab completion offers the matching sub-commands and choices."""
    assert _complete(words, cword) == expected
