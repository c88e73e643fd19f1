"""The pictures written after an evaluation: per-class precision-recall curves and the confusion
matrix, from the evaluation's COCO results and the dataset's ground truth."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retinanet.analysis.confusion_matrix import (
    dataset_confusion,
    plot_confusion,
    write_confusion_csv,
)
from retinanet.analysis.pr_curves import (
    PRCurves,
    plot_pr_curves,
    pr_curves,
    write_pr_curves_csv,
)
from retinanet.data.coco import CocoDetection
from retinanet.engine.coco_metrics import CocoMetrics

PR_PLOT, PR_CSV = "pr_curves.png", "pr_curves.csv"
CONFUSION_CSV, CONFUSION_PLOT = "confusion_matrix.csv", "confusion_matrix.png"


@dataclass(frozen=True)
class DetectionPlots:
    """What `write_detection_plots` computed; matrix: (K + 1, K + 1) counts (see
    `confusion_matrix`), classes in the dataset's label order."""

    curves: PRCurves
    matrix: np.ndarray
    output_dir: Path


def write_detection_plots(
    output_dir: str | os.PathLike,
    dataset: CocoDetection,
    results: list[dict[str, Any]] | str | os.PathLike,
    metrics: CocoMetrics,
    score_threshold: float = 0.5,
    iou_threshold: float = 0.5,
) -> DetectionPlots:
    """Write pr_curves.png / .csv and confusion_matrix.csv / .png into `output_dir`.

    results: COCO results (dataset category ids, xywh original pixels) as a list or the path of
    a coco_results.json; metrics: their evaluation (its precision array gives the curves, so
    they average to exactly its AP); score_threshold: the confusion matrix counts detections
    scoring at least this (the PR curves use every detection, as COCO AP does).
    """
    if not isinstance(results, list):
        with open(results, encoding="utf-8") as f:
            results = json.load(f)
    output_dir = Path(output_dir)
    if metrics.precision is None:
        raise ValueError("metrics without a precision array (evaluate with evaluate_coco)")
    names = [dataset.coco.cats[c]["name"] for c in metrics.precision.category_ids]
    curves = pr_curves(metrics.precision, names)
    write_pr_curves_csv(output_dir / PR_CSV, curves)
    plot_pr_curves(output_dir / PR_PLOT, curves)

    matrix = dataset_confusion(dataset, results, score_threshold, iou_threshold)
    write_confusion_csv(output_dir / CONFUSION_CSV, matrix, dataset.class_names)
    plot_confusion(
        output_dir / CONFUSION_PLOT, matrix, dataset.class_names, score_threshold, iou_threshold
    )
    return DetectionPlots(curves, matrix, output_dir)
