"""The `helios-rt bench` table: rows with a helios_rt and a diffusers column, their ratio, text and JSON."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .measure import ratio


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        a = abs(value)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{value:,.0f}"
        if a >= 100:
            return f"{value:.1f}"
        if a >= 1:
            return f"{value:.3g}" if a < 10 else f"{value:.2f}".rstrip("0").rstrip(".")
        return f"{value:.3g}"
    return str(value)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[format_value(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row {row} has {len(row)} cells, the table has {len(headers)} columns")
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    out = [] if title is None else [title]
    out += [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


@dataclass
class Row:
    """One line of the `helios-rt bench` table."""

    suite: str
    metric: str
    helios_rt: float | int | str | None
    reference: float | int | str | None = None  # diffusers, where there is one
    unit: str = ""

    @property
    def ratio(self) -> float | None:
        if isinstance(self.helios_rt, (int, float)) and isinstance(self.reference, (int, float)):
            return ratio(float(self.helios_rt), float(self.reference))
        return None


BENCH_HEADERS = ("suite", "metric", "helios_rt", "diffusers", "ratio", "unit")


def format_rows(rows: Sequence[Row], title: str | None = None) -> str:
    return format_table(
        BENCH_HEADERS, [(r.suite, r.metric, r.helios_rt, r.reference, r.ratio, r.unit) for r in rows], title
    )


def rows_json(rows: Sequence[Row]) -> str:
    return json.dumps([{**asdict(r), "ratio": r.ratio} for r in rows], indent=2, allow_nan=False, default=str)
