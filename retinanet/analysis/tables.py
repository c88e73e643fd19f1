"""Result tables of the analysis tools: a CSV with fractions (empty where undefined) for
programs, and a Markdown table with rounded values for people, written atomically."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..files import atomic_open, atomic_write_text

MISSING = "–"


def format_value(value: Any) -> str:
    """A setting's value as a cell: None (null, e.g. no alpha) as "none", floats compactly."""
    if value is None or value == "":
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def percent(value: float | None) -> str:
    """A fraction as a percentage with one decimal; missing or NaN as a dash."""
    return MISSING if value is None or math.isnan(value) else f"{100 * value:.1f}"


def fixed(value: float | None, digits: int) -> str:
    return MISSING if value is None or math.isnan(value) else f"{value:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def write_table(
    output_dir: str | os.PathLike,
    stem: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    markdown_lines: Sequence[str],
) -> dict[str, Path]:
    """`stem`.csv (a header of `columns`, then `rows`; None as empty) and `stem`.md
    (`markdown_lines`) in `output_dir`; returns their paths by kind (csv, markdown)."""
    output_dir = Path(output_dir)
    paths = {"csv": output_dir / f"{stem}.csv", "markdown": output_dir / f"{stem}.md"}
    with atomic_open(paths["csv"], "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(["" if v is None else v for v in row] for row in rows)
    atomic_write_text(paths["markdown"], "\n".join(markdown_lines) + "\n")
    return paths
