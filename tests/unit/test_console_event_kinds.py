"""The console's event-kind filter offers every kind the manager writes (fleet.proto)."""

from __future__ import annotations

import re
from pathlib import Path

from fleet.v1 import fleet_pb2

EVENTS_JS = Path(__file__).resolve().parents[2] / "fleetctl/ui/static/js/pages/events.js"


def test_the_filter_lists_every_event_kind() -> None:
    source = EVENTS_JS.read_text()
    block = re.search(r"const KINDS = \[(.*?)\]", source, re.DOTALL)
    assert block is not None, "events.js: no KINDS list"
    listed = re.findall(r'"([A-Z_]+)"', block.group(1))
    kinds = [v.name.removeprefix("EVENT_KIND_") for v in fleet_pb2.EventKind.DESCRIPTOR.values]
    assert sorted(listed) == sorted(k for k in kinds if k != "UNSPECIFIED")
