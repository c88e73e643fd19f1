"""Confusion matrix of a detector: which class each ground-truth object was detected as.

Detections scoring at least a threshold are matched one to one to the ground-truth boxes of their
image at IoU >= 0.5, in two rounds: first detections of the box's own class (these are the true
positives of COCO AP50), then, among what is left, detections of any other class (the
confusions). Within a round, pairs are taken in decreasing IoU order. The matrix, (K + 1, K + 1)
int64 with rows = ground truth and columns = prediction, counts
    [g, p]: a box of class g matched by a detection of class p (the diagonal: correct);
    [g, K]: a box of class g that no detection matched (missed, "background" column);
    [K, p]: a detection of class p that matched no box (false positive, "background" row);
[K, K] stays 0. Detections that match no box but lie mostly (>= the IoU threshold of their
own area) inside a crowd / ignore region are not counted, as COCO ignores them.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from retinanet.analysis.calibration import box_overlap
from retinanet.analysis.tables import write_csv
from retinanet.data.coco import CocoDetection
from retinanet.files import atomic_savefig

BACKGROUND = "background"
_ANNOTATE_UP_TO = 30  # classes; above this, counts are not printed in the cells


def image_confusion(
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    det_boxes: np.ndarray,
    det_labels: np.ndarray,
    num_classes: int,
    iou_threshold: float = 0.5,
    crowd_boxes: np.ndarray | None = None,
) -> np.ndarray:
    """The (K + 1, K + 1) matrix of one image.

    gt_boxes: (G, 4) xyxy; gt_labels: (G,) in [0, K); det_boxes: (D, 4) xyxy in the same pixels;
    det_labels: (D,) in [0, K), detections already filtered by score; crowd_boxes: (C, 4) xyxy.
    """
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    det_boxes = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)
    gt_labels = np.asarray(gt_labels, dtype=np.int64).reshape(-1)
    det_labels = np.asarray(det_labels, dtype=np.int64).reshape(-1)
    iou = box_overlap(gt_boxes, det_boxes, np.zeros(len(det_boxes), bool))  # (G, D)
    over = iou >= iou_threshold
    same_class = gt_labels[:, None] == det_labels[None, :]
    gt_match = np.full(len(gt_boxes), -1)
    det_match = np.full(len(det_boxes), -1)
    for allowed in (over & same_class, over):
        _match_greedy(iou, allowed, gt_match, det_match)

    background = num_classes
    rows = gt_labels  # every box counts once, in its own class's row
    cols = np.full(len(gt_labels), background)
    matched = gt_match >= 0
    cols[matched] = det_labels[gt_match[matched]]
    false_alarm = det_match < 0
    if crowd_boxes is not None and len(crowd_boxes):
        crowd = np.asarray(crowd_boxes, np.float64).reshape(-1, 4)
        # the largest share of each detection's area inside any crowd region
        inside = box_overlap(det_boxes, crowd, np.ones(len(crowd), bool)).max(axis=1)
        false_alarm &= inside < iou_threshold
    rows = np.concatenate([rows, np.full(int(false_alarm.sum()), background)])
    cols = np.concatenate([cols, det_labels[false_alarm]])
    size = num_classes + 1
    counts = np.bincount(rows * size + cols, minlength=size * size)
    return counts.reshape(size, size)


def dataset_confusion(
    dataset: CocoDetection,
    results: list[dict[str, Any]],
    score_threshold: float = 0.5,
    iou_threshold: float = 0.5,
) -> np.ndarray:
    """The matrix summed over the images of `dataset`, from COCO results (dataset category ids,
    xywh boxes in original-image pixels); classes in the dataset's label order."""
    num_classes = dataset.num_classes
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    image_ids, labels, boxes = _results_by_image(dataset, results, score_threshold)
    # Results sorted by image: image j's detections are rows starts[j]:ends[j].
    unique_ids, starts, counts = np.unique(image_ids, return_index=True, return_counts=True)
    detections = {
        int(i): slice(s, s + c) for i, s, c in zip(unique_ids, starts, counts, strict=True)
    }
    for index, image_id in enumerate(dataset.image_ids):  # a loop over images, each vectorised
        target = dataset.annotations(index)
        rows = detections.get(image_id, slice(0, 0))
        matrix += image_confusion(
            target["boxes"],
            target["labels"],
            boxes[rows],
            labels[rows],
            num_classes,
            iou_threshold,
            target["crowd_boxes"],
        )
    return matrix


def write_confusion_csv(path: str | os.PathLike, matrix: np.ndarray, names: Sequence[str]) -> None:
    """Counts with a header row of predicted classes and a first column of ground-truth
    classes, the last row and column being `background`."""
    labels = [*names, BACKGROUND]
    rows = ([label, *row] for label, row in zip(labels, matrix.tolist(), strict=True))
    write_csv(path, ["ground truth \\ predicted", *labels], rows, lineterminator="\n")


