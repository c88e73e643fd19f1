"""Inference: from head outputs to detections (paper, Sec. 4 "Inference").

Per level, at most `topk_candidates` (anchor, class) pairs with score > `score_threshold` are
decoded; the candidates of all levels are merged and class-wise NMS at `nms_threshold` keeps
the top `max_detections` per image. Boxes are clipped to the (resized) image and then scaled
to original-image pixels.

Two paths give the same detections: `DetectionPostprocessor.__call__`, the fast one for eager
use, decides in Python how to select candidates and returns one tensor per image;
`DetectionPostprocessor.padded` makes every decision on tensor values and returns fixed-size
tensors, so that a traced graph of it (the ONNX export) is valid for any input.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from ..choices import Interval, check_range
from .box_coding import BoxCoder
from .head import HeadOutputs

SCORE_THRESHOLD_RANGE = Interval(0.0, 1.0, high_open=True)


def top_above_threshold(logits: Tensor, threshold: float, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k largest (anchor, class) logits above `threshold` of each image.

    logits: (B, A, K). Returns values (B, n), flat indices a * K + c (B, n) and valid (B, n),
    n <= k, with invalid padding where an image has fewer; not sorted.

    A trained detector leaves a few thousand of the ~10^7 (anchor, class) pairs of a level above
    0.05, almost all on anchors where some class scores high. So one pass takes each anchor's
    best class and only the anchors passing the threshold are examined class by class; if many
    anchors pass, the pairs above the threshold are found in one pass over all of them; if most
    pairs pass (an untrained model), a top-k over all pairs is the cheaper way. All three
    select the same set; only the survivors are ranked."""
    batch, num_anchors, num_classes = logits.shape
    flat = logits.reshape(batch, -1)
    k = min(k, flat.shape[1])
    if math.isfinite(threshold):
        hot = logits.amax(dim=-1) > threshold
        if int(torch.count_nonzero(hot)) <= batch * num_anchors // 8:
            images, anchors = torch.nonzero(hot, as_tuple=True)  # grouped by image
            rows = logits[images, anchors]  # (hot anchors, K)
            hot_row, classes = torch.nonzero(rows > threshold, as_tuple=True)
            columns = anchors[hot_row] * num_classes + classes
            return _top_k_per_image(images[hot_row], columns, rows[hot_row, classes], batch, k)
        above = flat > threshold
        if int(torch.count_nonzero(above)) <= flat.numel() // 8:
            images, columns = torch.nonzero(above, as_tuple=True)  # grouped by image
            return _top_k_per_image(images, columns, flat[images, columns], batch, k)
    values, columns = flat.topk(k, dim=1)
    return values, columns, values > threshold


