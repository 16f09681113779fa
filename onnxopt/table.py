"""Tables: what a pass adds to the report (a title, columns, rows), and their plain-text rendering.

A pass fills a `Table` with numbers and text; the report prints it with each column's format and
writes the raw values to JSON. Nothing in the core needs to know what a pass's table means.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]
    # Python format specs, one per column ("" for str()); e.g. ".1f" for an SQNR in dB
    formats: list[str] | None = None

    def render(self) -> str:
        formats = self.formats or [""] * len(self.columns)
        cells = [[_cell(value, spec) for value, spec in zip(row, formats)] for row in self.rows]
        body = format_table(cells, self.columns)
        return f"{self.title}\n{body}" if self.title else body

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": list(self.columns), "rows": [list(r) for r in self.rows]}


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return ""
    return format(value, spec) if spec else str(value)


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """Columns padded to width: the first left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
