"""A host clock that disagrees with the manager's: ages, offsets and what is said of them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from daemon.manager_link import _same_report
from daemon.sampler import Sampler
from daemon.supervisor.agent import Agent, Context
from daemon.supervisor.clock import ManualClock
from daemon.supervisor.health import Verdict
from daemon.supervisor.spec import AgentSpec
from fleet.clockskew import clock_words, offset_words
from fleet.errors import InvalidArgument
from fleet.v1 import common_pb2, fleet_pb2, manager_pb2
from fleetctl.nodes import clock_text
from manager.service.agents import agent_state_record, on_manager_clock
from manager.service.desired import observe
from manager.service.metrics import missing_metric
from manager.service.validation import validate_timestamp
from manager.storage.agents import steady
from manager.storage.nodes import clock_news
from manager.storage.records import AgentStateRecord, NodeRecord

MANAGER_NOW_MS = 1_796_680_000_000
BEHIND_MS = -600_000  # the node's clock, 10 minutes behind


def _state(**kw: object) -> manager_pb2.AgentState:
    fields: dict[str, object] = {
        "agent_id": "web",
        "status": common_pb2.AGENT_STATUS_RUNNING,
        "pid": 42,
        "health": common_pb2.AGENT_HEALTH_HEALTHY,
        # Stamped on the node's clock 3 s ago: ten minutes and three seconds ago by ours.
        "health_since": MANAGER_NOW_MS + BEHIND_MS - 3000,
        "start_time": MANAGER_NOW_MS + BEHIND_MS - 5000,
    }
    fields.update(kw)
    return manager_pb2.AgentState(**fields)  # type: ignore[arg-type]


def test_an_age_becomes_a_time_on_the_managers_clock() -> None:
    """The receipt time less the age; the daemon's own stamp only without an age."""
    assert on_manager_clock(123, 3000, MANAGER_NOW_MS) == MANAGER_NOW_MS - 3000
    assert on_manager_clock(123, None, MANAGER_NOW_MS) == 123  # an older daemon
    assert on_manager_clock(0, 3000, MANAGER_NOW_MS) == 0  # never: stays never
    assert on_manager_clock(123, -5, MANAGER_NOW_MS) == MANAGER_NOW_MS  # a bad age: now


def test_a_node_10_min_behind_is_judged_healthy_for_3_s_not_10_min() -> None:
    """A rollout sees the agent healthy since its age says, whatever the node's clock."""
    record = agent_state_record(
        "n1", _state(health_age_ms=3000, start_age_ms=5000), received_ms=MANAGER_NOW_MS
    )
    assert record.health_since_ms == MANAGER_NOW_MS - 3000
    assert record.start_time_ms == MANAGER_NOW_MS - 5000
    node = NodeRecord("n1", "h", "127.0.0.1", "linux", "x86_64", {}, "", "", "")
    healthy_since = observe(node, None, record, []).healthy_since
    assert healthy_since is not None
    assert MANAGER_NOW_MS / 1000 - healthy_since == 3.0  # 600 s before the fix
    # Without a health check the process's start counts, re-based the same way.
    plain = agent_state_record(
        "n1",
        _state(health=common_pb2.AGENT_HEALTH_UNSPECIFIED, start_age_ms=5000),
        received_ms=MANAGER_NOW_MS,
    )
    assert observe(node, None, plain, []).healthy_since == (MANAGER_NOW_MS - 5000) / 1000


def test_an_older_daemon_keeps_its_own_times() -> None:
    """No age sent: the stamps are stored as sent (today's behaviour)."""
    record = agent_state_record("n1", _state(), received_ms=MANAGER_NOW_MS)
    assert record.health_since_ms == MANAGER_NOW_MS + BEHIND_MS - 3000
    assert record.start_time_ms == MANAGER_NOW_MS + BEHIND_MS - 5000


