"""The best model so far by a validation metric, and early stopping when it stops improving."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

# COCO summary numbers a run can be selected by (all: higher is better).
BestMetric = Literal[
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"
]


@dataclass
class BestModel:
    """metric: the COCO summary number that ranks evaluations; value/iteration: the best so far
    (None/0 before the first evaluation); evaluations_without_improvement: since the best."""

    metric: str = "AP"
    value: float | None = None
    iteration: int = 0
    evaluations_without_improvement: int = 0

    def update(self, iteration: int, numbers: dict[str, float]) -> bool:
        """Record an evaluation at `iteration` (its summary numbers); True if it is the new best.
        NaN (COCO's -1: no ground truth in that area range) is never a best."""
        value = numbers[self.metric]
        if not math.isnan(value) and (self.value is None or value > self.value):
            self.value, self.iteration = float(value), int(iteration)
            self.evaluations_without_improvement = 0
            return True
        self.evaluations_without_improvement += 1
        return False

    def exhausted(self, patience: int) -> bool:
        """True when `patience` > 0 evaluations in a row have not improved on the best."""
        return patience > 0 and self.evaluations_without_improvement >= patience
