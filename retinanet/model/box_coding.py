"""Box coding: the (dx, dy, dw, dh) parametrisation of a box relative to an anchor (R-CNN, used
unchanged by RetinaNet)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# exp(dw) is clamped so that a box can grow at most 1000/16 times its anchor: untrained or
# diverging heads otherwise overflow exp() and poison NMS with inf boxes.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Encodes boxes as offsets from anchors and decodes them back.

    For an anchor with centre (xa, ya) and size (wa, ha) and a box (x, y, w, h):
    dx = wx (x - xa) / wa, dy = wy (y - ya) / ha, dw = ww log(w / wa), dh = wh log(h / ha).
    Boxes are xyxy; width is x2 - x1 (continuous coordinates, no +1).
    """

    def __init__(
        self,
        weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        scale_clamp: float = DEFAULT_SCALE_CLAMP,
    ) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, anchors: Tensor, boxes: Tensor) -> Tensor:
        """anchors, boxes: (..., 4) xyxy -> deltas (..., 4)."""
        wx, wy, ww, wh = self.weights
        anchor_cx, anchor_cy, anchor_w, anchor_h = _centre_size(anchors)
        box_cx, box_cy, box_w, box_h = _centre_size(boxes)
        return torch.stack(
            (
                wx * (box_cx - anchor_cx) / anchor_w,
                wy * (box_cy - anchor_cy) / anchor_h,
                ww * torch.log(box_w / anchor_w),
                wh * torch.log(box_h / anchor_h),
            ),
            dim=-1,
        )

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """deltas: (..., 4), anchors: (..., 4) xyxy, broadcastable -> boxes (..., 4) xyxy, in the
        dtype of `deltas`."""
        wx, wy, ww, wh = self.weights
        anchor_cx, anchor_cy, anchor_w, anchor_h = _centre_size(anchors.to(deltas.dtype))
        dw = torch.clamp(deltas[..., 2] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[..., 3] / wh, max=self.scale_clamp)
        cx = deltas[..., 0] / wx * anchor_w + anchor_cx
        cy = deltas[..., 1] / wy * anchor_h + anchor_cy
        half_w = 0.5 * torch.exp(dw) * anchor_w
        half_h = 0.5 * torch.exp(dh) * anchor_h
        return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """boxes (..., 4) xyxy -> centre x, centre y, width, height, each (...)."""
    width = boxes[..., 2] - boxes[..., 0]
    height = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * width, boxes[..., 1] + 0.5 * height, width, height
