"""Anchor generation: A = len(scales) * len(aspect_ratios) boxes centred on every location of
every pyramid level.

Order of the flattened anchors (and therefore of the head's outputs): level (P3 first), then
row y, then column x, then the A anchors of a location, aspect-ratio-major and scale-minor
(torchvision's order, so torchvision-trained heads load without permutation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class AnchorGenerator(nn.Module):
    """Anchors for a feature pyramid.

    Args:
        sizes: base anchor size (side of the square anchor, input pixels) per level, P3 first.
        strides: stride of each level in input pixels (8, 16, ... for P3...).
        scales: multipliers of the base size, the same on every level.
        aspect_ratios: height / width of the anchors.
        offset: anchor centres at (x + offset) * stride; 0.0 as in Detectron and torchvision.
        quantize: truncate each scaled size to an integer and round the corners of the
            zero-centred anchors to integers, as torchvision's AnchorGenerator does.
        stride_from_feature_size: compute each level's stride as (padded image size // feature
            size) per axis, as torchvision does; it differs from `strides` only when the padded
            image is not a multiple of the level's stride (P6/P7 with padding to 32).
    """

    def __init__(
        self,
        sizes: Sequence[float] = (32, 64, 128, 256, 512),
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        scales: Sequence[float] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        offset: float = 0.0,
        quantize: bool = False,
        stride_from_feature_size: bool = False,
    ) -> None:
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(
                f"one anchor size per level: got {len(sizes)} sizes, {len(strides)} strides"
            )
        if not scales or not aspect_ratios:
            raise ValueError("anchor scales and aspect_ratios must not be empty")
        if any(s <= 0 for s in list(sizes) + list(scales) + list(aspect_ratios)):
            raise ValueError("anchor sizes, scales and aspect ratios must be positive")
        self.sizes = [float(s) for s in sizes]
        self.strides = [int(s) for s in strides]
        self.scales = [float(s) for s in scales]
        self.aspect_ratios = [float(r) for r in aspect_ratios]
        self.offset = float(offset)
        self.quantize = quantize
        self.stride_from_feature_size = stride_from_feature_size
        self.cell_anchors = [self._cell_anchors(size) for size in self.sizes]
        self._cache: dict[tuple, Tensor] = {}

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.scales) * len(self.aspect_ratios)

    def _cell_anchors(self, size: float) -> Tensor:
        """(A, 4) zero-centred xyxy anchors of one level, ratio-major."""
        if self.quantize:
            scaled = torch.tensor([float(int(size * s)) for s in self.scales])
        else:
            scaled = torch.tensor([size * s for s in self.scales], dtype=torch.float64)
        ratios = torch.tensor(self.aspect_ratios, dtype=scaled.dtype)
        # Equal area for every ratio: w = size / sqrt(r), h = size * sqrt(r).
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scaled[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scaled[None, :]).reshape(-1)
        cell = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
        return cell.round() if self.quantize else cell.float()

    def level_strides(self, image_size: tuple[int, int], feature_sizes: Sequence[tuple[int, int]]):
        """(stride_y, stride_x) per level for a padded image of `image_size` (H, W)."""
        if self.stride_from_feature_size:
            return [(image_size[0] // h, image_size[1] // w) for h, w in feature_sizes]
        return [(s, s) for s in self.strides]

    def forward(
        self,
        image_size: tuple[int, int],
        feature_sizes: Sequence[tuple[int, int]],
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """image_size: padded batch (H, W); feature_sizes: (H_l, W_l) per level ->
        anchors (sum_l H_l W_l A, 4) float32 xyxy in input pixels, cached per shape and device."""
        if len(feature_sizes) != len(self.sizes):
            raise ValueError(f"expected {len(self.sizes)} feature levels, got {len(feature_sizes)}")
        image_size = (int(image_size[0]), int(image_size[1]))
        feature_sizes = tuple((int(h), int(w)) for h, w in feature_sizes)
        key = (image_size, feature_sizes, str(device))
        anchors = self._cache.get(key)
        if anchors is None:
            if len(self._cache) > 64:  # multi-scale training: keep the cache bounded
                self._cache.clear()
            strides = self.level_strides(image_size, feature_sizes)
            per_level = zip(self.cell_anchors, feature_sizes, strides, strict=True)
            levels = [self._grid_anchors(cell, size, stride) for cell, size, stride in per_level]
            anchors = torch.cat(levels).to(device)
            self._cache[key] = anchors
        return anchors

    def _grid_anchors(self, cell: Tensor, size: tuple[int, int], stride: tuple[int, int]) -> Tensor:
        height, width = size
        stride_y, stride_x = stride
        shift_x = (torch.arange(width, dtype=torch.float32) + self.offset) * stride_x
        shift_y = (torch.arange(height, dtype=torch.float32) + self.offset) * stride_y
        shift_y, shift_x = torch.meshgrid(shift_y, shift_x, indexing="ij")
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)
        return (shifts + cell.view(1, -1, 4)).reshape(-1, 4)

    def num_anchors_per_level(self, feature_sizes: Sequence[tuple[int, int]]) -> list[int]:
        return [h * w * self.num_anchors_per_location for h, w in feature_sizes]
