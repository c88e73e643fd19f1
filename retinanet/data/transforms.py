"""Training and test-time image transforms: shortest-side resize, horizontal flip and photometric
jitter, applied with albumentations so that boxes follow every geometric change.

Randomness is never global: each call receives the seed of its sample (from the training sampler),
so the augmentation of a sample is a pure function of (image, seed) whatever worker runs it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.core.transforms_interface import BaseTransformInitSchema
from albumentations.core.type_definitions import Targets


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(H, W) after scaling the short side to `min_size` unless that makes the long side exceed
    `max_size`: scale = min(min_size / short, max_size / long), sides rounded to the nearest
    pixel."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


class ShortestSideResize(A.DualTransform):
    """Resize to `resized_shape(h, w, min_size, max_size)` with bilinear interpolation, where
    `min_size` is drawn from `min_sizes` per image (multi-scale training). An image that already
    has the target size is returned as is (same pixels, no resampling)."""

    _targets = (Targets.IMAGE, Targets.BBOXES)

    class InitSchema(BaseTransformInitSchema):
        min_sizes: list[int]
        max_size: int

    def __init__(self, min_sizes: Sequence[int], max_size: int, p: float = 1.0) -> None:
        super().__init__(p=p)
        if not min_sizes or min(min_sizes) < 1 or max_size < 1:
            raise ValueError(f"sizes must be positive, got min_sizes={min_sizes}, {max_size=}")
        self.min_sizes = list(min_sizes)
        self.max_size = max_size

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        height, width = params["shape"][:2]
        min_size = self.py_random.choice(self.min_sizes)
        return {"target_shape": resized_shape(height, width, min_size, self.max_size)}

    def apply(self, img: np.ndarray, target_shape: tuple[int, int], **params: Any) -> np.ndarray:
        if img.shape[:2] == target_shape:
            return img
        height, width = target_shape
        return cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        # albumentations keeps boxes normalised to [0, 1] between transforms: a resize leaves
        # them unchanged and they are scaled to the new pixel size on the way out.
        return bboxes

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_sizes", "max_size")


class DetectionTransform:
    """Resize + optional horizontal flip + optional photometric jitter for detection samples.

    Args:
        min_size: short-side target in pixels; a sequence means one value drawn per image.
        max_size: cap on the long side in pixels.
        flip_prob: probability of a horizontal flip.
        photometric_prob: probability of a colour jitter (brightness, contrast, saturation
            +-20 %, hue +-0.02 turns).

    `__call__` with `seed=None` is the deterministic test-time path: resize with the largest
    `min_size`, no flip, no jitter.
    """

    def __init__(
        self,
        min_size: int | Sequence[int],
        max_size: int,
        flip_prob: float = 0.0,
        photometric_prob: float = 0.0,
    ) -> None:
        min_sizes = [min_size] if isinstance(min_size, int) else [int(s) for s in min_size]
        if not 0.0 <= flip_prob <= 1.0 or not 0.0 <= photometric_prob <= 1.0:
            raise ValueError(
                f"probabilities must be in [0, 1], got {flip_prob=}, {photometric_prob=}"
            )
        self.min_sizes = min_sizes
        self.max_size = max_size
        self.flip_prob = flip_prob
        self.photometric_prob = photometric_prob
        # One index label per box lets us recover which boxes survived and in what order;
        # clip=True absorbs float round-off at the image border after a flip.
        bbox_params = A.BboxParams(format="pascal_voc", label_fields=["box_index"], clip=True)
        self._random = A.Compose(
            [
                ShortestSideResize(min_sizes, max_size),
                A.HorizontalFlip(p=flip_prob),
                A.ColorJitter(
                    brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=photometric_prob
                ),
            ],
            bbox_params=bbox_params,
        )
        self._fixed = A.Compose(
            [ShortestSideResize([max(min_sizes)], max_size)], bbox_params=bbox_params
        )

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, seed: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """image: (H0, W0, 3) uint8 RGB; boxes: (K, 4) float32 xyxy in image pixels.

        Returns the transformed image (H, W, 3) uint8, its boxes (K', 4) float32 xyxy in the new
        pixels, and keep (K',) int64: the input row of each returned box (K' <= K: a box may
        vanish only if a transform removes it entirely).
        """
        if seed is None:
            compose = self._fixed
        else:
            compose = self._random
            # One shared generator pair for all transforms: Compose.set_random_seed would give
            # every transform its own generator with the same seed, so that the first draws of
            # flip and jitter would always agree.
            compose.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = compose(image=image, bboxes=boxes, box_index=np.arange(len(boxes)))
        keep = np.asarray(out["box_index"], dtype=np.int64).reshape(-1)
        out_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        return out["image"], out_boxes, keep
