"""An apply's per-node forecast (`definitions._node_change`), on plain records."""

from __future__ import annotations

from fleet.v1 import common_pb2, desired_pb2
from manager.service.definitions import (
    CheckedDefinition,
    NodeChange,
    _node_change,
    check_definition,
)
from manager.storage.records import AssignmentRecord, RevisionRecord


def checked(argv: str, *, stop_signal: str = "") -> CheckedDefinition:
    agent = common_pb2.AgentSpec(argv=[argv], stop_signal=stop_signal)
    return check_definition(desired_pb2.Definition(name="web", agent=agent))


def revision(number: int, c: CheckedDefinition) -> RevisionRecord:
    return RevisionRecord("web", number, c.body, c.content_hash, "me", "", 0)


def test_each_old_revision_gets_its_own_verdict_when_memoized() -> None:
    """The verdict is memoized per old revision: nodes on different revisions of the
    definition get each their own (unchanged, reconfigure, restart), in any order."""
    new = checked("/bin/web", stop_signal="SIGINT")
    old = {
        ("web", 1): revision(1, new),  # the same content
        ("web", 2): revision(2, checked("/bin/web")),  # only how it is stopped
        ("web", 3): revision(3, checked("/bin/old")),  # another command
    }
    on = {f"n{r}": AssignmentRecord(f"n{r}", "web", r, 0) for r in (1, 2, 3)}
    parsed: dict[tuple[str, int], CheckedDefinition] = {}
    verdicts: dict[tuple[str, int], str] = {}
    got = [
        _node_change(n, new, on[n], old, None, "online", parsed, verdicts)
        for n in ("n3", "n1", "n2", "n3", "n2", "n1")
    ]
    without = [_node_change(n, new, on[n], old, None, "online") for n in ("n3", "n1", "n2")]
    assert [c.action for c in got] == [
        "restart", "unchanged", "reconfigure", "restart", "reconfigure", "unchanged",
    ]  # fmt: skip
    assert got[:3] == without
    assert _node_change("n9", new, None, old, None, "offline", parsed, verdicts) == NodeChange(
        "n9", "add", "offline: converges when it returns"
    )