def read_confusion_csv(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """(matrix, class names without background) from `write_confusion_csv`'s file."""
    with open(path, encoding="utf-8", newline="") as f:
        header, *rows = list(csv.reader(f))
    matrix = np.array([[int(v) for v in row[1:]] for row in rows], dtype=np.int64)
    return matrix, header[1:-1]


def plot_confusion(
    path: str | os.PathLike,
    matrix: np.ndarray,
    names: Sequence[str],
    score_threshold: float,
    iou_threshold: float = 0.5,
) -> Figure:
    """The matrix with each row normalised to fractions (colour, square-root scale), counts
    written in the cells for up to 30 classes; the figure grows with K so that 80 class names
    stay legible. Written to `path`."""
    labels = [*names, BACKGROUND]
    size = len(labels)
    totals = matrix.sum(axis=1, keepdims=True)
    fractions = matrix / np.maximum(totals, 1)
    inches = max(6.0, 0.2 * size + 2.5)
    font = 8 if size <= _ANNOTATE_UP_TO else 6
    figure = Figure(figsize=(inches, inches), layout="constrained")
    ax = figure.subplots()
    # A square-root colour scale keeps confusions of a few percent visible next to a diagonal
    # near 1; the colour bar shows the fractions themselves.
    image = ax.imshow(fractions, cmap=colormaps["Blues"], norm=PowerNorm(0.5, vmin=0, vmax=1))
    ax.set_xticks(np.arange(size), labels, rotation=90, fontsize=font)
    ax.set_yticks(np.arange(size), labels, fontsize=font)
    ax.set(xlabel="predicted", ylabel="ground truth")
    ax.set_title(
        f"detections with score >= {score_threshold:g} matched at IoU >= {iou_threshold:g} "
        "(colour: fraction of the row)",
        fontsize=9,
    )
    if size <= _ANNOTATE_UP_TO:
        for (g, p), count in np.ndenumerate(matrix):
            if count:
                color = "white" if fractions[g, p] > 0.36 else "black"  # dark cells: sqrt > 0.6
                ax.text(p, g, str(count), ha="center", va="center", fontsize=font, color=color)
    figure.colorbar(image, ax=ax, shrink=0.6)
    atomic_savefig(path, figure, dpi=150 if size > _ANNOTATE_UP_TO else 120)
    return figure


def _match_greedy(
    iou: np.ndarray, allowed: np.ndarray, gt_match: np.ndarray, det_match: np.ndarray
) -> None:
    """Match still-free boxes and detections over `allowed` pairs in decreasing IoU order,
    writing the partner index into gt_match / det_match (-1: free).

    Each round takes every pair that is the best remaining pair of both its box and its
    detection, all at once; the highest remaining pair is always such a pair, so every round
    makes progress and the result is the same as taking one highest pair at a time."""
    score = np.where(allowed, iou, -1.0)
    while True:
        free = (gt_match < 0)[:, None] & (det_match < 0)[None, :]
        candidates = np.where(free, score, -1.0)
        if candidates.size == 0 or candidates.max() < 0:
            return
        best_det = candidates.argmax(axis=1)  # (G,)
        best_gt = candidates.argmax(axis=0)  # (D,)
        gt = np.arange(len(gt_match))
        mutual = (best_gt[best_det] == gt) & (candidates[gt, best_det] >= 0)
        gt_match[gt[mutual]] = best_det[mutual]
        det_match[best_det[mutual]] = gt[mutual]


def _results_by_image(
    dataset: CocoDetection, results: list[dict[str, Any]], score_threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """image ids (R,), dataset labels (R,) and xyxy boxes (R, 4) of the results scoring at least
    `score_threshold`, sorted by image id."""
    if not results:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4))
    scores = np.array([r["score"] for r in results], dtype=np.float64)
    keep = np.flatnonzero(scores >= score_threshold)
    image_ids = np.array([results[i]["image_id"] for i in keep], dtype=np.int64)
    category_ids = [results[i]["category_id"] for i in keep]
    unknown = set(category_ids) - set(dataset.category_id_to_label)
    if unknown:
        raise ValueError(
            f"results use category ids {sorted(unknown)[:10]} that "
            f"{dataset.annotation_file} does not define"
        )
    labels = np.array([dataset.category_id_to_label[c] for c in category_ids], dtype=np.int64)
    xywh = np.array([results[i]["bbox"] for i in keep], dtype=np.float64).reshape(-1, 4)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    order = np.argsort(image_ids, kind="stable")
    return image_ids[order], labels[order], boxes[order]
