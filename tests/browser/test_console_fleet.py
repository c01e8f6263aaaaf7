"""The console's overview, nodes and agents pages in Chromium, against a real fleet.

Besides conftest's two daemons, this module runs `node-3`, whose `talker`
agent prints a `<script>` line to its log (it must show as text), and
reports a quarter hour of host metrics for node-1 (its charts). What a test
changes (a label, an agent's pid) it checks by itself or puts back.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from console_helpers import CONTEXT_OPTIONS, Console, Fleetctl, PageErrors, open_page, shot
from daemon_helpers import agent
from fleet_harness import operator_stub
from fleetctl_live import LiveFleet
from google.protobuf import json_format
from playwright.sync_api import Browser, Locator, Page, expect

from fleet import selectors
from fleet.v1 import common_pb2, fleet_pb2
from fleetctl import nodes as fleetctl_nodes
from manager.storage import AuditRecord, AuditRepository

SCRIPT = "<script>alert(1)</script>"
TALKER = agent(
    "talker",
    "sh",
    "-c",
    f"echo 'before {SCRIPT} after'; echo 'a line on stderr' >&2; exec sleep 1000",
)
"""node-3's agent: a log line that would run as HTML if the console rendered it so."""

METRIC_MINUTES = 15


@pytest.fixture(scope="module")
def talker(fleet: LiveFleet) -> str:
    """node-3 (env=dev) running `talker`; its node id."""
    fleet.start_daemon("node-3", labels={"env": "dev"}, specs=[TALKER])
    # As the manager has it (what fleetctl and the pages read), not only its daemon.
    wait_for_agent(fleet, "node-3", "talker", running, live=False)
    return "node-3"


@pytest.fixture(scope="module")
def metrics(fleet: LiveFleet) -> str:
    """METRIC_MINUTES of host samples of node-1, one a minute, stored; its node id."""
    now = int(time.time() * 1000)
    samples = []
    for i in range(METRIC_MINUTES):
        ts = now - (METRIC_MINUTES - i) * 60_000
        samples += [
            common_pb2.MetricData(type="cpu", timestamp=ts, values={"usage_percent": 20.0 + i}),
            common_pb2.MetricData(
                type="memory",
                timestamp=ts,
                values={"used_bytes": (2 + i / 10) * 2**30, "total_bytes": 8 * 2**30},
            ),
            common_pb2.MetricData(
                type="disk",
                timestamp=ts,
                values={
                    "used_bytes": 40 * 2**30,
                    "total_bytes": 100 * 2**30,
                    "read_bytes": i * 60 * 2**20,  # 1 MiB/s
                    "write_bytes": i * 30 * 2**20,
                },
            ),
            common_pb2.MetricData(
                type="network",
                timestamp=ts,
                values={"bytes_recv": i * 60 * 2**10, "bytes_sent": i * 120 * 2**10},
            ),
        ]
    fleet.report("node-1", samples)
    return "node-1"


def agent_info(
    fleet: LiveFleet, node_id: str, agent_id: str, *, live: bool = True
) -> common_pb2.AgentInfo | None:
    """The agent as its daemon says now (`live`) or as the manager last synced it; None if
    not there (asked as operator alice)."""

    async def ask() -> common_pb2.AgentInfo | None:
        async with operator_stub(fleet.pki, fleet.manager.port) as stub:
            request = fleet_pb2.FleetServiceListAgentsRequest(node_id=node_id, live=live)
            answer = await stub.ListAgents(request, timeout=10)
        found = [a.agent for a in answer.agents if a.agent.id == agent_id]
        return found[0] if found else None

    return fleet.run(ask())


def running(agent: common_pb2.AgentInfo) -> bool:
    """Whether the agent is RUNNING."""
    return agent.status == common_pb2.AGENT_STATUS_RUNNING


def wait_for_agent(
    fleet: LiveFleet,
    node_id: str,
    agent_id: str,
    ok: Callable[[common_pb2.AgentInfo], bool],
    *,
    live: bool = True,
) -> common_pb2.AgentInfo:
    """Ask until `ok(agent)` (15 s at most); the agent then. `live` as in agent_info."""
    deadline = time.monotonic() + 15
    while (found := agent_info(fleet, node_id, agent_id, live=live)) is None or not ok(found):
        assert time.monotonic() < deadline, f"{node_id}/{agent_id} is still {found}"
        time.sleep(0.2)
    return found


