"""`fleet-daemon --config PATH`: run the daemon until SIGTERM.

Exit codes: 0 after a clean stop, 2 for a config problem (one line on
stderr naming the file, the key and what is wrong; never a traceback),
1 for any other failure at start.

`fleet-daemon enroll ...` joins the host to a fleet with a join token
(daemon.enroll): 0 enrolled, 1 refused or failed, 2 bad flags.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from fleet.errors import ConfigError, FleetError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet-daemon",
        description="Supervise this host's agents and keep the Fleet manager informed.",
        epilog="To join this host to a fleet first: fleet-daemon enroll --help",
    )
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        help="daemon TOML file (see configs/daemon.toml); FLEET_DAEMON_* variables override it",
    )
    return parser


NO_CONFIG = "; no --config was given (e.g. --config /etc/fleet/daemon.toml)"
"""Said after a config problem when no file was named: the usual cause is the missing flag."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fleet-daemon` script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["enroll"]:
        from daemon.enroll import main as enroll_main  # cryptography: only for this command

        return enroll_main(argv[1:])
    args = _parser().parse_args(argv)
    # Imported here so `--help` works even where the daemon's deps are broken.
    from daemon.config import load_daemon_config
    from daemon.server import DaemonServer
    from fleet.service import setup_logging

    hint = "" if args.config else NO_CONFIG
    try:
        cfg = load_daemon_config(args.config)
    except ConfigError as exc:
        print(f"fleet-daemon: {exc.message}{hint}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, cfg.log_json)
    try:
        asyncio.run(DaemonServer(cfg, config_path=args.config).run())
    except ConfigError as exc:
        print(f"fleet-daemon: {exc.message}{hint}", file=sys.stderr)
        return 2
    except FleetError as exc:
        print(f"fleet-daemon: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
