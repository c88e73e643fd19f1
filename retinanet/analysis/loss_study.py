"""The loss-distribution study of a trained model (paper Sec. 5.1, Figure 4), end to end.

A fixed model, in eval mode and with the test-time transform, is run on a seeded random sample
of images. Each anchor is labelled by the model's own matcher (`RetinaNetCriterion.match`, with
the ground truth in resized pixels like the anchors), exactly as training labels it, and the
classification logits feed a `LossDistribution`, whose curves are then written by
`write_loss_cdf`.

One departure from the training loss: background anchors centred in the padding of a batch
(beyond an image's own height or width) are left out. They see only the padding, and how many
there are depends on which images share a batch, so keeping them would make the curves depend
on the batch size. Their number is reported.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from retinanet.analysis.loss_distribution import (
    KINDS,
    LossDistribution,
    hardest_share,
    write_loss_cdf,
)
from retinanet.analysis.plots import plot_loss_vs_pt
from retinanet.data.build import build_dataset, build_test_loader, resolve_data_paths
from retinanet.engine.checkpoint import load_trained_model
from retinanet.engine.inference import iter_model_outputs
from retinanet.engine.precision import AmpMode
from retinanet.files import atomic_write_json
from retinanet.model.matcher import BACKGROUND, IGNORE
from retinanet.model.retinanet import RetinaNet

SPLITS = ("train", "val")
HARDEST_FRACTIONS = (0.01, 0.10, 0.20)


@dataclass(frozen=True)
class AnchorCounts:
    """Anchors over all images of a study, as labelled by the matcher: `foreground` and
    `background` anchors are the samples; `ignored` ones (IoU in the ignore band, or in a crowd
    region) are not; `padding` counts the background anchors centred in batch padding, which
    were left out (see module doc)."""

    foreground: int
    background: int
    ignored: int
    padding: int


@dataclass
class LossStudy:
    """Result of `collect_loss_distribution`: the histograms, the dataset ids of the images
    used (in the order run) and the anchor counts."""

    distribution: LossDistribution
    image_ids: list[int]
    anchors: AnchorCounts


def sample_image_indices(num_available: int, num_images: int | None, seed: int) -> list[int]:
    """Sorted indices of `num_images` images drawn without replacement from
    range(num_available), the same for the same seed; all of them when num_images is None."""
    if num_images is None:
        return list(range(num_available))
    if num_images < 1:
        raise ValueError(f"the number of images must be >= 1, got {num_images}")
    if num_images > num_available:
        raise ValueError(f"asked for {num_images} images but only {num_available} are available")
    chosen = np.random.default_rng(seed).choice(num_available, size=num_images, replace=False)
    return sorted(chosen.tolist())


def anchors_in_padding(anchors: Tensor, image_sizes: Tensor) -> Tensor:
    """anchors (A, 4) xyxy in batch pixels; image_sizes (B, 2) (H, W) before padding ->
    (B, A) bool, True where the anchor's centre lies at or beyond the image's height or
    width."""
    centre_x = (anchors[:, 0] + anchors[:, 2]) / 2
    centre_y = (anchors[:, 1] + anchors[:, 3]) / 2
    sizes = image_sizes.to(device=anchors.device, dtype=anchors.dtype)
    return (centre_y[None, :] >= sizes[:, 0, None]) | (centre_x[None, :] >= sizes[:, 1, None])


@torch.no_grad()
def collect_loss_distribution(
    model: RetinaNet,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    gammas: Sequence[float] = (0.0, 0.5, 1.0, 2.0),
    view: str = "anchor",
    amp: AmpMode | None = None,
    progress: bool = False,
) -> LossStudy:
    """Run `model` (put in eval mode, restored afterwards) on the test-time batches of `loader`
    and feed each image's classification logits and matcher labels to a
    `LossDistribution(gammas, view)`.

    amp: None (fp32), "bf16" or "fp16" for the network; the losses are computed in float32.
    """
    distribution = LossDistribution(gammas, view)
    image_ids: list[int] = []
    totals = torch.zeros(4, dtype=torch.int64)  # foreground, background, ignored, padding
    for batch, outputs in iter_model_outputs(
        model, loader, device, amp, progress, "loss distribution"
    ):
        _, anchor_classes, _ = model.criterion.match(outputs.anchors, batch.targets)
        padding = (anchor_classes == BACKGROUND) & anchors_in_padding(
            outputs.anchors, batch.image_sizes
        )
        anchor_classes = anchor_classes.masked_fill(padding, IGNORE)
        totals += torch.stack(
            [
                (anchor_classes >= 0).sum(),
                (anchor_classes == BACKGROUND).sum(),
                (anchor_classes == IGNORE).sum() - padding.sum(),
                padding.sum(),
            ]
        ).cpu()
        # One image at a time: the per-sample loss tensors of a whole batch of COCO images
        # would take gigabytes.
        for logits, labels in zip(outputs.cls_logits, anchor_classes, strict=True):
            distribution.update(logits, labels)
        image_ids.extend(batch.image_ids)
    return LossStudy(distribution, image_ids, AnchorCounts(*totals.tolist()))


def format_loss_summary(study: LossStudy) -> str:
    """A short text table: per gamma and kind, the number of samples and the share of the total
    loss carried by the hardest 1%, 10% and 20% of them."""
    counts = study.anchors
    lines = [
        f"{len(study.image_ids)} images, {study.distribution.view} view: "
        f"{counts.foreground} foreground, {counts.background} background anchors "
        f"({counts.ignored} ignored, {counts.padding} in batch padding left out)",
        f"{'gamma':>6}  {'kind':<10}  {'samples':>12}  "
        + "  ".join(f"{f'hardest {fraction:.0%}':>11}" for fraction in HARDEST_FRACTIONS),
    ]
    for gamma in study.distribution.gammas:
        for kind in KINDS:
            hist = study.distribution.histogram(gamma, kind)
            shares = "  ".join(
                f"{hardest_share(hist, fraction):>11.1%}" for fraction in HARDEST_FRACTIONS
            )
            lines.append(f"{gamma:>6g}  {kind:<10}  {hist.num_samples:>12}  {shares}")
    return "\n".join(lines) + "\n"


def run_loss_study(
    weights: str | os.PathLike,
    output_dir: str | os.PathLike,
    config_path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    gammas: Sequence[float] = (0.0, 0.5, 1.0, 2.0),
    num_images: int | None = None,
    split: str = "val",
    view: str = "anchor",
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> LossStudy:
    """The whole study of checkpoint `weights`: load the model (architecture from `config_path`
    plus `overrides`, default the checkpoint's config), sample `num_images` images of data.<split>
    (all by default) with `seed`, collect the loss distribution and write into `output_dir`:
    loss_cdf.csv, loss_cdf_summary.json, loss_cdf.png (see `write_loss_cdf`), loss_vs_pt.png
    (paper Figure 1) and loss_study.json (checkpoint, split, seed, image ids, anchor counts).

    Raises ValueError when the sampled images have no foreground anchor at all.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    device = torch.device(device)
    model, cfg, _ = load_trained_model(weights, config_path, list(overrides), device)
    cfg = resolve_data_paths(cfg)
    dataset = build_dataset(cfg, split, training=False)
    try:
        indices = sample_image_indices(len(dataset), num_images, seed)
    except ValueError as error:
        raise ValueError(f"split {split!r} ({dataset.annotation_file}): {error}") from error
    loader = build_test_loader(cfg, torch.utils.data.Subset(dataset, indices))
    study = collect_loss_distribution(
        model, loader, device, gammas, view, cfg.precision.amp, progress
    )
    if study.anchors.foreground == 0:
        raise ValueError(
            f"no foreground anchors in the {len(indices)} images of split {split!r} "
            f"({dataset.annotation_file}): the images have no boxes that the matcher assigns; "
            "use more images (--num-images) or another split"
        )

    output_dir = Path(output_dir)
    write_loss_cdf(study.distribution, output_dir)
    plot_loss_vs_pt(output_dir / "loss_vs_pt.png")
    atomic_write_json(
        output_dir / "loss_study.json",
        {
            "weights": str(weights),
            "split": split,
            "annotation_file": str(dataset.annotation_file),
            "view": view,
            "gammas": list(study.distribution.gammas),
            "seed": seed,
            "num_images": len(study.image_ids),
            "image_ids": study.image_ids,
            "anchors": {
                "foreground": study.anchors.foreground,
                "background": study.anchors.background,
                "ignored": study.anchors.ignored,
                "padding_left_out": study.anchors.padding,
            },
        },
    )
    return study
