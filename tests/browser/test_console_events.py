"""The console's events page in Chromium, against a real fleet: live, filterable, text only."""

from __future__ import annotations

from console_helpers import Fleetctl, open_page, shot
from playwright.sync_api import Page, expect

ROWS = '[data-page="events"] tbody tr'


def test_the_events_page_lists_the_fleets_events(page: Page) -> None:
    open_page(page, "#/events", "events")
    # conftest's fleet registered two nodes and started their agents.
    expect(page.locator(ROWS).filter(has_text="node node-1 registered")).to_have_count(1)
    expect(page.locator(ROWS).filter(has_text="node-2/")).not_to_have_count(0)
    shot(page, "events")


def test_a_new_event_appears_without_a_reload(page: Page, fleetctl: Fleetctl) -> None:
    open_page(page, "#/events", "events")
    done = fleetctl("nodes", "label", "node-2", "events-test=live")
    assert done.returncode == 0, done.stderr
    try:
        row = page.locator(ROWS).filter(has_text="events-test=live").first
        expect(row).to_be_visible(timeout=10_000)
        expect(row).to_contain_text("operator/alice")
    finally:
        fleetctl("nodes", "label", "node-2", "events-test-")


def test_the_kind_and_text_filters_narrow_the_list(page: Page) -> None:
    open_page(page, "#/events", "events")
    page.get_by_label("Kind").select_option(label="node registered")
    rows = page.locator(ROWS)
    expect(rows).to_have_count(2)  # node-1 and node-2, nothing else
    page.get_by_label("Search").fill("node-2")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("node node-2 registered")
    page.get_by_label("Search").fill("no such thing anywhere")
    expect(rows.first).to_contain_text("No events match.")


def test_filters_come_from_the_address(page: Page) -> None:
    open_page(page, "#/events?kind=EVENT_KIND_NODE_REGISTERED&q=node-1", "events")
    rows = page.locator(ROWS)
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("node node-1 registered")