def _top_k_per_image(
    images: Tensor, columns: Tensor, values: Tensor, batch: int, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Survivors given as (image, column, value) triplets grouped by image -> the k largest of
    each image, padded into (B, n) tensors (see top_above_threshold)."""
    counts = torch.bincount(images, minlength=batch)
    position = (
        torch.arange(len(images), device=values.device) - (torch.cumsum(counts, 0) - counts)[images]
    )
    most = int(counts.max()) if len(images) else 0
    dense_values = values.new_full((batch, most), -math.inf)
    dense_values[images, position] = values
    dense_columns = torch.zeros((batch, most), dtype=torch.int64, device=values.device)
    dense_columns[images, position] = columns
    if most > k:
        dense_values, chosen = dense_values.topk(k, dim=1)
        dense_columns = dense_columns.gather(1, chosen)
    return dense_values, dense_columns, dense_values > -math.inf


class PaddedDetections(NamedTuple):
    """Detections of a batch in fixed-size tensors, D = max_detections: boxes (B, D, 4) float32
    xyxy in input (resized-image) pixels, scores (B, D) float32 in decreasing order, labels
    (B, D) int64 class indices in [0, K), num_detections (B,) int64. Rows from num_detections
    on are padding: boxes and scores 0, labels -1."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    num_detections: Tensor


def _at_most(limit: int, x: Tensor, dim: int) -> int | Tensor:
    """min(limit, x.shape[dim]). While tracing, computed in the graph from x's shape: a Python
    min() would freeze the traced input's size into the graph."""
    if torch.jit.is_tracing():
        return torch._shape_as_tensor(x)[dim].clamp(max=limit)
    return min(limit, x.shape[dim])


class _ClassWiseNMS(torch.autograd.Function):
    """Class-wise NMS of a batch, exported as one ONNX NonMaxSuppression node.

    boxes (B, N, 4) xyxy; scores (B, K, N) with each candidate's score (> 0) under its own class
    and -1 under the others (and under every class for a discarded candidate). Returns (S, 3)
    int64 rows (image, class, candidate) of the kept candidates, in no particular order. A box
    is suppressed by a higher-scoring one of its class with IoU > iou_threshold. ONNX keeps at
    most `max_per_class` boxes per image and class, the eager version all of them: the same
    top `max_per_class` per image either way.
    """

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, max_per_class: int, iou_threshold: float):
        # In an export, `symbolic` stands for this function and nothing done here enters the
        # graph; the trace is paused so that the decisions below (per image, and torchvision's
        # choice of NMS kernel) are not recorded, nor reported as frozen values.
        tracing = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            rows = []
            for i in range(boxes.shape[0]):
                best, classes = scores[i].max(dim=0)
                candidates = torch.nonzero(best > 0).squeeze(1)
                keep = batched_nms(
                    boxes[i, candidates], best[candidates], classes[candidates], iou_threshold
                )
                keep = candidates[keep]
                rows.append(torch.stack((torch.full_like(keep, i), classes[keep], keep), dim=1))
            return torch.cat(rows)
        finally:
            torch._C._set_tracing_state(tracing)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class: int, iou_threshold: float):
        def constant(value: float, dtype: torch.dtype):
            return g.op("Constant", value_t=torch.tensor([value], dtype=dtype))

        # Score threshold 0: the -1 entries never enter NMS, every real score (> 0) does.
        return g.op(
            "NonMaxSuppression",
            boxes,
            scores,
            constant(max_per_class, torch.int64),
            constant(iou_threshold, torch.float32),
            constant(0.0, torch.float32),
        )


