"""Anchor matching: which ground-truth box (if any) each anchor is trained to predict.

The paper's rule: an anchor is foreground for the box it overlaps most if that IoU is >= 0.5,
background if its best IoU is < 0.4, and ignored (no loss at all) in between. Two additions
that every mature implementation makes:
- low-quality matches (optional, on by default as in Detectron and torchvision): a box whose
  best anchor reaches less than 0.5 IoU, say a small or elongated object, would otherwise have
  no foreground anchor at all; its best anchors (all ties) become foreground anyway, for the
  box they overlap most.
- crowd regions (COCO `iscrowd=1`) are never foreground; an anchor that would be background but
  lies mostly inside one (intersection over the anchor's area >= `crowd_ioa_threshold`) is
  ignored rather than taught that the crowd is background.

Matching is batched over images: ground truth is padded to (B, M, 4) with a far-away, zero-area
box that has IoU 0 with every anchor and so can never win a match.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

BACKGROUND = -1
IGNORE = -2

# The corners of a zero-area box far outside any image: IoU 0 and IoA 0 with every anchor.
_PAD_COORDINATE = -1e6


def pad_boxes(boxes: Sequence[Tensor], device: torch.device | str | None = None) -> Tensor:
    """Stack per-image (n_i, 4) boxes into (B, max n_i, 4), padded with a box that matches
    nothing. M is at least 1 so that shapes stay regular for images without boxes."""
    device = device if device is not None else (boxes[0].device if len(boxes) else "cpu")
    longest = max([1] + [len(b) for b in boxes])
    # torch.full, not torch.tensor(...): a tensor built from Python numbers is copied from
    # host memory, which on a GPU waits for the device.
    padded = torch.full((len(boxes), longest, 4), _PAD_COORDINATE, device=device)
    for i, b in enumerate(boxes):  # a loop over images, not anchors
        padded[i, : len(b)] = b.to(device=device, dtype=padded.dtype)
    return padded


def _pairwise_intersection(boxes: Tensor, anchors: Tensor) -> Tensor:
    """boxes (B, M, 4), anchors (A, 4), both xyxy -> intersection areas (B, M, A).

    Written coordinate by coordinate with in-place ops so that at most four (B, M, A)
    temporaries live at once (a naive (B, M, A, 2) corner tensor doubles that)."""
    x1 = torch.maximum(boxes[..., 0, None], anchors[:, 0])
    x2 = torch.minimum(boxes[..., 2, None], anchors[:, 2])
    width = x2.sub_(x1).clamp_(min=0)
    del x1
    y1 = torch.maximum(boxes[..., 1, None], anchors[:, 1])
    y2 = torch.minimum(boxes[..., 3, None], anchors[:, 3])
    height = y2.sub_(y1).clamp_(min=0)
    return width.mul_(height)


def box_area(boxes: Tensor) -> Tensor:
    """boxes (..., 4) xyxy -> areas (...)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_iou(boxes: Tensor, anchors: Tensor) -> Tensor:
    """boxes (B, M, 4), anchors (A, 4) -> IoU (B, M, A)."""
    inter = _pairwise_intersection(boxes, anchors)
    union = box_area(boxes)[..., None] + box_area(anchors) - inter
    return inter.div_(union.clamp_(min=torch.finfo(inter.dtype).tiny))


def pairwise_ioa(regions: Tensor, anchors: Tensor) -> Tensor:
    """regions (B, C, 4), anchors (A, 4) -> intersection over anchor area (B, C, A)."""
    inter = _pairwise_intersection(regions, anchors)
    return inter.div_(box_area(anchors).clamp(min=torch.finfo(inter.dtype).tiny))


class AnchorMatcher:
    """Assigns every anchor to a ground-truth box, to background, or to the ignore band.

    Args:
        fg_iou_threshold: IoU >= this makes an anchor foreground (0.5 in the paper).
        bg_iou_threshold: IoU < this makes an anchor background (0.4 in the paper).
        allow_low_quality_matches: every box keeps its highest-IoU anchors (ties included) as
            foreground even below `fg_iou_threshold`.
        crowd_ioa_threshold: background anchors covered at least this much by a crowd region
            are ignored.
        max_chunk_elements: the (B, M, A) IoU matrix is built for as many images at a time as
            fit in this many elements, bounding memory for large batches.
    """

    def __init__(
        self,
        fg_iou_threshold: float = 0.5,
        bg_iou_threshold: float = 0.4,
        allow_low_quality_matches: bool = True,
        crowd_ioa_threshold: float = 0.5,
        max_chunk_elements: int = 2**27,
    ) -> None:
        if not 0.0 <= bg_iou_threshold <= fg_iou_threshold <= 1.0:
            raise ValueError(
                "need 0 <= bg_iou_threshold <= fg_iou_threshold <= 1, got "
                f"bg={bg_iou_threshold}, fg={fg_iou_threshold}"
            )
        self.fg_iou_threshold = fg_iou_threshold
        self.bg_iou_threshold = bg_iou_threshold
        self.allow_low_quality_matches = allow_low_quality_matches
        self.crowd_ioa_threshold = crowd_ioa_threshold
        self.max_chunk_elements = max_chunk_elements

    def __call__(
        self, anchors: Tensor, gt_boxes: Tensor, crowd_boxes: Tensor | None = None
    ) -> Tensor:
        """anchors: (A, 4); gt_boxes: (B, M, 4) padded (see `pad_boxes`); crowd_boxes:
        (B, C, 4) padded or None -> matches (B, A) int64: index into M for foreground anchors,
        BACKGROUND (-1) or IGNORE (-2)."""
        per_image = max(1, gt_boxes.shape[1] * anchors.shape[0])
        chunk = max(1, self.max_chunk_elements // per_image)
        matches = torch.cat([self._match(anchors, part) for part in gt_boxes.split(chunk)])
        if crowd_boxes is not None and crowd_boxes.numel():
            covered = pairwise_ioa(crowd_boxes, anchors).amax(dim=1) >= self.crowd_ioa_threshold
            # torch.where, not boolean indexing: indexing by a mask needs its count on the host.
            matches = torch.where(covered & (matches == BACKGROUND), IGNORE, matches)
        return matches

    def _match(self, anchors: Tensor, gt_boxes: Tensor) -> Tensor:
        iou = pairwise_iou(gt_boxes, anchors)  # (B, M, A)
        best_iou, matches = iou.max(dim=1)  # per anchor: (B, A)
        labels = torch.where(best_iou >= self.fg_iou_threshold, matches, BACKGROUND)
        labels = torch.where(
            (best_iou >= self.bg_iou_threshold) & (best_iou < self.fg_iou_threshold), IGNORE, labels
        )
        if self.allow_low_quality_matches:
            best_per_box = iou.amax(dim=2, keepdim=True)  # (B, M, 1)
            # Padding boxes and boxes that touch no anchor at all have a best IoU of 0.
            is_best_anchor = ((iou == best_per_box) & (best_per_box > 0)).any(dim=1)
            labels = torch.where(is_best_anchor, matches, labels)
        return labels
