"""Per-class precision-recall curves from COCOeval's accumulated precision array.

COCOeval.accumulate() stores `eval["precision"]`: (T, R, K, A, M) = (10 IoU thresholds 0.5:0.95,
101 recall thresholds 0:0.01:1, K categories, 4 area ranges, 3 max-detection limits), the
interpolated precision (the best precision at any recall >= r) at each recall threshold, 0 above
the highest recall reached, and -1 for a category without ground truth. COCO's AP of a category
is the mean of its entries (area "all", 100 detections) over T and R, so the curves drawn here
are exactly what the AP numbers average.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

from retinanet.analysis.tables import write_csv
from retinanet.engine.coco_metrics import PrecisionArray
from retinanet.files import atomic_savefig


@dataclass(frozen=True)
class PRCurves:
    """recall: (R,) recall thresholds; precision50: (K, R) at IoU 0.5; precision: (K, R) mean over
    the IoU thresholds 0.5:0.95; NaN rows for categories without ground truth. ap50 and ap: (K,)
    the means of those rows (COCO's AP50 and AP per category)."""

    category_ids: tuple[int, ...]
    names: tuple[str, ...]
    recall: np.ndarray
    precision50: np.ndarray
    precision: np.ndarray

    @property
    def ap50(self) -> np.ndarray:
        return self.precision50.mean(axis=1)

    @property
    def ap(self) -> np.ndarray:
        return self.precision.mean(axis=1)


def pr_curves(array: PrecisionArray, names: Sequence[str]) -> PRCurves:
    """COCOeval's precision array (`CocoMetrics.precision`; K category names) -> the curves at
    IoU 0.5 and averaged over all T thresholds."""
    precision, iou_thresholds = array.values, array.iou_thresholds
    recall_thresholds, category_ids = array.recall_thresholds, array.category_ids
    iou50 = np.flatnonzero(np.isclose(iou_thresholds, 0.5))
    if len(iou50) != 1:
        raise ValueError(f"IoU thresholds {iou_thresholds.tolist()} do not include 0.5")
    valid = precision > -1
    values = np.where(valid, precision, 0.0)
    count = valid.sum(axis=0)
    averaged = np.where(count > 0, values.sum(axis=0) / np.maximum(count, 1), np.nan)
    at50 = np.where(valid[iou50[0]], precision[iou50[0]], np.nan)
    return PRCurves(
        category_ids=tuple(int(c) for c in category_ids),
        names=tuple(names),
        recall=np.asarray(recall_thresholds, dtype=np.float64),
        precision50=at50.T.astype(np.float64),
        precision=averaged.T.astype(np.float64),
    )


def write_pr_curves_csv(path: str | os.PathLike, curves: PRCurves) -> None:
    """Rows `category_id, name, iou, recall, precision` (iou "0.50" or "0.50:0.95"); categories
    without ground truth are left out."""
    rows = [
        [category_id, name, label, f"{r:.2f}", f"{p:.6f}"]
        for k, (category_id, name) in enumerate(zip(curves.category_ids, curves.names, strict=True))
        for label, values in (("0.50", curves.precision50), ("0.50:0.95", curves.precision))
        if not np.isnan(values[k]).all()
        for r, p in zip(curves.recall, values[k], strict=True)
    ]
    header = ["category_id", "name", "iou", "recall", "precision"]
    write_csv(path, header, rows, lineterminator="\n")


def plot_pr_curves(path: str | os.PathLike, curves: PRCurves) -> Figure:
    """One small panel per category (the first: the mean over categories) with the curves at IoU
    0.5 and 0.5:0.95 and their AP in the title; a grid of ~sqrt(K) columns, so 80 classes stay
    readable. Written to `path`."""
    has_gt = ~np.isnan(curves.precision50).all(axis=1)
    panels = [("all classes (mean)", _mean_rows(curves.precision50), _mean_rows(curves.precision))]
    panels += [
        (name, curves.precision50[k], curves.precision[k])
        for k, name in enumerate(curves.names)
        if has_gt[k]
    ]
    columns = math.ceil(math.sqrt(len(panels)))
    rows = math.ceil(len(panels) / columns)
    width, height = 0.8 + 1.9 * columns, 0.6 + 1.9 * rows
    figure = Figure(figsize=(width, height))
    # Fixed margins in inches (constrained layout takes seconds for 81 panels): room for the
    # axis labels on the left and bottom and for each panel's two-line title.
    spacing = {
        "left": 0.75 / width,
        "right": 1 - 0.1 / width,
        "bottom": 0.5 / height,
        "top": 1 - 0.4 / height,
        "wspace": 0.12,
        "hspace": 0.45,
    }
    grid = figure.subplots(rows, columns, sharex=True, sharey=True, gridspec_kw=spacing)
    axes = np.atleast_1d(grid).ravel()
    small = 7 if columns > 4 else 9
    for ax, (name, p50, p) in zip(axes, panels, strict=False):
        ax.plot(curves.recall, p50, color="tab:blue", lw=1.2, label="IoU 0.5")
        ax.plot(curves.recall, p, color="tab:orange", lw=1.2, label="IoU 0.5:0.95")
        # the mean of a curve is its AP (NaN: no class has ground truth)
        ax.set_title(f"{name}\nAP50 {p50.mean():.3f}  AP {p.mean():.3f}", fontsize=small)
        ax.set(xlim=(0, 1), ylim=(0, 1.02))
        ax.tick_params(labelsize=small - 1)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=small - 1, loc="lower left")
    figure.supxlabel("recall", y=0.1 / height, va="bottom")
    figure.supylabel("interpolated precision", x=0.1 / width)
    atomic_savefig(path, figure, dpi=100)
    return figure


def _mean_rows(values: np.ndarray) -> np.ndarray:
    """Mean over the categories that have ground truth, per recall threshold."""
    valid = ~np.isnan(values).all(axis=1)
    if not valid.any():
        return np.full(values.shape[1], np.nan)
    return values[valid].mean(axis=0)
