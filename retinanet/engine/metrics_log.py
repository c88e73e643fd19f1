"""The training log: one JSON line per log step in metrics.jsonl, mirrored to TensorBoard, and
the window of loss terms summed on the device between two log steps."""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from ..files import atomic_write_text, json_safe
from .distributed import reduce_mean

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """One JSON line per log step in metrics.jsonl, mirrored to TensorBoard (rank 0 only)."""

    def __init__(self, output_dir: Path, start_iter: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = output_dir / METRICS_FILE
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            # After a resume, lines written past the checkpoint belong to the interrupted run;
            # a line cut short by the crash is dropped too.
            kept = []
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                try:
                    if json.loads(line).get("iteration", 0) <= start_iter:
                        kept.append(line)
                except (json.JSONDecodeError, AttributeError):
                    warnings.warn(
                        f"{self.path}:{number}: dropping an unreadable line", stacklevel=2
                    )
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_iter + 1)

    def write(self, iteration: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"iteration": iteration, **json_safe(dict(values))}) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class LogWindow:
    """The iterations since the last log step: loss terms summed on the device (no host sync
    per iteration), steps taken and skipped, and the seconds spent in all and in data loading."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.steps = 0
        self.taken_steps = 0
        self.data_seconds = 0.0
        self.start = time.perf_counter()

    def add(self, losses: Mapping[str, Tensor], taken: bool, data_seconds: float) -> None:
        if taken:
            for name, value in losses.items():
                self.sums[name] = self.sums.get(name, 0) + value.detach()
            self.taken_steps += 1
        self.steps += 1
        self.data_seconds += data_seconds

    def values(self) -> dict[str, float]:
        """Mean loss terms of the taken steps (averaged over processes),
        seconds per iteration (`time`) and of it waiting for data (`data_time`)."""
        values = {}
        if self.taken_steps:
            values = reduce_mean({k: v / self.taken_steps for k, v in self.sums.items()})
        steps = max(self.steps, 1)
        values["time"] = (time.perf_counter() - self.start) / steps
        values["data_time"] = self.data_seconds / steps
        return values
