"""Batching detection samples: images zero-padded to a common size and the per-image targets
kept as lists (their lengths differ)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .coco import DatasetError

# Tensors of a target dict, moved to the device together with the images.
TARGET_KEYS = ("boxes", "labels", "crowd_boxes")


@dataclasses.dataclass
class Batch:
    """A padded batch.

    images: (B, 3, Hp, Wp) uint8 RGB, zero-padded at the bottom and right; Hp, Wp are multiples
        of the collate's `size_divisibility`.
    image_sizes: (B, 2) int64 (H, W) of each image before padding.
    targets: per image, boxes (N, 4) float32 xyxy and crowd_boxes (M, 4) float32 xyxy in the
        pixels of `images`, labels (N,) int64.
    image_ids: dataset image ids; orig_sizes: (H0, W0) of each image as stored on disk.
    bad_images: messages naming images that could not be read (data.on_bad_image=stop); a batch
        with any is empty otherwise, and whoever consumes it stops with the first message.
    skipped_images: messages naming unreadable images replaced by others (on_bad_image=skip).
    """

    images: Tensor
    image_sizes: Tensor
    targets: list[dict[str, Tensor]]
    image_ids: list[int]
    orig_sizes: list[tuple[int, int]]
    bad_images: list[str] = dataclasses.field(default_factory=list)
    skipped_images: list[str] = dataclasses.field(default_factory=list)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) in its pinning thread."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn: Any) -> Batch:
        return Batch(
            images=fn(self.images),
            image_sizes=fn(self.image_sizes),
            targets=[{k: fn(t[k]) for k in TARGET_KEYS} for t in self.targets],
            image_ids=self.image_ids,
            orig_sizes=self.orig_sizes,
            bad_images=self.bad_images,
            skipped_images=self.skipped_images,
        )


def raise_on_bad_images(batch: Batch, advice: str = "") -> None:
    """Raise DatasetError with the first unreadable image's message if `batch` holds any."""
    if batch.bad_images:
        more = len(batch.bad_images) - 1
        message = batch.bad_images[0] + (f" (and {more} more in this batch)" if more else "")
        raise DatasetError(message + (f"; {advice}" if advice else ""))


def collate_detection(samples: Sequence[dict[str, Any]], size_divisibility: int = 128) -> Batch:
    """Stack dataset items into a `Batch`. `size_divisibility` is the largest stride the model
    needs the input to divide evenly (128 = the stride of P7; torchvision-compatible configs use
    32)."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    if size_divisibility < 1:
        raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")
    bad = [s["bad_image"] for s in samples if "bad_image" in s]
    if bad:
        return Batch(
            images=torch.zeros(0, 3, size_divisibility, size_divisibility, dtype=torch.uint8),
            image_sizes=torch.zeros(0, 2, dtype=torch.int64),
            targets=[],
            image_ids=[],
            orig_sizes=[],
            bad_images=bad,
        )
    sizes = torch.tensor([tuple(s["image"].shape[1:]) for s in samples], dtype=torch.int64)
    padded = (sizes.amax(dim=0) + size_divisibility - 1) // size_divisibility * size_divisibility
    images = samples[0]["image"].new_zeros((len(samples), 3, *padded.tolist()))
    for image, sample in zip(images, samples, strict=True):
        height, width = sample["image"].shape[1:]
        image[:, :height, :width].copy_(sample["image"])
    return Batch(
        images=images,
        image_sizes=sizes,
        targets=[{k: s[k] for k in TARGET_KEYS} for s in samples],
        image_ids=[int(s["image_id"]) for s in samples],
        orig_sizes=[tuple(s["orig_size"]) for s in samples],
        skipped_images=[m for s in samples for m in s.get("skipped_images", ())],
    )