def events(fleet: LiveFleet, **request: Any) -> list[fleet_pb2.Event]:
    """The events a WatchEvents `request` (without follow) answers, oldest first."""

    async def ask() -> list[fleet_pb2.Event]:
        async with operator_stub(fleet.pki, fleet.manager.port) as stub:
            asked = fleet_pb2.FleetServiceWatchEventsRequest(**request)
            return [m.event async for m in stub.WatchEvents(asked, timeout=10)]

    return fleet.run(ask())


def audit(fleet: LiveFleet) -> list[AuditRecord]:
    """Every audit entry, newest first."""
    return fleet.run(AuditRepository(fleet.manager.db).list_recent(limit=1000))


@contextmanager
def page_refused_with(
    browser: Browser, console: Console, session: dict[str, Any], status: int
) -> Iterator[Page]:
    """A logged-in page where the manager is expected to refuse a call with `status`.

    Chromium logs every 4xx answer as a console error; this page allows
    exactly those, at least one, and fails on any other error.
    """
    errors = PageErrors()
    context = browser.new_context(**CONTEXT_OPTIONS, storage_state=session, base_url=console.origin)
    errors.watch(context)
    try:
        yield context.new_page()
    finally:
        context.close()
    refused = f"the server responded with a status of {status}"
    others = [e for e in errors.seen if refused not in e]
    assert not others, f"unexpected errors: {others}"
    assert len(errors.seen) > len(others), f"no call was refused with {status}"


# --- overview --------------------------------------------------------------------


def test_overview_counts_nodes_and_agents_and_shows_events(
    page: Page, fleet: LiveFleet, fleetctl: Fleetctl, talker: str
) -> None:
    """The cards count every node and agent as fleetctl does; the last events are listed."""
    nodes = fleetctl.json("nodes", "list")["nodes"]
    agents = fleetctl.json("agents", "list")["agents"]
    open_page(page, "#/", "overview")

    def card(title: str) -> Locator:
        return page.locator(".card", has=page.get_by_role("heading", name=title, exact=True))

    def tally(title: str, word: str) -> Locator:
        return card(title).locator("li", has=page.get_by_text(word, exact=True))

    expect(card("Nodes").locator(".big")).to_have_text(str(len(nodes)))
    online = sum(1 for n in nodes if n["status"] == "ONLINE")
    expect(tally("Nodes", "online")).to_have_text(f"online{online}")
    expect(card("Agents").locator(".big")).to_have_text(str(len(agents)))
    running = sum(1 for a in agents if a["status"] == "RUNNING" and not a["stale"])
    expect(tally("Agents", "running")).to_have_text(f"running{running}")
    unseen = sum(1 for a in agents if a["stale"])
    if unseen:
        expect(tally("Agents", "node offline")).to_have_text(f"node offline{unseen}")
    else:
        expect(tally("Agents", "node offline")).to_have_count(0)
    # The newest events come from the shared feed.
    [newest] = events(fleet, tail=1)
    expect(page.locator("table").last).to_contain_text(newest.message)
    shot(page, "overview")


# --- nodes -----------------------------------------------------------------------


def node_rows(page: Page) -> list[str]:
    """The node ids in the nodes table, in order."""
    return page.locator("tbody tr td:first-child a").all_inner_texts()


def test_nodes_page_lists_the_nodes_a_selector_picks(page: Page, talker: str) -> None:
    """A selector from the URL and one typed into the box each list just the nodes they match."""
    open_page(page, "#/nodes?selector=env%3Dprod", "nodes")
    expect(page.locator("input.selector")).to_have_value("env=prod")
    expect(page.locator("tbody tr")).to_have_count(1)
    assert node_rows(page) == ["node-1"]
    row = page.locator("tbody tr", has_text="node-1")
    expect(row).to_contain_text("online")
    expect(row).to_contain_text("2/2")  # agents running of all
    expect(row).to_contain_text("zone=a")

    page.locator("input.selector").fill("env in (staging, dev), !canary")
    expect(page.locator("tbody tr")).to_have_count(2)
    assert node_rows(page) == ["node-2", talker]
    # The address is updated after the render: wait for it rather than read it once.
    expect(page).to_have_url(
        re.compile(re.escape("selector=env%20in%20(staging%2C%20dev)%2C%20!canary"))
    )
    page.locator("input.selector").fill("")
    expect(page.locator("tbody tr")).to_have_count(3)
    shot(page, "nodes")


