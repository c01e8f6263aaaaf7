"""fleet.launcher: the zipapp's one entry point picks the Fleet command to run."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fleet.launcher import choose, fleet_commands, main

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {"fleet-daemon", "fleetctl", "fleet-manager", "fleet-agent"}


def test_the_first_argument_names_the_command() -> None:
    """`python fleet.pyz fleetctl nodes list` runs fleetctl with `nodes list`."""
    assert choose(["/opt/fleet/lib/fleet.pyz", "fleetctl", "nodes", "list"], COMMANDS) == (
        "fleetctl",
        ["nodes", "list"],
    )


def test_a_symlink_named_after_the_command_names_it() -> None:
    """Run as /usr/local/bin/fleet-daemon, every argument is the daemon's own."""
    assert choose(["/usr/local/bin/fleet-daemon", "fleetctl"], COMMANDS) == (
        "fleet-daemon",
        ["fleetctl"],
    )


@pytest.mark.parametrize(
    "argv",
    [[], ["fleet.pyz"], ["fleet.pyz", "fleet-cli"], ["fleet.pyz", "--help", "fleetctl"]],
)
def test_no_command_or_an_unknown_one_chooses_nothing(argv: list[str]) -> None:
    """Only argv[0]'s name or argv[1] can name a command, and only one that exists."""
    assert choose(argv, COMMANDS) is None


def test_the_commands_are_pyprojects_console_scripts() -> None:
    """The launcher offers exactly [project.scripts], read from the installed metadata."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    found = fleet_commands()
    assert set(found) == set(scripts) == COMMANDS
    assert {name: ep.value for name, ep in found.items()} == scripts


def _launch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet.launcher", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_chosen_command_runs_as_itself() -> None:
    """`fleet-daemon --help` through the launcher is the daemon's own help, exit 0."""
    done = _launch("fleet-daemon", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: fleet-daemon")


def test_an_unknown_command_exits_2_listing_the_commands() -> None:
    """One line naming the bad command, then the usage listing every command."""
    done = _launch("fleet-cli")
    assert (done.returncode, done.stdout) == (2, "")
    lines = done.stderr.splitlines()
    assert lines[0] == "fleet: unknown command 'fleet-cli'"
    assert "{fleet-agent | fleet-daemon | fleet-manager | fleetctl}" in lines[1]


def test_check_loads_every_native_extension() -> None:
    """--check imports grpc, cryptography, psutil, ... and makes each do some work."""
    done = _launch("--check")
    assert done.returncode == 0, done.stdout
    assert done.stdout.startswith("fleet ")
    assert done.stdout.rstrip().endswith(": ok")
    for dist in ("grpcio", "protobuf", "cryptography", "psutil", "greenlet", "asyncpg"):
        assert f"{dist} " in done.stdout


def test_shiv_root_is_not_passed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Agents the daemon starts do not inherit the zipapp's extraction directory."""
    monkeypatch.setenv("SHIV_ROOT", "/opt/fleet/lib/shiv")
    assert main(["fleet.pyz", "--version"]) == 0
    assert "SHIV_ROOT" not in os.environ
