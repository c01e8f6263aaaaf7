"""Durations ("30s", "5m", "1h30m", "2d") and instants (RFC 3339 or "1h" ago).

Pure: every function takes `now` where it needs one. Errors are ValueError
with a message fit for an operator's terminal; the caller names the option.
"""

from __future__ import annotations

import datetime as dt
import re

__all__ = ["format_age", "format_duration", "format_time", "parse_duration", "parse_instant"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: str) -> float:
    """Seconds in `text`: one or more <number><unit> parts, unit ms, s, m, h, d or w.

    >>> parse_duration("1h30m")
    5400.0
    """
    spec = text.strip().lower()
    if not spec:
        raise ValueError("empty duration; use e.g. 30s, 5m, 1h, 2d")
    total = 0.0
    pos = 0
    for match in _PART.finditer(spec):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(spec):
        raise ValueError(f"{text!r} is not a duration; use e.g. 30s, 5m, 1h, 2d or 1h30m")
    return total


def parse_instant(text: str, *, now: dt.datetime) -> dt.datetime:
    """An absolute time: "now", a duration meaning that long before `now`, or RFC 3339.

    RFC 3339 needs its offset ("2026-01-02T03:04:05Z" or "+02:00"): a local
    time without one would mean different things on different machines.
    """
    spec = text.strip()
    if spec.lower() == "now":
        return now
    try:
        return now - dt.timedelta(seconds=parse_duration(spec))
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(spec)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (30s, 5m, 1h, 2d: that long ago)"
            " nor an RFC 3339 time (2026-01-02T03:04:05Z)"
        ) from None
    if when.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset; append Z or +HH:MM (RFC 3339)")
    return when


def format_time(epoch_ms: int) -> str | None:
    """RFC 3339 UTC with milliseconds for a wire time; None for 0 ("never")."""
    if epoch_ms == 0:
        return None
    when = dt.datetime.fromtimestamp(epoch_ms / 1000, tz=dt.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_duration(seconds: float) -> str:
    """A short human duration: 45s, 3m12s, 5h3m, 2d4h (kubectl's AGE style)."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s" if s % 60 else f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60}m" if s % 3600 >= 60 else f"{s // 3600}h"
    return f"{s // 86400}d{(s % 86400) // 3600}h" if s % 86400 >= 3600 else f"{s // 86400}d"


def format_age(epoch_ms: int, *, now_ms: int) -> str:
    """How long ago a wire time was ("3s ago"); "never" for 0."""
    if epoch_ms == 0:
        return "never"
    delta = (now_ms - epoch_ms) / 1000
    if delta < 0:
        return f"in {format_duration(-delta)}"
    return f"{format_duration(delta)} ago"
