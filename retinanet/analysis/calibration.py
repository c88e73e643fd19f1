"""Confidence calibration of detections: do scores match how often detections are right?

A detection is *correct* when it is a true positive under the COCO matching rule at one IoU
threshold (see `match_detections_to_gt`). Calibration error is the detection ECE of Küppers et al.
2020 ("Multivariate Confidence Calibration for Object Detection"), confidence only: the
precision of the detections in a confidence bin should equal their mean confidence.

Post-hoc recalibration (temperature scaling, isotonic regression) is fitted on one part of the
images and scored on another, never on the same detections: `split_image_ids` makes the parts.
Splitting by image rather than by detection keeps the correlated detections of one image on
one side.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from retinanet.files import atomic_savefig

# Scores are clipped to [eps, 1 - eps] before taking logits. 1e-12 keeps every distinct float32
# score distinct (float32 steps near 1 are 6e-8), so temperature scaling stays strictly monotone.
LOGIT_EPS = 1e-12

# A fitted temperature below 1 / MAX_INVERSE_TEMPERATURE is treated as a failure: only logits
# that separate correct from wrong detections (almost) perfectly push T towards 0.
MAX_INVERSE_TEMPERATURE = 1e6


class DetectionMatches(NamedTuple):
    """Per detection, in input order: `correct` (N,) bool, a true positive; `ignored` (N,) bool,
    matched only a crowd region, so neither true nor false positive (leave it out of calibration).
    """

    correct: np.ndarray
    ignored: np.ndarray


def match_detections_to_gt(
    det_boxes: np.ndarray,
    det_scores: np.ndarray,
    det_labels: np.ndarray,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    gt_iscrowd: np.ndarray | None = None,
    iou_threshold: float = 0.5,
) -> DetectionMatches:
    """Match the detections of one image to its GT boxes with the COCO rule.

    det_boxes: (N, 4) xyxy pixels; det_scores: (N,); det_labels: (N,) int.
    gt_boxes: (M, 4) xyxy pixels, same frame; gt_labels: (M,) int, same label space;
    gt_iscrowd: (M,) bool, default all False.

    Rule (pycocotools' evaluateImg, area range "all"): classes are matched separately. Within a
    class, detections are taken in descending score order (ties keep input order); each is
    matched to the not-yet-matched non-crowd GT box with the highest IoU >= `iou_threshold`
    (on equal IoU the later GT box, as pycocotools) and is then correct. A detection with no such
    box but whose overlap with a crowd box of its class reaches the threshold is ignored; crowd
    overlap is intersection / detection area, and a crowd box can absorb any number of
    detections. Every other detection is a false positive, including any whose class has no GT.
    Unlike COCOeval there is no cap of 100 detections per image and class.
    """
    det_boxes = _as_boxes(det_boxes, "det_boxes")
    gt_boxes = _as_boxes(gt_boxes, "gt_boxes")
    det_scores = np.asarray(det_scores, dtype=np.float64)
    det_labels = np.asarray(det_labels)
    gt_labels = np.asarray(gt_labels)
    n, m = len(det_boxes), len(gt_boxes)
    gt_iscrowd = np.zeros(m, bool) if gt_iscrowd is None else np.asarray(gt_iscrowd, dtype=bool)
    if det_scores.shape != (n,) or det_labels.shape != (n,):
        raise ValueError(f"det_scores and det_labels must have shape ({n},) like det_boxes")
    if gt_labels.shape != (m,) or gt_iscrowd.shape != (m,):
        raise ValueError(f"gt_labels and gt_iscrowd must have shape ({m},) like gt_boxes")
    if not 0.0 < iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must lie in (0, 1), got {iou_threshold}")

    correct = np.zeros(n, dtype=bool)
    ignored = np.zeros(n, dtype=bool)
    if n == 0 or m == 0:
        return DetectionMatches(correct, ignored)

    overlap = box_overlap(det_boxes, gt_boxes, gt_iscrowd)  # (N, M)
    eligible = (det_labels[:, None] == gt_labels[None, :]) & (overlap >= iou_threshold)
    order = np.argsort(-det_scores, kind="stable")
    # Only detections with some eligible GT box take part in the greedy pass; the rest are
    # false positives already. Taking all classes in one score order is equivalent to taking
    # each class in its own, because a detection only ever competes for boxes of its class.
    candidates = order[eligible[order].any(axis=1)]
    free_regular = ~gt_iscrowd
    for d in candidates:
        available = eligible[d] & free_regular
        if available.any():
            gain = np.where(available, overlap[d], -1.0)
            best = m - 1 - int(np.argmax(gain[::-1]))  # last maximum, as pycocotools
            free_regular[best] = False
            correct[d] = True
        elif (eligible[d] & gt_iscrowd).any():
            ignored[d] = True
    return DetectionMatches(correct, ignored)


@dataclass(frozen=True)
class CalibrationResult:
    """Binned calibration statistics of N detections with confidence >= `min_score`.

    bin_edges: (B + 1,) equal-width edges; bin b holds [edge_b, edge_b+1), the last bin also 1.
    counts: (B,) detections per bin. mean_confidence, precision: (B,), NaN for empty bins.
    d_ece: sum_b counts_b / N * |precision_b - mean_confidence_b|. mce: the largest such gap
    over non-empty bins. brier: mean (confidence - correct)^2 over the same N detections.
    All three are NaN when N = 0.
    """

    bin_edges: np.ndarray
    counts: np.ndarray
    mean_confidence: np.ndarray
    precision: np.ndarray
    d_ece: float
    mce: float
    brier: float
    num_detections: int
    min_score: float


def calibration_metrics(
    confidences: np.ndarray,
    correct: np.ndarray,
    num_bins: int = 10,
    min_score: float = 0.3,
    full_range_bins: bool = False,
) -> CalibrationResult:
    """D-ECE, MCE and Brier score of detections (Küppers et al. 2020, confidence only).

    confidences: (N,) scores in [0, 1]; correct: (N,) bool, true positive or not. Leave ignored
    (crowd) detections out beforehand. Detections below `min_score` are dropped, as a detector
    reports nothing below its score threshold. The `num_bins` equal-width bins split
    [min_score, 1], so that no bin is spent on scores that never occur; with `full_range_bins`
    they split [0, 1] instead, leaving the bins below min_score empty.
    """
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = _as_correct(correct, len(confidences))
    if confidences.ndim != 1:
        raise ValueError(f"confidences must be 1-D, got shape {confidences.shape}")
    if not (np.isfinite(confidences).all() and ((confidences >= 0) & (confidences <= 1)).all()):
        raise ValueError("confidences must be finite and lie in [0, 1]")
    if num_bins < 1:
        raise ValueError(f"num_bins must be at least 1, got {num_bins}")
    if not 0.0 <= min_score < 1.0:
        raise ValueError(f"min_score must lie in [0, 1), got {min_score}")

    kept = confidences >= min_score
    confidences, correct = confidences[kept], correct[kept]
    low = 0.0 if full_range_bins else min_score
    # low + (1 - low) * (k / B) rather than np.linspace: with low = 0 every edge is the double
    # nearest k / B, so a score of exactly min_score (say 0.3) is not put below its edge.
    bin_edges = low + (1.0 - low) * (np.arange(num_bins + 1) / num_bins)
    bin_edges[[0, -1]] = low, 1.0
    # Inner edges only: a score of exactly 1 falls into the last bin.
    bin_index = np.searchsorted(bin_edges[1:-1], confidences, side="right")
    counts = np.bincount(bin_index, minlength=num_bins)
    confidence_sum = np.bincount(bin_index, weights=confidences, minlength=num_bins)
    correct_sum = np.bincount(bin_index, weights=correct.astype(np.float64), minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.where(counts > 0, confidence_sum / counts, np.nan)
        precision = np.where(counts > 0, correct_sum / counts, np.nan)

    n = len(confidences)
    if n == 0:
        d_ece = mce = brier = math.nan
    else:
        gap = np.abs(precision - mean_confidence)[counts > 0]
        d_ece = float(np.sum(counts[counts > 0] / n * gap))
        mce = float(gap.max())
        brier = float(np.mean((confidences - correct) ** 2))
    return CalibrationResult(
        bin_edges=bin_edges,
        counts=counts,
        mean_confidence=mean_confidence,
        precision=precision,
        d_ece=d_ece,
        mce=mce,
        brier=brier,
        num_detections=n,
        min_score=min_score,
    )


def reliability_diagram(result: CalibrationResult, path: str | os.PathLike, title: str) -> None:
    """Write a PNG reliability diagram: per-bin precision (bars) against confidence, the gap to
    the mean confidence of each bin shaded, the diagonal of perfect calibration, D-ECE and MCE
    in the legend, and the detection count per bin in a lower panel."""
    figure = Figure(figsize=(6.0, 7.0), layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg, whatever pyplot backend is configured
    axis, count_axis = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    left = result.bin_edges[:-1]
    width = np.diff(result.bin_edges)
    filled = result.counts > 0
    low = float(result.bin_edges[0])
    bars = {"align": "edge", "edgecolor": "black", "linewidth": 0.5}
    # precision and mean confidence of the non-empty bins
    precision, confidence = result.precision[filled], result.mean_confidence[filled]

    axis.plot([low, 1.0], [low, 1.0], linestyle="--", color="gray", label="perfect calibration")
    axis.bar(left[filled], precision, width[filled], color="tab:blue", label="precision", **bars)
    axis.bar(
        left[filled],
        confidence - precision,
        bottom=precision,
        width=width[filled],
        align="edge",
        color="tab:red",
        alpha=0.3,
        hatch="//",
        edgecolor="tab:red",
        linewidth=0.5,
        label="gap to mean confidence",
    )
    axis.plot(
        confidence,
        precision,
        marker="o",
        color="black",
        markersize=4,
        linewidth=1,
        label="precision at mean confidence",
    )
    scores = Line2D(
        [], [], linestyle="none", label=f"D-ECE {result.d_ece:.4f}, MCE {result.mce:.4f}"
    )
    axis.legend(handles=[*axis.get_legend_handles_labels()[0], scores], loc="upper left")
    axis.set(xlim=(low, 1.0), ylim=(0.0, 1.0), ylabel="precision", title=title)
    if result.num_detections == 0:
        note = f"no detections with score >= {result.min_score:g}"
        axis.text(0.5, 0.5, note, transform=axis.transAxes, ha="center")

    count_axis.bar(left, result.counts, width, color="gray", **bars)
    count_axis.set(xlabel="confidence", ylabel="detections", ylim=(0, max(1, result.counts.max())))
    atomic_savefig(path, figure, dpi=120)


def split_image_ids(
    image_ids: Sequence[int], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split images into (fit_ids, eval_ids), each sorted, with round(fraction * n) images (at
    least one, at most n - 1) to fit a calibrator on. The split depends only on the set of ids and
    the seed, not on their order."""
    ids = np.asarray(image_ids, dtype=np.int64)
    unique = np.unique(ids)
    if len(unique) != len(ids):
        values, counts = np.unique(ids, return_counts=True)
        raise ValueError(f"image id {int(values[counts > 1][0])} appears more than once")
    if len(unique) < 2:
        raise ValueError(f"need at least 2 image ids to split, got {len(unique)}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    num_fit = min(max(round(fraction * len(unique)), 1), len(unique) - 1)
    shuffled = np.random.default_rng(seed).permutation(unique)
    return sorted(shuffled[:num_fit].tolist()), sorted(shuffled[num_fit:].tolist())


def scores_to_logits(scores: np.ndarray) -> np.ndarray:
    """log(s / (1 - s)) of scores (N,) in [0, 1], clipped to [LOGIT_EPS, 1 - LOGIT_EPS]."""
    scores = np.clip(np.asarray(scores, dtype=np.float64), LOGIT_EPS, 1.0 - LOGIT_EPS)
    return np.log(scores) - np.log1p(-scores)


def fit_temperature(logits: np.ndarray, correct: np.ndarray) -> float:
    """Temperature T > 0 minimising the mean binary NLL of sigmoid(logit / T) against `correct`.

    logits: (N,) score logits (`scores_to_logits`); correct: (N,) bool. With b = 1 / T the NLL,
    mean(softplus(b z) - y b z), is convex in b with derivative mean((sigmoid(b z) - y) z), so its
    root is bracketed (doubling from b = 1) and then found by Newton steps that fall back to
    bisection whenever they would leave the bracket. Raises ValueError when no T > 0 exists:
    scores that carry no or negative information (b <= 0) or that separate correct from wrong
    perfectly (b -> infinity).
    """
    z = np.asarray(logits, dtype=np.float64)
    y = _as_correct(correct, len(z)).astype(np.float64)
    if z.ndim != 1 or len(z) == 0 or not np.isfinite(z).all():
        raise ValueError("logits must be a non-empty 1-D array of finite values")

    def slope_and_curvature(b: float) -> tuple[float, float]:
        p = _sigmoid(b * z)
        return float(np.mean((p - y) * z)), float(np.mean(p * (1.0 - p) * z * z))

    if slope_and_curvature(0.0)[0] >= 0.0:
        raise ValueError(
            "scores are not positively related to correctness; no temperature T > 0 fits"
        )
    if (z[y == 1] >= 0).all() and (z[y == 0] <= 0).all():
        raise ValueError(
            "the logits' signs separate correct from wrong detections perfectly; the NLL keeps "
            "falling as T -> 0 and no temperature fits"
        )
    low, high = 0.0, 1.0
    while slope_and_curvature(high)[0] < 0.0:
        low, high = high, 2.0 * high
        if high > MAX_INVERSE_TEMPERATURE:
            raise ValueError(
                f"the fitted temperature is below {1 / MAX_INVERSE_TEMPERATURE:g}: the logits "
                "separate correct from wrong detections almost perfectly"
            )
    b = 0.5 * (low + high)
    for _ in range(200):
        slope, curvature = slope_and_curvature(b)
        if slope == 0.0:
            break
        low, high = (low, b) if slope > 0.0 else (b, high)
        newton = b - slope / curvature if curvature > 0.0 else math.nan
        next_b = newton if low < newton < high else 0.5 * (low + high)
        if abs(next_b - b) <= 1e-12 * b:
            b = next_b
            break
        b = next_b
    return 1.0 / b


def apply_temperature(scores: np.ndarray, temperature: float) -> np.ndarray:
    """sigmoid(logit(s) / T) of scores (N,) in [0, 1], as float64.

    The map is strictly increasing on [LOGIT_EPS, 1 - LOGIT_EPS], so it keeps the ranking and
    COCO AP. Floating point can still merge scores into ties at the ends: sharpening (T < 1)
    takes 1 - s to about (1 - s) ** (1 / T), which rounds to 0 in float64 once it is below
    ~1e-16 (for T = 0.25, scores above ~0.9999), and float32 storage merges far more. Where the
    exact AP matters, rank by the original scores and report the calibrated ones.
    """
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return _sigmoid(scores_to_logits(scores) / temperature)


@dataclass(frozen=True)
class IsotonicCalibrator:
    """Non-decreasing map from score to calibrated confidence, fitted by `fit_isotonic`.

    knot_scores: (K,) increasing scores; knot_values: (K,) non-decreasing values in [0, 1].
    interpolation "linear" joins the knots by straight lines; "step" holds each knot's value
    up to the next knot. Outside the knots the end values hold.
    """

    knot_scores: np.ndarray
    knot_values: np.ndarray
    interpolation: str

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated confidences (N,) float64 in [0, 1] of scores (N,)."""
        scores = np.asarray(scores, dtype=np.float64)
        if self.interpolation == "linear":
            values = np.interp(scores, self.knot_scores, self.knot_values)
        else:
            index = np.searchsorted(self.knot_scores, scores, side="right") - 1
            values = self.knot_values[np.clip(index, 0, len(self.knot_values) - 1)]
        return np.clip(values, 0.0, 1.0)


def fit_isotonic(
    scores: np.ndarray, correct: np.ndarray, interpolation: str = "linear"
) -> IsotonicCalibrator:
    """Isotonic regression of `correct` (N,) bool on `scores` (N,) by pool-adjacent-violators.

    The fit is the non-decreasing step function closest to `correct` in squared error; it is
    constant on blocks of consecutive scores. Knots are each block's lowest and highest score
    for "linear" interpolation and its lowest score for "step". The map is only non-decreasing:
    all scores of a flat stretch get one confidence, so it creates ties between detections that
    were ranked apart, and COCO AP (which breaks ties by input order) can change. Use it to make
    confidences readable as probabilities, not to rank detections.
    """
    if interpolation not in ("linear", "step"):
        raise ValueError(f"interpolation must be 'linear' or 'step', got {interpolation!r}")
    scores = np.asarray(scores, dtype=np.float64)
    correct = _as_correct(correct, len(scores))
    if scores.ndim != 1 or len(scores) == 0 or not np.isfinite(scores).all():
        raise ValueError("scores must be a non-empty 1-D array of finite values")

    # Equal scores must receive one value, so they enter PAV as one weighted point.
    unique_scores, inverse = np.unique(scores, return_inverse=True)
    weights = np.bincount(inverse)
    correct_counts = np.bincount(inverse, weights=correct.astype(np.float64))
    block_start, block_value = _pool_adjacent_violators(correct_counts, weights)

    block_end = np.append(block_start[1:], len(unique_scores)) - 1
    if interpolation == "step":
        knot_scores, knot_values = unique_scores[block_start], block_value
    else:
        ends = np.stack([unique_scores[block_start], unique_scores[block_end]], axis=1).ravel()
        values = np.repeat(block_value, 2)
        distinct = np.append(True, ends[1:] != ends[:-1])  # one-score blocks give one knot
        knot_scores, knot_values = ends[distinct], values[distinct]
    return IsotonicCalibrator(knot_scores, knot_values, interpolation)


def _pool_adjacent_violators(
    sums: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted PAV over points in score order, each point given as the sum of its targets and
    its weight (K,). Returns each block's first point index and its mean (B,).

    A stack of blocks is grown left to right; a new block that is lower than the one below it
    is merged into it until the stack is non-decreasing again (amortised O(K)). Blocks are
    compared as sum_a * weight_b > sum_b * weight_a, which is exact for counts of correct
    detections, so blocks of equal mean are never merged by a rounding error.
    """
    stack_sum: list[float] = []
    stack_weight: list[float] = []
    stack_start: list[int] = []
    for index, (point_sum, point_weight) in enumerate(
        zip(sums.tolist(), weights.tolist(), strict=True)
    ):
        stack_sum.append(point_sum)
        stack_weight.append(point_weight)
        stack_start.append(index)
        while (
            len(stack_sum) > 1
            and stack_sum[-2] * stack_weight[-1] > stack_sum[-1] * stack_weight[-2]
        ):
            top_sum, top_weight = stack_sum.pop(), stack_weight.pop()
            stack_start.pop()
            stack_sum[-1] += top_sum
            stack_weight[-1] += top_weight
    block_sum = np.asarray(stack_sum)
    block_weight = np.asarray(stack_weight)
    return np.asarray(stack_start, dtype=np.int64), block_sum / block_weight


def box_overlap(det_boxes: np.ndarray, gt_boxes: np.ndarray, gt_iscrowd: np.ndarray) -> np.ndarray:
    """(N, M) IoU of xyxy boxes; for crowd GT columns intersection / detection area instead
    (pycocotools' crowd rule). 0 where the denominator is 0."""
    top_left = np.maximum(det_boxes[:, None, :2], gt_boxes[None, :, :2])
    bottom_right = np.minimum(det_boxes[:, None, 2:], gt_boxes[None, :, 2:])
    intersection = np.prod(np.clip(bottom_right - top_left, 0.0, None), axis=2)
    det_area = np.prod(det_boxes[:, 2:] - det_boxes[:, :2], axis=1)
    gt_area = np.prod(gt_boxes[:, 2:] - gt_boxes[:, :2], axis=1)
    union = det_area[:, None] + gt_area[None, :] - intersection
    denominator = np.where(gt_iscrowd[None, :], det_area[:, None], union)
    return np.divide(
        intersection, denominator, out=np.zeros_like(intersection), where=denominator > 0
    )


def _as_boxes(boxes: np.ndarray, name: str) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.size == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4), got {boxes.shape}")
    if not np.isfinite(boxes).all() or (boxes[:, 2:] < boxes[:, :2]).any():
        raise ValueError(f"{name} must be finite xyxy boxes with x2 >= x1 and y2 >= y1")
    return boxes


def _as_correct(correct: np.ndarray, n: int) -> np.ndarray:
    correct = np.asarray(correct)
    if correct.shape != (n,):
        raise ValueError(f"correct must have shape ({n},) like the scores, got {correct.shape}")
    if correct.dtype != bool and not np.isin(correct, (0, 1)).all():
        raise ValueError("correct must be boolean or 0/1")
    return correct.astype(bool)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp(-softplus(-x)) never overflows, unlike 1 / (1 + exp(-x)) for very negative x.
    return np.exp(-np.logaddexp(0.0, -x))
