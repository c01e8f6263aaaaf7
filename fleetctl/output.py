"""Rendering: tables (Rich) for people, JSON and YAML for scripts.

Commands turn replies into plain dicts (`views`) and hand them here with the
columns to show. `table` shows the narrow columns, `wide` all of them;
`json`/`yaml` print every field of every row, untruncated, on stdout only.
Progress, prompts and warnings go to stderr so `-o json | jq` keeps working.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = [
    "Column",
    "OutputFormat",
    "dump",
    "print_object",
    "print_rows",
    "sparkline",
]


class OutputFormat(enum.StrEnum):
    """The -o choices."""

    table = "table"
    wide = "wide"
    json = "json"
    yaml = "yaml"

    @property
    def structured(self) -> bool:
        """True for the machine-readable formats (json, yaml)."""
        return self in (OutputFormat.json, OutputFormat.yaml)


@dataclass(frozen=True)
class Column:
    """One table column."""

    header: str
    """Upper-case title, kubectl style."""
    key: str
    """Key of the row dict this column shows."""
    wide: bool = False
    """Shown only with -o wide."""
    cell: Callable[[Any], str] | None = None
    """Formats the value for the table (default: `_cell`)."""
    style: Callable[[Any], str] | None = None
    """Rich style for the value (e.g. red for FAILED)."""


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def dump(fmt: OutputFormat, data: Any) -> str:
    """`data` (plain dicts/lists/scalars) as JSON or YAML text, ending in a newline."""
    if fmt is OutputFormat.yaml:
        text: str = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1_000_000)
        return text
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def print_rows(
    console: Console,
    fmt: OutputFormat,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Column],
    *,
    empty: str = "No resources found.",
    key: str | None = None,
) -> None:
    """Print `rows` as a table (narrow or wide) or as a JSON/YAML list.

    With `key`, JSON/YAML wrap the list as ``{key: [...]}``.
    """
    if fmt.structured:
        console.out(dump(fmt, {key: list(rows)} if key else list(rows)), end="", highlight=False)
        return
    if not rows:
        console.print(empty, style="dim")
        return
    shown = [c for c in columns if fmt is OutputFormat.wide or not c.wide]
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for col in shown:
        table.add_column(col.header, overflow="fold")
    for row in rows:
        table.add_row(*(_render(col, row.get(col.key)) for col in shown))
    console.print(table)


def _render(col: Column, value: Any) -> Text:
    text = (col.cell or _cell)(value)
    return Text(text, style=col.style(value) if col.style else "")


def print_object(
    console: Console,
    fmt: OutputFormat,
    data: Mapping[str, Any],
    fields: Iterable[tuple[str, str]],
) -> None:
    """One object: "Label: value" lines for people, the whole dict for JSON/YAML."""
    if fmt.structured:
        console.out(dump(fmt, dict(data)), end="", highlight=False)
        return
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, key in fields:
        table.add_row(f"{label}:", _cell(data.get(key)))
    console.print(table)


_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(
    values: Sequence[float | None],
    *,
    width: int | None = None,
    axis: tuple[float, float] | None = None,
) -> str:
    """Unicode block sparkline; None (no data in that bucket) is a blank.

    With `width`, neighbouring values are averaged so the line fits. Heights
    are on `axis` (low, high) when given, else on the values' own range,
    where a flat series draws at the lowest block ("no change" is a flat line).
    """
    if width is not None and width > 0 and len(values) > width:
        values = _shrink(values, width)
    present = [v for v in values if v is not None and math.isfinite(v)]
    if not present:
        return " " * len(values)
    low, high = axis if axis is not None else (min(present), max(present))
    span = high - low
    out = []
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(" ")
        elif span == 0:
            out.append(_BLOCKS[0])
        else:
            level = int((v - low) / span * len(_BLOCKS))
            out.append(_BLOCKS[max(0, min(len(_BLOCKS) - 1, level))])
    return "".join(out)


def _shrink(values: Sequence[float | None], width: int) -> list[float | None]:
    out: list[float | None] = []
    n = len(values)
    for i in range(width):
        chunk = [
            v
            for v in values[i * n // width : (i + 1) * n // width]
            if v is not None and math.isfinite(v)
        ]
        out.append(sum(chunk) / len(chunk) if chunk else None)
    return out
