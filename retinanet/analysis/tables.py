"""Result tables of the analysis tools: a CSV with fractions (empty where undefined) for
programs, and a Markdown table with rounded values for people, written atomically."""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections.abc import Callable, Iterable, Sequence
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


def mean_and_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and standard deviation (n - 1 in the denominator) of the values that are not None
    (a NaN stays in and makes both NaN: a diverged run is not silently dropped); None where
    there are too few (the mean of none, the deviation of fewer than two)."""
    present = [v for v in values if v is not None]
    mean = statistics.fmean(present) if present else None
    return mean, statistics.stdev(present) if len(present) > 1 else None


def mean_std_cell(
    mean: float | None, std: float | None, cell: Callable[[float | None], str]
) -> str:
    """`cell(mean)`, followed by ± `cell(std)` when there is a deviation."""
    return cell(mean) if std is None else f"{cell(mean)} ± {cell(std)}"


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
    write_csv(paths["csv"], columns, (["" if v is None else v for v in row] for row in rows))
    atomic_write_text(paths["markdown"], "\n".join(markdown_lines) + "\n")
    return paths


def write_csv(
    path: str | os.PathLike,
    header: Sequence[Any],
    rows: Iterable[Sequence[Any]],
    lineterminator: str = "\r\n",
) -> None:
    """A CSV file of `header`, then `rows`, written atomically."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator=lineterminator)
        writer.writerow(header)
        writer.writerows(rows)
