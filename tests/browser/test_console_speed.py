"""The overview page's time to data at 5,000 nodes, next to a bare ListNodes fetch (issue 17).

    .venv/bin/pytest -q -s -m bench tests/browser      # prints the figure

A real manager whose SQLite was seeded with 5,000 nodes and 20,000 agent
states before it started (bench/http_api.py's seeding: the node rows, then
every node's agent states, as the registry and an agent sync store them),
`fleetctl ui` against it, and headless Chromium logged in to the console.

The page's figure is the time from navigation start to its root getting
`data-ready="true"` (a MutationObserver installed before any page script
notes `performance.now()`, which counts from navigation start). The reference,
measured in the same page after it is ready, is a bare
`fetch` of ListNodes through the same console (POST `{}`, and `r.json()`):
the least any page showing the nodes must wait. Medians over ROUNDS after a
warm-up of each; the ratio is page/fetch. Printed, and written to
test-artifacts/console/time-to-data.json; never asserted (docs/benchmarks.md).
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
from console_helpers import ARTIFACTS, Console, ModulePki, page_selector, shot
from fleetctl_live import LiveFleet, live_fleet
from manager_harness import manager_config
from playwright.sync_api import Page

from bench.http_api import seed

pytestmark = [pytest.mark.bench, pytest.mark.slow]

NODES = 5_000
AGENTS_PER_NODE = 4
ROUNDS = 3
"""Counted rounds of each measurement, after one warm-up round."""

READY_AT = """
new MutationObserver((_, observer) => {
  if (document.querySelector('[data-page="overview"][data-ready="true"]')) {
    window.__fleetReadyAt = performance.now();
    observer.disconnect();
  }
}).observe(document, {subtree: true, childList: true, attributes: true});
"""
"""Init script: notes when the overview first shows its data (ms since navigation start)."""

FETCH_NODES = """
async () => {
  const start = performance.now();
  const r = await fetch('/v1/fleet.v1.FleetService/ListNodes', {
    method: 'POST', headers: {'content-type': 'application/json'}, body: '{}',
  });
  const body = await r.json();
  return {ms: performance.now() - start, status: r.status, nodes: (body.nodes || []).length};
}
"""
"""A bare ListNodes through the console, as the page's own scripts would make it."""


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
    page.context.add_init_script(READY_AT)
    page_ms = [open_overview(page) for _ in range(ROUNDS + 1)][1:]
    shot(page, "overview-5000-nodes")
    fetches = [page.evaluate(FETCH_NODES) for _ in range(ROUNDS + 1)][1:]
    for answer in fetches:
        assert (answer["status"], answer["nodes"]) == (200, NODES), answer
    figures = {
        "nodes": NODES,
        "agents": NODES * AGENTS_PER_NODE,
        "rounds": ROUNDS,
        "overview_ms": statistics.median(page_ms),
        "list_nodes_fetch_ms": statistics.median(a["ms"] for a in fetches),
        "overview_runs_ms": [round(ms, 1) for ms in page_ms],
        "fetch_runs_ms": [round(a["ms"], 1) for a in fetches],
    }
    figures["ratio"] = figures["overview_ms"] / figures["list_nodes_fetch_ms"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "time-to-data.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(
        f"\noverview time to data, {NODES:,} nodes / {NODES * AGENTS_PER_NODE:,} agents"
        f" (median of {ROUNDS}): {figures['overview_ms']:,.0f} ms;"
        f" bare ListNodes fetch: {figures['list_nodes_fetch_ms']:,.0f} ms;"
        f" ratio {figures['ratio']:.2f}x"
    )


def open_overview(page: Page) -> float:
    """Load the overview afresh; ms from navigation start until it showed its data."""
    page.goto("about:blank")  # from elsewhere, so the next goto is a full load
    page.goto("/#/")
    page.wait_for_selector(page_selector("overview"), timeout=30_000)
    ready_at: Any = page.evaluate("window.__fleetReadyAt")
    assert isinstance(ready_at, int | float), f"no data-ready time recorded: {ready_at!r}"
    return float(ready_at)
