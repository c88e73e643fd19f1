"""Feature Pyramid Network producing P3-P7 (paper, Sec. 4 "Feature Pyramid Network Backbone")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ..choices import check_choice
from .norm import NormKind, make_norm

# Where P6 comes from: the backbone's C5 (the paper) or P5 (torchvision's v1 model).
P6Source = Literal["c5", "p5"]


def _conv(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, norm: NormKind | None
) -> nn.Sequential:
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=norm is None
    )
    # Kaiming-uniform with a = 1 ("Xavier-like") and zero bias, as in Detectron and torchvision.
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, make_norm(norm, out_channels)) if norm else nn.Sequential(conv)


class FeaturePyramid(nn.Module):
    """P3-P5 from C3-C5 by 1x1 lateral convs, nearest-neighbour top-down upsampling and 3x3
    output convs; P6 by a 3x3 stride-2 conv and P7 by ReLU then a 3x3 stride-2 conv on P6.

    Args:
        in_channels: channels of C3, C4, C5.
        out_channels: channels of every P level (256 in the paper).
        p6_source: "c5" (the paper: P6 from the backbone's C5) or "p5" (torchvision's
            retinanet_resnet50_fpn builds P6 from the FPN output P5).
        norm: None or a norm name (e.g. "gn") after each conv.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int = 256,
        p6_source: P6Source = "c5",
        norm: NormKind | None = None,
    ) -> None:
        super().__init__()
        check_choice(p6_source, P6Source, "p6_source")
        self.p6_source = p6_source
        self.lateral_convs = nn.ModuleList(_conv(c, out_channels, 1, 1, norm) for c in in_channels)
        self.output_convs = nn.ModuleList(
            _conv(out_channels, out_channels, 3, 1, norm) for _ in in_channels
        )
        p6_in = in_channels[-1] if p6_source == "c5" else out_channels
        self.p6 = _conv(p6_in, out_channels, 3, 2, norm)
        self.p7 = _conv(out_channels, out_channels, 3, 2, norm)
        self.out_channels = out_channels
        self.strides = [8, 16, 32, 64, 128]

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """features: [C3, C4, C5] -> [P3, P4, P5, P6, P7], each (B, out_channels, H_l, W_l)."""
        inner = self.lateral_convs[-1](features[-1])
        outputs = [self.output_convs[-1](inner)]
        for level in range(len(features) - 2, -1, -1):
            lateral = self.lateral_convs[level](features[level])
            # Upsample to the lateral's size rather than by 2: odd sizes stay aligned.
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            outputs.insert(0, self.output_convs[level](inner))
        p6 = self.p6(features[-1] if self.p6_source == "c5" else outputs[-1])
        p7 = self.p7(F.relu(p6))
        return outputs + [p6, p7]