def _record(**kw: object) -> AgentStateRecord:
    base = agent_state_record(
        "n1", _state(health_age_ms=3000, start_age_ms=5000), received_ms=MANAGER_NOW_MS
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_rebased_times_that_move_by_the_network_delay_stay_put() -> None:
    """The next report's times, 40 ms later by the delay, keep the stored ones: no event."""
    before = _record()
    after = _record(
        start_time_ms=before.start_time_ms + 40, health_since_ms=before.health_since_ms - 40
    )
    kept = steady(before, after)
    assert (kept.start_time_ms, kept.health_since_ms) == (
        before.start_time_ms,
        before.health_since_ms,
    )
    # A report that waited seconds in the daemon's queue (its age measured when built):
    # the same process still, not a restart.
    late = _record(start_time_ms=before.start_time_ms - 4_000)
    assert steady(before, late).start_time_ms == before.start_time_ms
    # A new process, or health that changed, is news.
    restarted = _record(pid=43, start_time_ms=before.start_time_ms + 40)
    assert steady(before, restarted).start_time_ms == before.start_time_ms + 40
    flipped = _record(health="UNHEALTHY", health_since_ms=before.health_since_ms + 500)
    assert steady(before, flipped).health_since_ms == before.health_since_ms + 500


def test_the_daemon_measures_health_age_on_its_monotonic_clock(tmp_path: Path) -> None:
    """A step of the host's wall clock after the agent turned healthy changes no age."""
    clock = ManualClock(1_700_000_000.0)
    ctx = Context(
        clock=clock,
        log_dir=tmp_path,
        socket_path=tmp_path / "agent.sock",
        sampler=Sampler(),
        changed=lambda agent: None,
        restarted=lambda: None,
    )
    agent = Agent(AgentSpec(id="web", argv=("/bin/true",)), ctx)
    assert agent.snapshot().health_age_ms is None  # never changed
    agent._set_health(Verdict("healthy", ""))
    clock.advance(30)
    clock.step(-600)  # NTP steps the host's clock back ten minutes
    snap = agent.snapshot()
    assert snap.health_age_ms == 30_000
    assert snap.health_since_ms == 1_700_000_000_000  # the wall stamp, as before


def test_a_push_answer_and_the_next_sync_differ_only_in_ages_and_are_the_same_report() -> None:
    """The daemon does not send again a snapshot a push answer carried a moment ago."""
    a = manager_pb2.SyncAgentStatesRequest(node_id="n1", states=[_state(health_age_ms=3000)])
    b = manager_pb2.SyncAgentStatesRequest(node_id="n1", states=[_state(health_age_ms=3400)])
    assert _same_report(a, b)
    c = manager_pb2.SyncAgentStatesRequest(node_id="n1", states=[_state(pid=43)])
    assert not _same_report(a, c)


def test_a_node_crossing_max_clock_skew_is_news_once_each_way() -> None:
    """Beyond the limit: one event; still beyond: none; back within: one; unknown: none."""
    limit = 300_000
    went = clock_news("n1", 1000, BEHIND_MS, limit)
    assert went.startswith(
        "clock of node n1 is beyond max_clock_skew_seconds (300 s): 10m0s behind the manager"
    )
    assert "its metric samples are stored 10m0s in the past" in went
    assert "refused" not in went  # behind: nothing is refused, only misfiled
    assert clock_news("n1", None, BEHIND_MS, limit) == went  # first measured
    assert clock_news("n1", BEHIND_MS, BEHIND_MS - 5000, limit) == ""
    back = clock_news("n1", BEHIND_MS, 1500, limit)
    assert back == (
        "clock of node n1 is back within max_clock_skew_seconds of the manager's"
        " (1.5s ahead of the manager)"
    )
    assert clock_news("n1", 1000, 2000, limit) == ""
    assert clock_news("n1", BEHIND_MS, None, limit) == ""  # an older daemon: unknown


def test_what_a_node_ahead_loses_is_said_in_words() -> None:
    """Ahead past 5 min its metric batches are refused; that is what an operator needs."""
    words = clock_words(432_000)
    assert words.startswith("7m12s ahead of the manager")
    assert "the manager refuses them and the daemon drops each batch" in words
    assert offset_words(-2500) == "2.5s behind the manager"


def test_nodes_show_says_nothing_of_a_clock_in_step_or_unknown() -> None:
    """Within 2 s, or from an older daemon: no Clock line; beyond: how far and the cost."""
    assert clock_text(fleet_pb2.Node(node_id="n1")) == ""
    assert clock_text(fleet_pb2.Node(node_id="n1", clock_offset_ms=-800)) == ""
    text = clock_text(
        fleet_pb2.Node(node_id="n1", clock_offset_ms=-432_000, max_clock_skew_ms=300_000)
    )
    assert text.startswith("7m12s behind the manager (the times it stamps are off by as much")
    assert text.endswith("run NTP on the host")


def test_a_metric_query_with_nothing_names_the_skewed_clock() -> None:
    """No metrics because the node is ahead (refused) or behind (stored in the past)."""
    ahead = missing_metric(
        [], node_id="n1", agent_id="", type="cpu", name="", clock_offset_ms=600_000
    )
    assert ahead is not None
    assert ahead.startswith("n1's clock is 10m0s ahead of the manager: its samples are refused")
    plain = missing_metric([], node_id="n1", agent_id="", type="cpu", name="")
    assert plain == "n1 has no metrics stored (none reported yet, or all past retention)"


def test_a_refused_timestamp_says_how_far_off_in_words() -> None:
    """The message a daemon logs when its batch or heartbeat is refused."""
    with pytest.raises(InvalidArgument) as refused:
        validate_timestamp(
            MANAGER_NOW_MS + 600_000,
            now_ms=MANAGER_NOW_MS,
            max_past_ms=300_000,
            max_future_ms=300_000,
            field="timestamp",
        )
    message = str(refused.value)
    assert "is 10m0s ahead of the manager's clock" in message
    assert "this host's clock is ahead: run NTP" in message
