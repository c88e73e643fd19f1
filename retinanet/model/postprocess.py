"""Inference: from head outputs to detections (paper, Sec. 4 "Inference").

Per level, at most `topk_candidates` (anchor, class) pairs with score > `score_threshold` are
decoded; the candidates of all levels are merged and class-wise NMS at `nms_threshold` keeps
the top `max_detections` per image. Boxes are clipped to the (resized) image and then scaled
to original-image pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from .box_coding import BoxCoder


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
    if not math.isfinite(threshold):
        values, columns = flat.topk(k, dim=1)
        return values, columns, values > threshold
    hot = logits.amax(dim=-1) > threshold
    if int(torch.count_nonzero(hot)) <= batch * num_anchors // 8:
        images, anchors = torch.nonzero(hot, as_tuple=True)  # grouped by image
        rows = logits[images, anchors]  # (hot anchors, K)
        hot_row, classes = torch.nonzero(rows > threshold, as_tuple=True)
        images, columns = images[hot_row], anchors[hot_row] * num_classes + classes
        values = rows[hot_row, classes]
    else:
        above = flat > threshold
        if int(torch.count_nonzero(above)) > flat.numel() // 8:
            values, columns = flat.topk(k, dim=1)
            return values, columns, values > threshold
        images, columns = torch.nonzero(above, as_tuple=True)  # grouped by image
        values = flat[images, columns]
    return _top_k_per_image(images, columns, values, batch, k)


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


def scale_to_original(boxes: Tensor, image_sizes: Tensor, original_sizes: Tensor) -> Tensor:
    """boxes (B, N, 4) xyxy in resized-image pixels -> original-image pixels; image_sizes and
    original_sizes are (B, 2) (H, W). For one image: boxes (N, 4) and sizes (2,). The factors
    are computed in fp32 as torchvision does."""
    scale = original_sizes.to(torch.float32) / image_sizes.to(torch.float32)  # (..., 2) (y, x)
    return boxes.float() * scale[..., None, [1, 0, 1, 0]].to(boxes.device)


class DetectionPostprocessor:
    """Args:
    score_threshold: minimum class probability of a candidate (0.05).
    topk_candidates: candidates kept per level and image before NMS (1000).
    nms_threshold: IoU above which a lower-scoring box of the same class is suppressed (0.5).
    max_detections: detections kept per image after NMS (100; torchvision keeps 300).
    """

    def __init__(
        self,
        box_coder: BoxCoder,
        score_threshold: float = 0.05,
        topk_candidates: int = 1000,
        nms_threshold: float = 0.5,
        max_detections: int = 100,
    ) -> None:
        if not 0.0 <= score_threshold < 1.0:
            raise ValueError(f"score_threshold must be in [0, 1), got {score_threshold}")
        self.box_coder = box_coder
        self.score_threshold = score_threshold
        self.topk_candidates = topk_candidates
        self.nms_threshold = nms_threshold
        self.max_detections = max_detections

    def candidates(
        self,
        cls_logits: Tensor,
        box_deltas: Tensor,
        anchors: Tensor,
        num_anchors_per_level: Sequence[int],
        image_sizes: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Top candidates of every level, batched over images.

        cls_logits (B, A, K), box_deltas (B, A, 4), anchors (A, 4); image_sizes (B, 2) (H, W)
        of the resized images. Returns boxes (B, N, 4) xyxy clipped to the resized image,
        scores (B, N), labels (B, N), valid (B, N) bool, N = sum over levels of the top-k.
        """
        batch, _, num_classes = cls_logits.shape
        # Thresholding logits is the same as thresholding probabilities (sigmoid is monotone)
        # and avoids a sigmoid over every (anchor, class) pair.
        logit_threshold = (
            math.log(self.score_threshold / (1.0 - self.score_threshold))
            if self.score_threshold > 0
            else -math.inf
        )
        boxes, scores, labels, valid = [], [], [], []
        start = 0
        for count in num_anchors_per_level:
            top_logits, top_idx, top_valid = top_above_threshold(
                cls_logits[:, start : start + count], logit_threshold, self.topk_candidates
            )
            anchor_idx = top_idx // num_classes
            deltas = box_deltas[:, start : start + count].gather(
                1, anchor_idx[..., None].expand(-1, -1, 4)
            )
            level_boxes = self.box_coder.decode(deltas, anchors[start : start + count][anchor_idx])
            boxes.append(level_boxes)
            scores.append(torch.sigmoid(top_logits.float()))
            labels.append(top_idx % num_classes)
            valid.append(top_valid)
            start += count
        boxes = torch.cat(boxes, dim=1)
        heights = image_sizes[:, 0, None].to(boxes.dtype)
        widths = image_sizes[:, 1, None].to(boxes.dtype)
        boxes = torch.stack(
            (
                boxes[..., 0].clamp(min=0).minimum(widths),
                boxes[..., 1].clamp(min=0).minimum(heights),
                boxes[..., 2].clamp(min=0).minimum(widths),
                boxes[..., 3].clamp(min=0).minimum(heights),
            ),
            dim=-1,
        )
        return boxes, torch.cat(scores, dim=1), torch.cat(labels, dim=1), torch.cat(valid, dim=1)

    def __call__(
        self,
        cls_logits: Tensor,
        box_deltas: Tensor,
        anchors: Tensor,
        num_anchors_per_level: Sequence[int],
        image_sizes: Tensor,
        original_sizes: Tensor,
    ) -> list[dict[str, Tensor]]:
        """Detections per image: `boxes` (N, 4) float32 xyxy in original-image pixels, `scores`
        (N,) sorted in decreasing order, `labels` (N,) int64 class indices in [0, K).
        image_sizes, original_sizes: (B, 2) (H, W) of the resized and the original images."""
        candidates = self.candidates(
            cls_logits, box_deltas, anchors, num_anchors_per_level, image_sizes
        )
        return self.select(*candidates, image_sizes, original_sizes)

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
            image_boxes, image_scores, image_labels = (
                boxes[i, keep].float(),
                scores[i, keep],
                labels[i, keep],
            )
            # NMS in resized-image pixels, then scaling (as torchvision): IoU is not invariant
            # to the slightly different x and y scale factors of rounded image sizes.
            keep = batched_nms(image_boxes, image_scores, image_labels, self.nms_threshold)
            keep = keep[: self.max_detections]
            kept = scale_to_original(image_boxes[keep], image_sizes[i], original_sizes[i])
            detections.append(
                {"boxes": kept, "scores": image_scores[keep], "labels": image_labels[keep]}
            )
        return detections
