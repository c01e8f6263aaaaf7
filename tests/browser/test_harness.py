"""The browser-test machinery itself: Chromium, error collection, screenshots, the fleet.

These need no console page, so they guard the fixtures every console test
stands on: a broken error collector would let every page test pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from console_helpers import ARTIFACTS, NODES, Fleetctl, shot, start_console, watched_page
from playwright.sync_api import Browser, Page

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_chromium_renders_a_page_and_shot_writes_a_png(blank_page: Page) -> None:
    """Debian's Chromium renders HTML, and `shot` saves it under test-artifacts/console/."""
    blank_page.goto("data:text/html,<title>t</title><h1 id=h>Fleet</h1>")
    assert blank_page.inner_text("#h") == "Fleet"
    path = shot(blank_page, "harness-data-url")
    assert path == ARTIFACTS / "harness-data-url.png"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1000


def test_shot_refuses_a_name_that_is_not_a_plain_file_name(blank_page: Page) -> None:
    """A screenshot name with a slash or capitals is refused, naming the rule; nothing written."""
    with pytest.raises(ValueError, match="lowercase letters"):
        shot(blank_page, "../Escape")
    assert not (ARTIFACTS.parent / "Escape.png").exists()


def test_console_errors_and_uncaught_exceptions_fail_the_page(browser: Browser) -> None:
    """console.error and an uncaught exception are both listed when the page is closed."""
    html = (
        "<script>console.error('boom: ' + 40 + 2);"
        " setTimeout(() => { throw new TypeError('bang') }, 0);</script>"
    )
    with pytest.raises(AssertionError, match=r"2 error\(s\)") as failure:
        visit(browser, html)
    message = str(failure.value)
    assert "console.error" in message
    assert "boom: 402" in message
    assert "uncaught TypeError: bang" in message


def test_a_clean_page_passes(browser: Browser) -> None:
    """console.log, warnings and caught exceptions are not errors."""
    html = (
        "<script>console.log('fine'); console.warn('careful');"
        " try { throw new Error('caught') } catch (e) {}</script>"
    )
    visit(browser, html)


def visit(browser: Browser, html: str) -> None:
    """Open `html` in a watched page, give its timers a moment, close it (checking errors)."""
    with watched_page(browser) as page:
        page.goto(f"data:text/html,{html}")
        page.wait_for_timeout(100)


def test_fleet_has_two_daemons_with_their_labels_and_agents(fleetctl: Fleetctl) -> None:
    """`fleet` and `fleetctl`: both daemons registered with their labels, every agent running."""
    nodes = {n["node_id"]: n for n in fleetctl.json("nodes", "list")["nodes"]}
    assert set(nodes) == set(NODES)
    for node_id, (labels, _) in NODES.items():
        assert nodes[node_id]["status"] == "ONLINE"
        assert labels.items() <= nodes[node_id]["labels"].items()
    agents = fleetctl.json("agents", "list")["agents"]
    assert sorted(f"{a['node_id']}/{a['agent_id']}" for a in agents) == sorted(
        f"{node}/{agent}" for node, (_, ids) in NODES.items() for agent in ids
    )
    assert all(a["status"] == "RUNNING" and a["pid"] > 0 for a in agents)


def test_a_console_that_cannot_start_fails_with_its_stderr(tmp_path: Path) -> None:
    """`fleetctl ui` exiting before its URL line fails the test, quoting what it said."""
    missing = tmp_path / "absent.toml"
    with pytest.raises(pytest.fail.Exception, match="before printing its URL") as failure:
        start_console(missing, tmp_path / "ui")
    assert f"{missing}: no such config file" in str(failure.value)
