"""One entry point for every Fleet command: the zipapp `make dist` builds.

A zipapp has a single entry point. The wrappers `install.sh` writes run
``python fleet.pyz fleet-daemon ARGS``; a symlink named after the command
(``fleet-daemon -> fleet.pyz``) works too. The commands are Fleet's own
console scripts (pyproject's ``[project.scripts]``), read from the installed
distribution's entry points, so they are listed once and this module
imports no tier.

``python fleet.pyz --check`` loads every native extension the commands need
and says which one fails on this host's Python; `install.sh` runs it first.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable, Collection, Sequence
from importlib import import_module, metadata
from typing import TextIO

__all__ = ["choose", "fleet_commands", "main", "native_check"]

DISTRIBUTION = "fleet"

# (module, distribution) of every compiled extension the commands load. The
# call after the import makes the library do real work, not just load.
_NATIVE: tuple[tuple[str, str], ...] = (
    ("grpc._cython.cygrpc", "grpcio"),
    ("google._upb._message", "protobuf"),
    ("cryptography.hazmat.bindings._rust", "cryptography"),
    ("_cffi_backend", "cffi"),
    ("psutil._psutil_linux", "psutil"),
    ("greenlet._greenlet", "greenlet"),
    ("sqlalchemy.engine._row_cy", "SQLAlchemy"),
    ("asyncpg.protocol.protocol", "asyncpg"),
    ("pydantic_core._pydantic_core", "pydantic-core"),
    ("yaml._yaml", "PyYAML"),
)


def choose(argv: Sequence[str], commands: Collection[str]) -> tuple[str, list[str]] | None:
    """The command `argv` asks for and its arguments, or None.

    By the name it was run as (a symlink named ``fleetctl``), else by its
    first argument (``fleet.pyz fleetctl nodes list``).
    """
    if not argv:
        return None
    invoked = os.path.basename(argv[0])
    if invoked in commands:
        return invoked, list(argv[1:])
    if len(argv) > 1 and argv[1] in commands:
        return argv[1], list(argv[2:])
    return None


def fleet_commands() -> dict[str, metadata.EntryPoint]:
    """Fleet's console scripts by name."""
    eps = metadata.distribution(DISTRIBUTION).entry_points
    return {ep.name: ep for ep in eps if ep.group == "console_scripts"}


def _exercise() -> None:
    """Make each native library do a little work (a key, a message, a process read)."""
    import grpc
    import psutil
    from cryptography.hazmat.primitives.asymmetric import ec
    from google.protobuf import timestamp_pb2

    ec.generate_private_key(ec.SECP256R1())
    timestamp_pb2.Timestamp(seconds=1).SerializeToString()
    psutil.Process().memory_info()
    grpc.ssl_channel_credentials()


def native_check(out: TextIO) -> int:
    """Load every native extension; 0 and the versions on `out`, else 1 naming what failed."""
    libc, libc_version = platform.libc_ver()
    host = (
        f"{platform.python_implementation()} {platform.python_version()} "
        f"({platform.machine()}, {libc or 'unknown libc'} {libc_version})"
    )
    versions: list[str] = []
    for module, dist in _NATIVE:
        try:
            import_module(module)
        except ImportError as exc:
            print(
                f"fleet: {dist} cannot load its native code ({module}) on {host}: {exc}."
                " The artifact was built for another Python or platform; its file name"
                " says which (see docs/install.md)",
                file=out,
            )
            return 1
        versions.append(f"{dist} {metadata.version(dist)}")
    try:
        _exercise()
    except Exception as exc:  # any failure here is what we report
        print(f"fleet: native libraries loaded but failed to work on {host}: {exc!r}", file=out)
        return 1
    fleet_version = metadata.version(DISTRIBUTION)
    print(f"fleet {fleet_version} on {host}: {', '.join(versions)}: ok", file=out)
    return 0


def _usage(commands: Collection[str]) -> str:
    names = " | ".join(sorted(commands))
    return (
        f"usage: fleet.pyz {{{names}}} [ARGS...]\n"
        "       fleet.pyz --check     load every native extension and print versions\n"
        "       fleet.pyz --version"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the Fleet command `argv` names; its exit code."""
    argv = list(sys.argv if argv is None else argv)
    # Extracted already; agents the daemon starts must not inherit our cache.
    os.environ.pop("SHIV_ROOT", None)
    commands = fleet_commands()
    chosen = choose(argv, commands)
    if chosen is None:
        first = argv[1] if len(argv) > 1 else ""
        if first == "--check":
            return native_check(sys.stdout)
        if first == "--version":
            print(f"fleet {metadata.version(DISTRIBUTION)}")
            return 0
        if first in ("-h", "--help"):
            print(_usage(commands))
            return 0
        what = f"unknown command {first!r}" if first else "no command given"
        print(f"fleet: {what}\n{_usage(commands)}", file=sys.stderr)
        return 2
    name, args = chosen
    # The command reads sys.argv itself (argparse, Typer) and names itself from argv[0].
    sys.argv = [name, *args]
    entry: Callable[[], int | None] = commands[name].load()
    return entry() or 0


if __name__ == "__main__":
    sys.exit(main())