def test_a_selector_that_does_not_parse_is_explained_in_place(page: Page, talker: str) -> None:
    """`env in (` shows where and what is wrong, asks the manager nothing, keeps the last list."""
    open_page(page, "#/nodes", "nodes")
    calls: list[str] = []
    page.on("request", lambda r: calls.append(r.url) if "ListNodes" in r.url else None)
    page.locator("input.selector").fill("env in (")
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("position 8: expected a value, ',' or ')', found end of string")
    expect(page.locator("input.selector")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("tbody tr")).to_have_count(3)
    page.wait_for_timeout(500)  # longer than the typing pause: no call may follow
    assert calls == []
    shot(page, "nodes-bad-selector")


def test_a_selector_the_manager_refuses_shows_its_reason(
    browser: Browser, console: Console, console_session: dict[str, Any]
) -> None:
    """A key that breaks the label rules parses, and the manager's INVALID_ARGUMENT is shown."""
    with page_refused_with(browser, console, console_session, 400) as page:
        page.goto("/#/nodes?selector=Bad_%3Dx")
        alert = page.get_by_role("alert")
        expect(alert).to_contain_text("The manager refused the selector")
        expect(alert).to_contain_text("invalid label key 'Bad_'")
        expect(page.locator("tbody")).to_contain_text("No nodes to show.")


SELECTOR_CASES = [
    "",
    "env=prod",
    " env == prod ",
    "env!=prod",
    "env in (a,b), zone notin (c)",
    "!canary,canary2",
    "shards>3,shards<007",
    "k=,j in (),i in (a,,)",
    "a=x,a=y",
    "in=notin,notin in (in)",
    "example.com/tier=web",
    "env in (",
    "env in",
    "env notin a",
    "=x",
    "env=prod,",
    ",",
    "!env=prod",
    "k>x",
    "k>-1",
    "k>",
    "k>99999999999999999999",
    "env in (a b)",
    "env (a)",
    "a=b=c",
    "a=(",
    "k=x 'y'",
]
"""Selectors that parse and ones that do not; none breaks the label rules (those are the
manager's to check)."""


def test_the_console_parses_selectors_as_fleetctl_does(page: Page) -> None:
    """js/selector.js gives the LabelSelector fleet.selectors gives, or the same error."""
    open_page(page, "#/nodes", "nodes")
    results = page.evaluate(
        """async (cases) => {
          const { parseSelector } = await import("/static/js/selector.js");
          return cases.map((text) => {
            try { return { selector: parseSelector(text) }; }
            catch (e) { return { error: e.message, position: e.position }; }
          });
        }""",
        SELECTOR_CASES,
    )
    for text, got in zip(SELECTOR_CASES, results, strict=True):
        want = fleetctl_parse(text)
        if isinstance(want, selectors.Selector):
            assert "selector" in got, f"{text!r}: {got}"
            message = json_format.ParseDict(got["selector"], common_pb2.LabelSelector())
            assert selectors.from_proto(message) == want, text
        else:
            assert got == want, text


