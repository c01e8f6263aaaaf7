"""`fleet-agent`: run a bundled example agent under fleet-daemon.

    fleet-agent run probe  [--config JSON-or-path] [--log-level info]
    fleet-agent run worker [--config JSON-or-path]

`--config` is the agent's settings until the daemon sends a non-empty
config (the spec's ``config``); a daemon config replaces it. Exit codes:
0 stopped cleanly, 1 the agent failed, 2 bad arguments or the daemon
refused the agent.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

from agent_runtime import EXIT_REFUSED, Agent, run_agent
from agent_runtime.examples import probe, worker
from agent_runtime.examples._follow import load_json_arg

__all__ = ["main"]

_AGENTS: dict[str, tuple[Callable[[Any], Any], Callable[..., Any]]] = {
    "probe": (probe.parse_config, probe.main),
    "worker": (worker.parse_config, worker.main),
}


def _version() -> str:
    try:
        return metadata.version("fleet")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleet-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fleet-agent {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a bundled example agent")
    run.add_argument("agent", choices=sorted(_AGENTS), help="which agent")
    run.add_argument(
        "--config", help="settings as inline JSON or a JSON file, until the daemon sends some"
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the fleet-agent script; returns the exit code."""
    args = _parser().parse_args(argv)
    parse, agent_main = _AGENTS[args.agent]
    default = None
    if args.config is not None:
        try:
            default = parse(load_json_arg(args.config))
        except ValueError as exc:
            print(f"fleet-agent: --config: {exc}", file=sys.stderr)
            return EXIT_REFUSED
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    async def run_main(agent: Agent) -> None:
        await agent_main(agent, default)

    # The bundled agents have no release of their own: they register as the version their
    # spec declares (the daemon passes it), else as the Fleet package they come with.
    version = os.environ.get("FLEET_AGENT_VERSION") or _version()
    return run_agent(run_main, type=args.agent, version=version, configure_logging=False)


if __name__ == "__main__":
    sys.exit(main())
