"""The console's time to data on a big fleet, next to a bare fetch of what it shows (issue 17).

    .venv/bin/pytest -q -s -m bench tests/browser      # prints the figures

A real manager whose SQLite was seeded with 5,000 nodes and 20,000 agent
states before it started (bench/http_api.py's seeding: the node rows, then
every node's agent states, as the registry and an agent sync store them),
`fleetctl ui` against it, and headless Chromium logged in to the console.

Two pages: the overview (5,000 nodes) and the agents page (20,000 agents).
A page's figure is the time from navigation start to its root getting
`data-ready="true"` (a MutationObserver installed before any page script
notes `performance.now()`, which counts from navigation start). The reference,
measured in the same page after it is ready, is a bare `fetch` of the call
the page's first data comes from, through the same console (ListNodes or
ListAgents, POST `{}`, and `r.json()`): the least any page showing those
must wait. Medians over ROUNDS after a warm-up of each; the ratio is
page/fetch. Printed, and written to test-artifacts/console/time-to-data.json
(the overview) and time-to-data-agents.json; never asserted
(docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from console_helpers import ARTIFACTS, Console, page_selector, shot
from fleetctl_live import LiveFleet, live_fleet
from manager_harness import manager_config
from module_pki import ModulePki
from playwright.sync_api import Page

from bench.http_api import seed

pytestmark = [pytest.mark.bench, pytest.mark.slow]

NODES = 5_000
AGENTS_PER_NODE = 4
ROUNDS = 3
"""Counted rounds of each measurement, after one warm-up round."""

READY_AT = """
window.__fleetReadyAt = {};
new MutationObserver(() => {
  for (const root of document.querySelectorAll('[data-page][data-ready="true"]')) {
    window.__fleetReadyAt[root.dataset.page] ??= performance.now();
  }
}).observe(document, {subtree: true, childList: true, attributes: true});
"""
"""Init script: notes when each page first shows its data (ms since navigation start)."""

FETCH = """
async ([method, key]) => {
  const start = performance.now();
  const r = await fetch(`/v1/fleet.v1.FleetService/${method}`, {
    method: 'POST', headers: {'content-type': 'application/json'}, body: '{}',
  });
  const body = await r.json();
  return {ms: performance.now() - start, status: r.status, count: (body[key] || []).length};
}
"""
"""A bare call through the console, as the page's own scripts would make it: [method, list key]."""

OVERVIEW_SETTLED = """
() => [...document.querySelectorAll('.card .big')].every((big) => big.textContent !== '…')
"""
"""The overview's cards all have their numbers: its calls after the counts answered too."""


@pytest.fixture(scope="module")
def fleet(module_pki: ModulePki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveFleet]:
    """A real manager over a database seeded with NODES nodes and their agents (no daemons).

    Overrides conftest's `fleet`, so `console` and `page` talk to this one.
    """
    root = tmp_path_factory.mktemp("fleet-5000")
    config = manager_config(module_pki, f"sqlite+aiosqlite:///{root / 'm.db'}", root / "state")
    # On a thread: this module's Chromium may already be running, and with it
    # Playwright's loop on the main thread, where asyncio.run would refuse.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, seed(config, NODES, AGENTS_PER_NODE)).result()
    with live_fleet(module_pki, root, clock=time.time) as live:
        yield live


def test_overview_time_to_data_at_5000_nodes(page: Page, console: Console) -> None:
    """The overview shows its first data with 5,000 nodes; figure printed next to a bare fetch."""
    figures = time_to_data(
        page, "#/", "overview", ("ListNodes", "nodes"), NODES, settled=OVERVIEW_SETTLED
    )
    shot(page, "overview-5000-nodes")
    report(figures, "time-to-data.json", "overview", "ListNodes")


def test_agents_page_time_to_data_at_20000_agents(page: Page, console: Console) -> None:
    """The agents page shows 20,000 agents (one ListAgents); figure next to a bare fetch."""
    figures = time_to_data(
        page, "#/agents", "agents", ("ListAgents", "agents"), NODES * AGENTS_PER_NODE
    )
    shot(page, "agents-20000")
    report(figures, "time-to-data-agents.json", "agents page", "ListAgents")


def time_to_data(
    page: Page,
    route: str,
    name: str,
    call: tuple[str, str],
    count: int,
    *,
    settled: str | None = None,
) -> dict[str, Any]:
    """Medians of `name`'s time to data and of a bare `call` (each answering `count` items).

    `settled`: a JS predicate true once the page's later calls answered too;
    each round waits for it, so no round shares the manager with the last.
    """
    page.context.add_init_script(READY_AT)
    page_ms = [open_route(page, route, name, settled) for _ in range(ROUNDS + 1)][1:]
    fetches = [page.evaluate(FETCH, list(call)) for _ in range(ROUNDS + 1)][1:]
    for answer in fetches:
        assert (answer["status"], answer["count"]) == (200, count), answer
    figures = {
        "nodes": NODES,
        "agents": NODES * AGENTS_PER_NODE,
        "rounds": ROUNDS,
        "page_ms": statistics.median(page_ms),
        "fetch_ms": statistics.median(a["ms"] for a in fetches),
        "page_runs_ms": [round(ms, 1) for ms in page_ms],
        "fetch_runs_ms": [round(a["ms"], 1) for a in fetches],
    }
    figures["ratio"] = figures["page_ms"] / figures["fetch_ms"]
    return figures


def report(figures: dict[str, Any], file: str, what: str, call: str) -> None:
    """Write `figures` to test-artifacts/console/`file` and print them in one line."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / file).write_text(json.dumps(figures, indent=2) + "\n")
    print(
        f"\n{what} time to data, {NODES:,} nodes / {NODES * AGENTS_PER_NODE:,} agents"
        f" (median of {ROUNDS}): {figures['page_ms']:,.0f} ms;"
        f" bare {call} fetch: {figures['fetch_ms']:,.0f} ms; ratio {figures['ratio']:.2f}x"
    )


def open_route(page: Page, route: str, name: str, settled: str | None = None) -> float:
    """Load `route` afresh; ms from navigation start until page `name` showed its data."""
    page.goto("about:blank")  # from elsewhere, so the next goto is a full load
    page.goto(f"/{route}")
    page.wait_for_selector(page_selector(name), timeout=30_000)
    ready_at: Any = page.evaluate(f"window.__fleetReadyAt[{json.dumps(name)}]")
    assert isinstance(ready_at, int | float), f"no data-ready time recorded: {ready_at!r}"
    if settled:
        page.wait_for_function(settled, timeout=30_000)
    return float(ready_at)