def test_the_console_marks_an_offline_nodes_agent_counts_as_fleetctl_does(page: Page) -> None:
    """js/present.js's agentsCell gives nodes list's AGENTS cell: running/total, with a *
    when the node is not online (the counts are what its daemon last reported)."""
    running = fleet_pb2.AgentCount(status=common_pb2.AGENT_STATUS_RUNNING, count=2)
    fatal = fleet_pb2.AgentCount(status=common_pb2.AGENT_STATUS_FATAL, count=1)
    online, offline = common_pb2.NODE_STATUS_ONLINE, common_pb2.NODE_STATUS_OFFLINE
    nodes = [
        fleet_pb2.Node(node_id="a", status=online, agent_counts=[running, fatal]),
        fleet_pb2.Node(node_id="b", status=offline, agent_counts=[running, fatal]),
        fleet_pb2.Node(node_id="c", status=offline),
        fleet_pb2.Node(node_id="d", status=online, agent_counts=[running], revoke_time=1),
    ]
    open_page(page, "#/nodes", "nodes")
    cells = page.evaluate(
        """async (nodes) => {
          const { agentsCell } = await import("/static/js/present.js");
          return nodes.map(agentsCell);
        }""",
        [json_format.MessageToDict(n) for n in nodes],
    )
    assert cells == ["2/3", "2/3*", "0", "2/2*"]
    assert cells == [fleetctl_agents_cell(n) for n in nodes]


def test_the_console_words_a_skewed_clock_as_nodes_show_does(page: Page) -> None:
    """js/present.js's clockText is `fleetctl nodes show`'s Clock line (fleet/clockskew.py):
    nothing within 2 s or when unknown; how far, what it costs, run NTP beyond."""
    offsets: list[int | None] = [None, 800, -2500, 45_300, -600_000, 432_000, 7_300_000]
    nodes = [fleet_pb2.Node(node_id="n", clock_offset_ms=o) for o in offsets]
    open_page(page, "#/nodes", "nodes")
    texts = page.evaluate(
        """async (nodes) => {
          const { clockText } = await import("/static/js/present.js");
          return nodes.map(clockText);
        }""",
        [json_format.MessageToDict(n) for n in nodes],
    )
    assert texts == [fleetctl_nodes.clock_text(n) for n in nodes]
    assert texts[0] == texts[1] == ""
    assert texts[5].startswith("7m12s ahead of the manager (")


def fleetctl_agents_cell(node: fleet_pb2.Node) -> str:
    """`nodes list`'s AGENTS cell for `node`."""
    return fleetctl_nodes.node_row(node, 0, cells=True)["agents_cell"]


def fleetctl_parse(text: str) -> selectors.Selector | dict[str, Any]:
    """`text` as fleetctl parses it: a Selector, or its error as the console reports one."""
    try:
        return selectors.parse(text)
    except selectors.SelectorSyntaxError as exc:
        return {"error": exc.message, "position": exc.position}


# --- one node ----------------------------------------------------------------------


LABEL = "console-fleet"
"""The operator label key this module sets and removes (on node-1)."""


