"""Fixtures of the console's browser tests: a real fleet, `fleetctl ui`, headless Chromium.

Per module (the suite runs `-n 2 --dist loadfile`, so a module's tests share
a worker): a real manager with two real daemons supervising real agents
(`fleet`), an operator's fleetctl config and `fleetctl` as a process
(`fleetctl`), `fleetctl ui` started from that config as a child process
(`console`), and one headless Chromium (`browser`). Per test: a fresh
browser context (`page`) holding the console's session cookie, whose console
errors and uncaught exceptions fail the test at teardown.

Browser test modules are synchronous. While Playwright's sync API runs, the
main thread has a running asyncio loop, so `asyncio.run` there (an async
test, `LiveFleet.fleetctl`'s CliRunner) fails: talk to the manager with
`fleet.run(coro)` (its own loop, in its thread) or `fleetctl` (a process).
That is also why `browser` is per module, not per worker: it must be gone
before the worker's next module, which may be async.

The integration harness (`fleetctl_live`, `manager_harness`, ...) lives in
tests/integration, which pytest puts on sys.path only when it collects tests
from there; this conftest adds it so `pytest tests/browser` alone works.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from console_helpers import (
    CHROMIUM_ARGS,
    CONTEXT_OPTIONS,
    NODES,
    Console,
    Fleetctl,
    require_chromium,
    running_console,
    watched_page,
    write_fleetctl_config,
)
from daemon_helpers import eventually, short_tmp
from fleet_harness import operator_stub  # these two need the path above
from fleetctl_live import LiveFleet, live_fleet
from module_pki import ModulePki
from playwright.sync_api import Browser, Page, sync_playwright

from fleet.pki import CertificateAuthority
from fleet.v1 import common_pb2, fleet_pb2

# --- the fleet -------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_pki(tmp_path_factory: pytest.TempPathFactory) -> ModulePki:
    """A CA for the whole module (the fleet and the console are started once per module)."""
    return ModulePki(CertificateAuthority.create(), tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def fleet(module_pki: ModulePki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveFleet]:
    """A real manager (SQLite) and the daemons of NODES, every agent RUNNING and reported.

    The manager runs on the wall clock, as the console shows ages and times.
    """
    with live_fleet(module_pki, tmp_path_factory.mktemp("fleet"), clock=time.time) as live:
        for node_id, (labels, agents) in NODES.items():
            live.start_daemon(node_id, *agents, labels=labels)
        want = {f"{n}/{a}" for n, (_, agents) in NODES.items() for a in agents}
        wait_for_agents(live, want)
        yield live


def wait_for_agents(live: LiveFleet, want: set[str], within: float = 30.0) -> None:
    """Wait until the manager lists every node/agent of `want` as RUNNING (asked as alice)."""

    async def check() -> None:
        async with operator_stub(live.pki, live.manager.port) as stub:

            async def running() -> set[str]:
                request = fleet_pb2.FleetServiceListAgentsRequest()
                answer = await stub.ListAgents(request, timeout=10)
                return {
                    f"{a.node_id}/{a.agent.id}"
                    for a in answer.agents
                    if a.agent.status == common_pb2.AGENT_STATUS_RUNNING
                }

            await eventually(running, lambda seen: want <= seen, within=within)

    live.run(check(), timeout=within + 10)


@pytest.fixture(scope="module")
def fleetctl_config(fleet: LiveFleet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fleetctl.toml for operator/alice against `fleet`'s manager."""
    path = tmp_path_factory.mktemp("fleetctl") / "fleetctl.toml"
    return write_fleetctl_config(path, fleet.address, fleet.operator)


@pytest.fixture(scope="module")
def fleetctl(fleetctl_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Fleetctl:
    """`fleetctl ARGS` as a process with `fleetctl_config` (the console's operator, alice)."""
    return Fleetctl(fleetctl_config, tmp_path_factory.mktemp("fleetctl-home"))


@pytest.fixture(scope="module")
def console(fleetctl_config: Path) -> Iterator[Console]:
    """`fleetctl ui --no-browser --listen 127.0.0.1:0` as a child; stopped by its pid after."""
    with short_tmp() as workdir, running_console(fleetctl_config, workdir) as running:
        yield running


# --- the browser -----------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Debian Chromium driven by Playwright, one per module (see the module doc).

    Skipped without /usr/bin/chromium (`make test-tools`), failed under CI=true.
    """
    executable = require_chromium()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable, headless=True, args=list(CHROMIUM_ARGS)
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def console_session(browser: Browser, console: Console) -> dict[str, Any]:
    """The console's session cookie, got once by opening its login URL in the browser.

    The URL works once, so every `page` starts from this storage state
    instead of logging in again. Only the navigation is awaited, not the
    page it lands on: that page's errors belong to its own test, not to the
    login of every test in the module.
    """
    context = browser.new_context(**CONTEXT_OPTIONS)
    try:
        response = context.new_page().goto(console.login_url, wait_until="commit")
        assert response is not None
        assert response.url == console.url(), f"login led to {response.url}"
        assert response.ok, f"login answered {response.status}; stderr:\n{console.stderr()}"
        state: dict[str, Any] = dict(context.storage_state())
    finally:
        context.close()
    assert state["cookies"], "the login set no cookie"
    return state


@pytest.fixture
def page(browser: Browser, console: Console, console_session: dict[str, Any]) -> Iterator[Page]:
    """A page logged in to `console` in its own context (relative URLs are the console's).

    Fails the test at teardown if the page logged a console error or threw.
    """
    with watched_page(browser, storage_state=console_session, base_url=console.origin) as opened:
        yield opened


@pytest.fixture
def blank_page(browser: Browser) -> Iterator[Page]:
    """A page in its own context with no console behind it; errors fail the test as `page`'s."""
    with watched_page(browser) as opened:
        yield opened
