"""Predictive entropy of the class scores of foreground and background anchors.

The focal loss bounds from above a cross-entropy minus an entropy term (Mukhoti et al. 2020),
so a model trained with it should leave its sigmoid scores less certain, i.e. of higher entropy,
than one trained with cross-entropy. Per (anchor, class) score p = sigmoid(x) the binary entropy
in nats is H = -p log p - (1 - p) log(1 - p) = p softplus(-x) + (1 - p) softplus(x), computed
from the logit so that it stays finite for any x. An anchor's entropy is the mean over its K
classes."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..files import atomic_savefig
from ..model.matcher import BACKGROUND


def binary_entropy(logits: Tensor) -> Tensor:
    """Elementwise entropy (nats) of sigmoid(logits), in fp32 (float64 stays float64)."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    p = torch.sigmoid(x)
    return p * F.softplus(-x) + (1 - p) * F.softplus(x)


@dataclass
class EntropyTally:
    """Sums of the per-anchor mean class-score entropy over foreground and background anchors
    (ignored anchors and those centred in batch padding are left out)."""

    sums: dict[str, float] = field(default_factory=lambda: {"foreground": 0.0, "background": 0.0})
    counts: dict[str, int] = field(default_factory=lambda: {"foreground": 0, "background": 0})

    def add(self, cls_logits: Tensor, anchor_classes: Tensor, outside: Tensor) -> None:
        """cls_logits (B, A, K); anchor_classes (B, A) from the matcher; outside (B, A) bool,
        anchors to leave out (batch padding)."""
        per_anchor = binary_entropy(cls_logits).mean(-1)
        for name, mask in (
            ("foreground", anchor_classes >= 0),
            ("background", anchor_classes == BACKGROUND),
        ):
            mask = mask & ~outside
            self.sums[name] += float(per_anchor[mask].sum())
            self.counts[name] += int(mask.sum())

    def means(self) -> dict[str, float | int | None]:
        """Mean entropy of foreground and background anchors (None without any) and counts."""
        out: dict[str, float | int | None] = {}
        for name in ("foreground", "background"):
            count = self.counts[name]
            out[name] = self.sums[name] / count if count else None
            out[f"num_{name}"] = count
        return out


def plot_entropy(
    records: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = ""
) -> None:
    """Bars of the mean foreground and background anchor entropy per model; `records` hold
    `model` and `entropy` (as from `EntropyTally.means`)."""
    from matplotlib.figure import Figure

    names = [r["model"] for r in records]
    figure = Figure(figsize=(max(4.0, 0.9 * len(names) + 2), 3.5), layout="constrained")
    ax = figure.subplots()
    width = 0.38
    for offset, kind in ((-width / 2, "foreground"), (width / 2, "background")):
        values = [r["entropy"][kind] or 0.0 for r in records]
        ax.bar([i + offset for i in range(len(names))], values, width, label=kind)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("mean class-score entropy (nats)")
    ax.set_title(title or "predictive entropy of anchors' class scores")
    ax.legend()
    atomic_savefig(path, figure, dpi=150)