def test_node_page_shows_its_agents_and_charts(page: Page, metrics: str) -> None:
    """Properties, agents linking to their pages, and CPU/memory/disk/network charts."""
    open_page(page, f"#/nodes/{metrics}", "node")
    props = page.locator("dl.props")
    expect(props).to_contain_text("online")
    expect(props).to_contain_text("expires in")
    expect(props).to_contain_text("connected since")  # its daemon's control stream
    agents = page.locator("table", has=page.get_by_role("link", name="worker"))
    expect(agents.get_by_role("link", name="web")).to_have_attribute(
        "href", f"#/agents/{metrics}/web"
    )
    charts = page.locator("figure.chart")
    expect(charts).to_have_count(5)
    for title in ("CPU", "Memory", "Disk space", "Disk I/O", "Network"):
        chart = page.locator(f'figure[data-chart="{title}"]')
        expect(chart.locator("canvas")).to_have_count(1)
    # The value axis and the legend carry units; off the chart the legend shows the newest.
    cpu = page.locator('figure[data-chart="CPU"] .u-legend')
    expect(cpu).to_contain_text("34%")  # 20 + 14, the newest sample
    expect(page.locator('figure[data-chart="Memory"] .u-legend')).to_contain_text("8 GiB")
    expect(page.locator('figure[data-chart="Disk I/O"] .u-legend')).to_contain_text("1 MiB/s")
    # Under the cursor the legend shows the time and the values there (data: the last 15 min).
    plot = page.locator('figure[data-chart="CPU"] .u-over')
    box = plot.bounding_box()
    assert box is not None
    plot.hover(position={"x": box["width"] * 0.9, "y": box["height"] / 2})
    time_cell, cpu_cell = page.locator('figure[data-chart="CPU"] .u-legend .u-value').all()
    expect(time_cell).to_have_text(re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"))
    expect(cpu_cell).to_have_text(re.compile(r"(2\d|3[0-4])%"))
    page.get_by_role("button", name="15 min").click()
    expect(page.get_by_role("button", name="15 min")).to_have_attribute("aria-pressed", "true")
    expect(page.locator('figure[data-chart="CPU"] canvas')).to_have_count(1)
    shot(page, "node")


NARROW = {"width": 390, "height": 844}
"""A phone held upright."""

SPILLED = """() => {
  const width = document.documentElement.clientWidth;
  const bar = document.querySelector("header.top").getBoundingClientRect();
  const out = [];
  for (const e of document.querySelectorAll("header.top a, header.top .who > *")) {
    const r = e.getBoundingClientRect();
    const off = r.right > bar.right + 1 || r.bottom > bar.bottom + 1;
    if (off) out.push(`${e.textContent} off the bar`);
  }
  for (const e of document.querySelectorAll("main *")) {
    const r = e.getBoundingClientRect();
    if (!r.width || r.right <= width + 1) continue;
    let box = e.parentElement, scrolls = false;
    for (; box && !scrolls; box = box.parentElement) {
      const overflow = getComputedStyle(box).overflowX;
      scrolls = (overflow === "auto" || overflow === "scroll")
        && box.getBoundingClientRect().right <= width + 1;
    }
    const what = `${e.tagName.toLowerCase()}.${e.className}`;
    if (!scrolls) out.push(`${what} ends at ${Math.round(r.right)}`);
  }
  return out.slice(0, 5);
}"""
"""What spills out of a narrow window (not inside a box that scrolls), or off the header bar."""


def test_a_narrow_window_keeps_each_page_inside_it(page: Page, metrics: str) -> None:
    """At 390 px the header's links stay on its bar and nothing spills out sideways."""
    page.set_viewport_size(NARROW)
    for route, name in [
        ("#/", "overview"),
        ("#/nodes", "nodes"),
        (f"#/nodes/{metrics}", "node"),  # its labels' table, its charts
        ("#/agents", "agents"),
        ("#/rollouts", "rollouts"),
        ("#/jobs", "jobs"),
        ("#/events", "events"),
    ]:
        open_page(page, route, name)
        assert page.evaluate(SPILLED) == [], route
        shot(page, f"narrow-{name}")


def test_node_labels_are_edited_as_the_operator(
    browser: Browser, console: Console, console_session: dict[str, Any], fleet: LiveFleet
) -> None:
    """A label set and removed in the browser reaches the manager as alice; a bad value is
    refused with the manager's words."""
    with page_refused_with(browser, console, console_session, 400) as page:
        open_page(page, "#/nodes/node-1", "node")
        form = page.locator("form.label-form")
        form.get_by_label("Key").fill(LABEL)
        form.get_by_label("Value").fill("not ok!")
        form.get_by_role("button", name="Set label").click()
        dialog = page.get_by_role("dialog")
        expect(dialog).to_contain_text(f"{LABEL}=not ok!")
        dialog.get_by_role("button", name="Set").click()
        expect(dialog.get_by_role("alert")).to_contain_text("invalid value 'not ok!'")
        dialog.get_by_role("button", name="Cancel").click()

        form.get_by_label("Value").fill("yes")
        form.get_by_role("button", name="Set label").click()
        page.get_by_role("dialog").get_by_role("button", name="Set").click()
        row = page.locator("tr", has_text=LABEL)
        expect(row).to_contain_text("operator")
        expect(row).to_contain_text("yes")
        row.get_by_role("button", name="Remove").click()
        expect(page.get_by_role("dialog")).to_contain_text(LABEL)
        page.get_by_role("dialog").get_by_role("button", name="Remove").click()
        expect(page.locator("tr", has_text=LABEL)).to_have_count(0)
    changes = [
        (a.actor, a.action)
        for a in audit(fleet)
        if a.target == "node-1" and a.action.startswith("nodes.label")
    ]
    assert len(changes) >= 2, changes
    assert {actor for actor, _ in changes} == {"operator/alice"}


# --- agents ----------------------------------------------------------------------


def test_agents_page_filters_by_state_health_and_text(page: Page, talker: str) -> None:
    """Every agent is listed; the filters narrow the table and are kept in the URL."""
    open_page(page, "#/agents", "agents")
    expect(page.locator("tbody tr")).to_have_count(5)
    page.get_by_label("Search").fill("talk")
    expect(page.locator("tbody tr")).to_have_count(1)
    expect(page.locator("tbody tr")).to_contain_text(f"{talker}/talker")
    page.get_by_label("Search").fill("")
    page.get_by_label("State").select_option("fatal")
    expect(page.locator("tbody")).to_contain_text("No agent matches.")
    expect(page).to_have_url(re.compile("state=fatal"))
    page.get_by_label("State").select_option("running")
    page.get_by_label("Health").select_option("none")
    expect(page.locator("tbody tr")).to_have_count(5)
    shot(page, "agents")
    page.get_by_label("Search").fill("web")
    expect(page.locator("tbody tr")).to_have_count(2)
    page.get_by_role("navigation").get_by_role("link", name="Agents").click()
    expect(page.get_by_label("Search")).to_have_value("")  # the link's (empty) filters
    expect(page.locator("tbody tr")).to_have_count(5)


def test_a_killed_agent_is_seen_restarting_live(page: Page, fleet: LiveFleet) -> None:
    """SIGKILL of node-1/worker's process shows on its open page: the kill, then running again."""
    before = wait_for_agent(fleet, "node-1", "worker", running)
    open_page(page, "#/agents/node-1/worker", "agent")
    props = page.locator("dl.props").first
    expect(props).to_contain_text(f"running with pid {before.pid}")
    os.kill(before.pid, signal.SIGKILL)
    changes = page.locator("table", has=page.get_by_role("columnheader", name="Actor"))
    expect(changes).to_contain_text("killed by SIGKILL", timeout=15_000)
    after = wait_for_agent(fleet, "node-1", "worker", lambda a: a.pid not in (0, before.pid))
    expect(props).to_contain_text(f"running with pid {after.pid}", timeout=15_000)
    expect(props).to_contain_text("killed by SIGKILL")  # its last exit
    shot(page, "agent")


def test_a_restart_in_the_browser_reaches_the_daemon_as_the_operator(
    page: Page, fleet: LiveFleet
) -> None:
    """Restart on node-2/web's page, confirmed, restarts its process; audited as alice."""
    before = wait_for_agent(fleet, "node-2", "web", running)
    open_page(page, "#/agents/node-2/web", "agent")
    page.get_by_role("button", name="Restart").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("node-2/web")
    dialog.get_by_role("button", name="Restart").click()
    expect(page.get_by_role("status")).to_contain_text("node-2/web restarted: now")
    after = wait_for_agent(fleet, "node-2", "web", lambda a: running(a) and a.pid != before.pid)
    expect(page.locator("dl.props").first).to_contain_text(f"pid {after.pid}")
    operations = events(fleet, node_id="node-2", kinds=[fleet_pb2.EVENT_KIND_OPERATION])
    [event] = [e for e in operations if e.agent_id == "web"]
    assert event.actor == "operator/alice"
    restarts = [a for a in audit(fleet) if a.target == "node-2/web"]
    assert [(a.actor, a.action) for a in restarts] == [("operator/alice", "agents.restart")]
    # The OPERATION event reaches the open page through the live feed.
    expect(page.locator("table").first).to_contain_text("operator/alice")


def test_an_agent_log_line_with_a_script_tag_is_shown_as_text(page: Page, talker: str) -> None:
    """talker's `<script>` line shows as those characters in its followed log; nothing runs."""
    dialogs: list[str] = []
    page.on("dialog", lambda d: dialogs.append(d.message))
    open_page(page, f"#/agents/{talker}/talker", "agent")
    log = page.locator("pre.log")
    expect(log).to_contain_text(f"before {SCRIPT} after")
    expect(log).to_contain_text("a line on stderr")
    assert page.locator("pre.log script").count() == 0
    assert page.evaluate("document.querySelectorAll('script:not([src])').length") == 0
    assert dialogs == [], "alert() ran"
