"""Allowed values, each defined once where its concept lives and checked against that one
definition by the config and by the code that uses it:
- choices by name: a `Literal` alias (e.g. `NormKind` in retinanet/model/norm.py), checked with
  `check_choice`;
- numeric ranges: an `Interval` constant (e.g. `ALPHA_RANGE` in retinanet/model/losses.py),
  checked with `check_range`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, get_args


def check_choice(value: Any, choices: Any, what: str) -> None:
    """Raise ValueError naming `what` unless `value` is one of the Literal alias `choices`."""
    options = get_args(choices)
    if value not in options:
        raise ValueError(f"{what} must be one of {list(options)}, got {value!r}")


@dataclass(frozen=True)
class Interval:
    """The numbers from `low` to `high`, each end included unless open; `value in interval`."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        high = "pi/2" if self.high == math.pi / 2 else f"{self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {high}{right}"


def check_range(value: float, interval: Interval, what: str) -> None:
    """Raise ValueError naming `what` unless `value` lies in `interval`."""
    if value not in interval:
        raise ValueError(f"{what} must be {interval}, got {value!r}")
