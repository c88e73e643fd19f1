"""The RetinaNet head: a classification subnet and a box subnet, shared across pyramid levels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..choices import Interval, check_range
from .norm import make_norm

# pi, the foreground probability every anchor starts with: a probability strictly inside (0, 1)
PRIOR_PROBABILITY_RANGE = Interval(0.0, 1.0, low_open=True, high_open=True)


class HeadOutputs(NamedTuple):
    """What the detector's forward returns: the head's outputs for every anchor, with the
    anchors. cls_logits (B, A, K) fp32; box_deltas (B, A, 4) fp32; anchors (A, 4) xyxy in input
    pixels, shared by the batch; num_anchors_per_level: anchors of P3, P4, ... (they sum to A)."""

    cls_logits: Tensor
    box_deltas: Tensor
    anchors: Tensor
    num_anchors_per_level: list[int]


def _subnet(channels: int, num_convs: int, norm: str | None) -> nn.Sequential:
    """num_convs x (3x3 conv, [norm], ReLU), channels preserved."""
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=norm is None)
        block = [conv] + ([make_norm(norm, channels)] if norm else []) + [nn.ReLU(inplace=True)]
        layers.append(nn.Sequential(*block))
    return nn.Sequential(*layers)


class RetinaNetHead(nn.Module):
    """Class subnet (K*A outputs per location) and box subnet (4*A outputs per location).

    Args:
        in_channels: channels of every pyramid level (256 in the paper).
        num_anchors: anchors per location, A.
        num_classes: object classes, K (no background class: sigmoid outputs).
        num_convs: 3x3 conv + ReLU layers in each subnet before the output conv (4).
        norm: None, "gn" (GroupNorm, 32 groups), or "bn" after each subnet conv. Like the
            convs, the normalisation layers are shared by all levels, as in torchvision's v2
            head; shared BatchNorm mixes the statistics of the levels (Detectron2 warns it
            works poorly), so prefer "gn".
        prior_probability: initial foreground probability of every anchor, pi (0.01).
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        num_convs: int = 4,
        norm: str | None = None,
        prior_probability: float = 0.01,
    ) -> None:
        super().__init__()
        check_range(prior_probability, PRIOR_PROBABILITY_RANGE, "prior_probability")
        self.num_anchors = num_anchors
        self.num_classes = num_classes
        self.cls_subnet = _subnet(in_channels, num_convs, norm)
        self.box_subnet = _subnet(in_channels, num_convs, norm)
        self.cls_score = nn.Conv2d(in_channels, num_anchors * num_classes, kernel_size=3, padding=1)
        self.box_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=3, padding=1)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Prior-probability initialisation (paper, Sec. 4.1): with a zero bias every anchor
        # would start at p = 0.5, and the ~100k background anchors of an image would produce
        # a huge, unstable loss in the first iterations. Setting b = -log((1 - pi) / pi) makes
        # the initial p = pi = 0.01 everywhere, so the early loss is dominated by the few
        # foreground anchors instead of being swamped by easy background.
        nn.init.constant_(
            self.cls_score.bias, -math.log((1 - prior_probability) / prior_probability)
        )

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """features: per level (B, C, H_l, W_l) -> cls_logits (B, sum_l H_l W_l A, K) and
        box_deltas (B, sum_l H_l W_l A, 4), anchors in the AnchorGenerator's order."""
        cls_logits = [
            self._flatten(self.cls_score(self.cls_subnet(f)), self.num_classes) for f in features
        ]
        box_deltas = [self._flatten(self.box_pred(self.box_subnet(f)), 4) for f in features]
        return torch.cat(cls_logits, dim=1), torch.cat(box_deltas, dim=1)

    def _flatten(self, x: Tensor, width: int) -> Tensor:
        # (B, A * width, H, W) -> (B, H * W * A, width): channel a * width + j is anchor a.
        batch, _, height, w = x.shape
        x = x.view(batch, self.num_anchors, width, height, w).permute(0, 3, 4, 1, 2)
        return x.reshape(batch, -1, width)
