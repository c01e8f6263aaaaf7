"""`events.dump_map`: a mapping as canonical JSON text, exactly as `json.dumps` with sorted
keys and compact separators writes it (labels, event attributes and audit details are
compared and looked up by this text, so a byte of difference would matter)."""

from __future__ import annotations

import json
import random

from manager.storage.events import dump_map, load_map

_ALPHABET = "abcXYZ019 _-.:/=\"'\\\t\n\r\x00\x01\x1f\x7f\u00e9\u00ff\u2028\u4e2d\U0001f600\ud800"


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 12)))


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def test_dump_map_is_json_dumps_sorted_and_compact() -> None:
    rng = random.Random(14)
    for _ in range(5000):
        value = {_text(rng): _text(rng) for _ in range(rng.randint(0, 6))}
        assert dump_map(value) == _canonical(value)


def test_dump_map_round_trips_and_takes_any_mapping() -> None:
    assert dump_map({}) == "{}"
    assert dump_map({"b": "2", "a": "1"}) == '{"a":"1","b":"2"}'
    assert load_map(dump_map({"k": "v\u00e9"})) == {"k": "v\u00e9"}
    # Not str -> str (a caller's mistake the encoder tolerated): written as before.
    odd = {"n": 1, "s": "x"}
    assert dump_map(odd) == _canonical(odd)  # type: ignore[arg-type]