def clip_boxes(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """boxes (B, N, 4) xyxy clipped to [0, W] x [0, H]; image_sizes (B, 2) or (1, 2) (H, W)."""
    # Columns, not a (W, H, W, H) index list: a list index is a CPU tensor copied to the device.
    heights = image_sizes[:, 0, None].to(boxes.dtype)
    widths = image_sizes[:, 1, None].to(boxes.dtype)
    x1, y1, x2, y2 = boxes.clamp(min=0).unbind(-1)
    return torch.stack(
        (x1.minimum(widths), y1.minimum(heights), x2.minimum(widths), y2.minimum(heights)), dim=-1
    )


def scale_to_original(boxes: Tensor, image_sizes: Tensor, original_sizes: Tensor) -> Tensor:
    """boxes (B, N, 4) xyxy in resized-image pixels -> original-image pixels; image_sizes and
    original_sizes are (B, 2) (H, W). For one image: boxes (N, 4) and sizes (2,). The factors
    are computed in fp32 as torchvision does."""
    scale = original_sizes.to(torch.float32) / image_sizes.to(torch.float32)  # (..., 2) (y, x)
    return boxes.float() * scale[..., None, [1, 0, 1, 0]].to(boxes.device)


@dataclasses.dataclass(eq=False)  # compared and hashed by identity, like the model's parts
class DetectionPostprocessor:
    """Args:
    box_coder: decodes the box deltas against their anchors.
    score_threshold: minimum class probability of a candidate (0.05).
    topk_candidates: candidates kept per level and image before NMS (1000).
    nms_threshold: IoU above which a lower-scoring box of the same class is suppressed (0.5).
    max_detections: detections kept per image after NMS (100; torchvision keeps 300).
    """

    box_coder: BoxCoder
    score_threshold: float = 0.05
    topk_candidates: int = 1000
    nms_threshold: float = 0.5
    max_detections: int = 100

    def __post_init__(self) -> None:
        check_range(self.score_threshold, SCORE_THRESHOLD_RANGE, "score_threshold")

    @property
    def logit_threshold(self) -> float:
        """score_threshold as a logit (-inf for 0): thresholding logits is the same as
        thresholding probabilities (sigmoid is monotone) and avoids a sigmoid over every
        (anchor, class) pair."""
        if self.score_threshold > 0:
            return math.log(self.score_threshold / (1.0 - self.score_threshold))
        return -math.inf

    def _decode(
        self, top_idx: Tensor, logits: Tensor, deltas: Tensor, anchors: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One level's flat indices a * K + c (B, n) into its logits (B, A_l, K) -> the boxes
        (B, n, 4) decoded from deltas (B, A_l, 4) and anchors (A_l, 4), and the labels (B, n)."""
        num_classes = logits.shape[-1]
        anchor_idx = top_idx // num_classes
        level_deltas = deltas.gather(1, anchor_idx[..., None].expand(-1, -1, 4))
        return self.box_coder.decode(level_deltas, anchors[anchor_idx]), top_idx % num_classes

    def candidates(
        self, outputs: HeadOutputs, image_sizes: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Top candidates of every level, batched over images.

        outputs: the model's (cls_logits (B, A, K), box_deltas (B, A, 4), anchors (A, 4), anchors
        per level); image_sizes (B, 2) (H, W) of the resized images. Returns boxes (B, N, 4) xyxy
        clipped to the resized image, scores (B, N), labels (B, N), valid (B, N) bool, N = sum
        over levels of the top-k.
        """
        cls_logits, box_deltas, anchors, num_anchors_per_level = outputs
        levels = zip(
            cls_logits.split(num_anchors_per_level, dim=1),
            box_deltas.split(num_anchors_per_level, dim=1),
            anchors.split(num_anchors_per_level),
            strict=True,
        )
        boxes, scores, labels, valid = [], [], [], []
        for logits, deltas, level_anchors in levels:
            top_logits, top_idx, top_valid = top_above_threshold(
                logits, self.logit_threshold, self.topk_candidates
            )
            level_boxes, level_labels = self._decode(top_idx, logits, deltas, level_anchors)
            boxes.append(level_boxes)
            scores.append(torch.sigmoid(top_logits.float()))
            labels.append(level_labels)
            valid.append(top_valid)
        boxes = clip_boxes(torch.cat(boxes, dim=1), image_sizes)
        return boxes, torch.cat(scores, dim=1), torch.cat(labels, dim=1), torch.cat(valid, dim=1)

    def __call__(
        self, outputs: HeadOutputs, image_sizes: Tensor, original_sizes: Tensor
    ) -> list[dict[str, Tensor]]:
        """Detections per image: `boxes` (N, 4) float32 xyxy in original-image pixels, `scores`
        (N,) sorted in decreasing order, `labels` (N,) int64 class indices in [0, K).
        image_sizes, original_sizes: (B, 2) (H, W) of the resized and the original images."""
        return self.select(*self.candidates(outputs, image_sizes), image_sizes, original_sizes)

    def select(
        self,
        boxes: Tensor,
        scores: Tensor,
        labels: Tensor,
        valid: Tensor,
        image_sizes: Tensor,
        original_sizes: Tensor,
    ) -> list[dict[str, Tensor]]:
        """Class-wise NMS per image over the output of `candidates`, the top `max_detections`
        kept, boxes scaled to original-image pixels (see __call__)."""
        detections = []
        for i in range(boxes.shape[0]):  # NMS is per image; candidates are already few
            keep = torch.nonzero(valid[i]).squeeze(1)
            image_boxes = boxes[i, keep].float()
            image_scores, image_labels = scores[i, keep], labels[i, keep]
            # NMS in resized-image pixels, then scaling (as torchvision): IoU is not invariant
            # to the slightly different x and y scale factors of rounded image sizes.
            keep = batched_nms(image_boxes, image_scores, image_labels, self.nms_threshold)
            keep = keep[: self.max_detections]
            kept = scale_to_original(image_boxes[keep], image_sizes[i], original_sizes[i])
            detections.append(
                {"boxes": kept, "scores": image_scores[keep], "labels": image_labels[keep]}
            )
        return detections

    def padded(
        self,
        cls_logits: Sequence[Tensor],
        box_deltas: Sequence[Tensor],
        anchors: Sequence[Tensor],
        image_sizes: Tensor,
    ) -> PaddedDetections:
        """The detections of __call__ with boxes in resized-image pixels (original_sizes =
        image_sizes), as fixed-size tensors, computed without a decision in Python: a traced
        graph of it (the ONNX export) holds for any image size and content.

        Per level, P3 first: cls_logits (B, A_l, K), box_deltas (B, A_l, 4), anchors (A_l, 4).
        image_sizes: (B, 2) or, for a batch of one size, (1, 2) (H, W). Each level's top k is
        taken over all its (anchor, class) pairs and then thresholded (the same candidates as
        `candidates`, which thresholds first: faster in eager use, but data-dependent).
        """
        logit_threshold = self.logit_threshold
        boxes, scores, labels = [], [], []
        for logits, deltas, level_anchors in zip(cls_logits, box_deltas, anchors, strict=True):
            flat = logits.flatten(1)  # (B, A_l * K), index a * K + c
            top_logits, top_idx = flat.topk(_at_most(self.topk_candidates, flat, 1), dim=1)
            level_boxes, level_labels = self._decode(top_idx, logits, deltas, level_anchors)
            boxes.append(level_boxes)
            # Candidates at or below the threshold get score -1: sigmoid scores are >= 0.
            level_scores = torch.sigmoid(top_logits.float())
            scores.append(torch.where(top_logits > logit_threshold, level_scores, -1.0))
            labels.append(level_labels)
        boxes = clip_boxes(torch.cat(boxes, dim=1).float(), image_sizes)  # (B, N, 4)
        scores, labels = torch.cat(scores, dim=1), torch.cat(labels, dim=1)  # (B, N)

        # Each candidate's score under its own class, -1 elsewhere: (B, K, N).
        classes = torch.arange(cls_logits[0].shape[-1], device=labels.device)
        class_scores = torch.where(
            labels[:, None, :] == classes[None, :, None], scores[:, None], -1.0
        )
        kept = _ClassWiseNMS.apply(boxes, class_scores, self.max_detections, self.nms_threshold)
        is_kept = torch.zeros_like(scores).index_put_(
            (kept[:, 0], kept[:, 2]), torch.ones_like(kept[:, 0], dtype=scores.dtype)
        )
        ranked = torch.where(is_kept > 0, scores, -1.0)

        # D padding columns (score -1) make a top-D exist however few candidates there are.
        d = self.max_detections
        ranked = torch.cat((ranked, torch.full_like(ranked[:, :1], -1.0).expand(-1, d)), dim=1)
        boxes = torch.cat((boxes, torch.zeros_like(boxes[:, :1]).expand(-1, d, -1)), dim=1)
        labels = torch.cat((labels, torch.full_like(labels[:, :1], -1).expand(-1, d)), dim=1)
        top_scores, order = ranked.topk(d, dim=1)  # sorted, decreasing
        found = top_scores >= 0
        return PaddedDetections(
            torch.where(found[..., None], boxes.gather(1, order[..., None].expand(-1, -1, 4)), 0.0),
            torch.where(found, top_scores, 0.0),
            torch.where(found, labels.gather(1, order), -1),
            found.sum(dim=1),
        )
