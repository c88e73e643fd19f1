"""Anchor coverage: how well the anchors of a config fit the ground-truth boxes of its training
set, and which `model.anchors` overrides would fit them better.

Every non-crowd GT box of the training split is resized as training resizes it (once per
`input.min_size`, since multi-scale training draws each of them), and its best IoU with any anchor
of the padded image, from the model's own `AnchorGenerator`, puts it in one of three groups by
the matcher's thresholds:

- foreground: best IoU >= `model.matcher.fg_iou_threshold` (0.5). Anchors that overlap the box
  well are trained to detect it.
- low-quality band: `bg_iou_threshold` (0.4) <= best IoU < 0.5. No anchor reaches foreground;
  only `allow_low_quality_matches` (on by default) makes the best ones foreground anyway, with
  large regression targets, and without it the box is never a training target.
- none (missed): best IoU < 0.4. Even the best anchor overlaps the box no more than a background
  anchor; a low-quality match, if on, hands the box an anchor that barely covers it.

Coverage is reported per size bucket, by the side sqrt(w h) of the resized box in pixels: COCO's
small / medium / large (< 32, 32-96, > 96; COCO defines them on original-image areas) and finer
bins 0-8, 8-16, ..., 256+. Each box is counted once per training scale; horizontal flips are not
modelled (they move a box against the anchor grid by less than one stride).

The best IoU over all anchors is computed exactly without building the (boxes x anchors) matrix:
for a fixed anchor shape, IoU with a box falls as the centres move apart along x and along y
independently, so the best anchor of each shape on a level is one of the 2 x 2 grid positions
nearest the box centre. That is 4 * A candidates per level and box, vectorised over boxes.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from retinanet.analysis.tables import markdown_table
from retinanet.config import Config
from retinanet.data.build import build_dataset, resolve_data_paths
from retinanet.data.coco import CocoDetection
from retinanet.data.transforms import resized_shape
from retinanet.files import atomic_savefig, atomic_write_json, atomic_write_text, json_safe
from retinanet.model.anchors import AnchorGenerator
from retinanet.model.build import build_model

# (name, low, high) of the size buckets, by sqrt(box area) in resized-image pixels.
COCO_BUCKETS = (("small", 0.0, 32.0), ("medium", 32.0, 96.0), ("large", 96.0, math.inf))
FINE_EDGES = (0.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, math.inf)

# Candidates of the suggestion search: the config's sizes times these factors (half-octave
# steps, the levels keeping their ratios to each other) and these aspect-ratio sets.
SIZE_FACTORS = tuple(2.0 ** (k / 2) for k in range(-4, 3))
RATIO_SETS = ((0.5, 1.0, 2.0), (1 / 3, 0.5, 1.0, 2.0, 3.0), (0.25, 0.5, 1.0, 2.0, 4.0))
# Minimum gain in overall foreground coverage for a suggestion: more aspect ratios make the
# head larger and slower, so they must earn more than a change of sizes.
MIN_GAIN_SIZES = 0.005
MIN_GAIN_RATIOS = 0.01

JSON_NAME = "anchor_coverage.json"
MARKDOWN_NAME = "anchor_coverage.md"
PLOT_NAME = "anchor_coverage.png"


@dataclass(frozen=True)
class ResizedBoxes:
    """GT boxes as training sees them. boxes: (N, 4) float32 xyxy in resized-image pixels;
    padded_sizes: (N, 2) int64 (H, W) of the padded image each lies in. N counts every box once
    per training scale."""

    boxes: Tensor
    padded_sizes: Tensor
    num_images: int
    num_scales: int


@dataclass(frozen=True)
class BucketCoverage:
    """Coverage of the boxes whose side sqrt(w h) lies in [low, high) px. The three fractions
    (foreground, low-quality band, none) sum to 1 (NaN when the bucket is empty);
    median_best_iou is over the bucket's boxes."""

    name: str
    low: float
    high: float
    num_boxes: int
    foreground: float
    low_quality: float
    none: float
    median_best_iou: float


@dataclass(frozen=True)
class AnchorSetting:
    """One set of anchors and its coverage: buckets[0] is all boxes, then COCO's three, then the
    fine bins."""

    sizes: tuple[float, ...]
    aspect_ratios: tuple[float, ...]
    buckets: tuple[BucketCoverage, ...]

    @property
    def foreground(self) -> float:
        return self.buckets[0].foreground

    def overrides(self) -> list[str]:
        """The `key=value` arguments that select these anchors."""
        return [
            f"model.anchors.sizes=[{','.join(_number(s) for s in self.sizes)}]",
            f"model.anchors.aspect_ratios=[{','.join(_number(r) for r in self.aspect_ratios)}]",
        ]

    def bucket(self, name: str) -> BucketCoverage:
        return next(b for b in self.buckets if b.name == name)


@dataclass(frozen=True)
class AnchorCoverageStudy:
    """The config's anchors (`current`) and suggestions [(why, setting)], best first."""

    current: AnchorSetting
    suggestions: tuple[tuple[str, AnchorSetting], ...]
    fg_iou_threshold: float
    bg_iou_threshold: float
    allow_low_quality_matches: bool
    num_images: int
    num_boxes: int
    min_sizes: tuple[int, ...]
    max_size: int

    def to_dict(self) -> dict[str, Any]:
        def setting(s: AnchorSetting) -> dict[str, Any]:
            return {
                "sizes": list(s.sizes),
                "aspect_ratios": list(s.aspect_ratios),
                "overrides": s.overrides(),
                "buckets": [dataclasses.asdict(b) for b in s.buckets],
            }

        return json_safe(
            {
                "fg_iou_threshold": self.fg_iou_threshold,
                "bg_iou_threshold": self.bg_iou_threshold,
                "allow_low_quality_matches": self.allow_low_quality_matches,
                "num_images": self.num_images,
                "num_boxes": self.num_boxes,
                "train_min_sizes": list(self.min_sizes),
                "train_max_size": self.max_size,
                "current": setting(self.current),
                "suggestions": [{"why": why, **setting(s)} for why, s in self.suggestions],
            }
        )


def resized_training_boxes(
    dataset: CocoDetection,
    min_sizes: Sequence[int],
    max_size: int,
    size_divisibility: int,
    indices: Sequence[int] | None = None,
) -> ResizedBoxes:
    """The non-crowd boxes of the images `indices` of `dataset` (default all), resized to each
    of `min_sizes` (capped by `max_size`, as `DetectionTransform` does), with the size of their
    image padded to a multiple of `size_divisibility` (a batch may pad further, which only adds
    anchors beyond the image's right and bottom edges)."""
    indices = range(len(dataset)) if indices is None else [int(i) for i in indices]
    per_image, sizes = [], []
    for index in indices:  # a loop over images, not boxes
        boxes = dataset.annotations(index)["boxes"]
        if len(boxes):
            info = dataset.coco.imgs[dataset.image_ids[index]]
            per_image.append(boxes)
            sizes.append((int(info["height"]), int(info["width"])))
    all_boxes, all_padded = [], []
    for min_size in min_sizes:
        for boxes, (height, width) in zip(per_image, sizes, strict=True):
            new_h, new_w = resized_shape(height, width, min_size, max_size)
            scale = np.array([new_w / width, new_h / height] * 2, dtype=np.float32)
            all_boxes.append(boxes * scale)
            padded = (_round_up(new_h, size_divisibility), _round_up(new_w, size_divisibility))
            all_padded.append(np.tile(padded, (len(boxes), 1)))
    if not all_boxes:
        raise ValueError(f"{dataset.annotation_file}: no (non-crowd) box to analyse")
    return ResizedBoxes(
        torch.from_numpy(np.concatenate(all_boxes)),
        torch.from_numpy(np.concatenate(all_padded).astype(np.int64)),
        num_images=len(indices),
        num_scales=len(min_sizes),
    )


def best_anchor_iou(
    generator: AnchorGenerator, boxes: ResizedBoxes, chunk_size: int = 8192
) -> Tensor:
    """(N,) float32: each box's highest IoU with any anchor of its padded image."""
    best = torch.zeros(len(boxes.boxes))
    padded, group = torch.unique(boxes.padded_sizes, dim=0, return_inverse=True)
    num_shapes = generator.num_anchors_per_location
    for g, (height, width) in enumerate(padded.tolist()):  # one anchor grid per image size
        members = torch.nonzero(group == g).squeeze(1)
        feature_sizes = _feature_sizes(height, width, generator.strides)
        anchors = generator((height, width), feature_sizes)
        per_level = anchors.split(generator.num_anchors_per_level(feature_sizes))
        for level, (h, w) in zip(per_level, feature_sizes, strict=True):
            grid = level.view(h, w, num_shapes, 4)
            for chunk in members.split(chunk_size):
                iou = _best_iou_on_grid(grid, boxes.boxes[chunk])
                best[chunk] = torch.maximum(best[chunk], iou)
    return best


def coverage_by_size(
    best_iou: Tensor, boxes: Tensor, fg_iou_threshold: float, bg_iou_threshold: float
) -> tuple[BucketCoverage, ...]:
    """best_iou: (N,); boxes: (N, 4) xyxy resized pixels -> all, COCO and fine buckets."""
    wh = (boxes[:, 2:] - boxes[:, :2]).double()
    side = (wh[:, 0] * wh[:, 1]).sqrt().numpy()
    iou = best_iou.double().numpy()
    foreground = iou >= fg_iou_threshold
    low_quality = ~foreground & (iou >= bg_iou_threshold)
    missed = iou < bg_iou_threshold
    buckets = [("all", 0.0, math.inf), *COCO_BUCKETS]
    buckets += [
        (f"{_number(lo)}-{_number(hi)}" if math.isfinite(hi) else f"{_number(lo)}+", lo, hi)
        for lo, hi in itertools.pairwise(FINE_EDGES)
    ]
    result = []
    for name, lo, hi in buckets:
        inside = (side >= lo) & (side < hi)
        n = int(inside.sum())
        fg = float(foreground[inside].mean()) if n else math.nan
        lq = float(low_quality[inside].mean()) if n else math.nan
        none = float(missed[inside].mean()) if n else math.nan
        median = float(np.median(iou[inside])) if n else math.nan
        result.append(BucketCoverage(name, lo, hi, n, fg, lq, none, median))
    return tuple(result)


def evaluate_setting(
    generator: AnchorGenerator,
    boxes: ResizedBoxes,
    fg_iou_threshold: float,
    bg_iou_threshold: float,
) -> AnchorSetting:
    best = best_anchor_iou(generator, boxes)
    return AnchorSetting(
        tuple(generator.sizes),
        tuple(generator.aspect_ratios),
        coverage_by_size(best, boxes.boxes, fg_iou_threshold, bg_iou_threshold),
    )


def suggest_anchors(
    generator: AnchorGenerator,
    boxes: ResizedBoxes,
    fg_iou_threshold: float,
    bg_iou_threshold: float,
    current: AnchorSetting,
) -> tuple[tuple[str, AnchorSetting], ...]:
    """Settings that raise the overall foreground coverage: the best rescaling of the sizes
    (aspect ratios kept), and the best with other aspect ratios too when that gains another
    MIN_GAIN_RATIOS. Empty when no candidate beats `current` (the config's anchors) by
    MIN_GAIN_SIZES."""
    ratio_sets = [tuple(generator.aspect_ratios)] + [
        r for r in RATIO_SETS if not _same_values(r, generator.aspect_ratios)
    ]
    # Factors closest to 1 first, so that ties keep the smaller change.
    factors = sorted(SIZE_FACTORS, key=lambda f: abs(math.log(f)))
    candidates = []
    for ratios in ratio_sets:
        for factor in factors:
            sizes = tuple(round(s * factor, 1) for s in generator.sizes)
            variant = _variant(generator, sizes, ratios)
            candidates.append(evaluate_setting(variant, boxes, fg_iou_threshold, bg_iou_threshold))
    # The first len(factors) candidates keep the config's aspect ratios.
    best_sizes = max(candidates[: len(factors)], key=lambda s: s.foreground)
    best_any = max(candidates, key=lambda s: s.foreground)
    suggestions = []
    baseline = current.foreground
    if best_sizes.foreground >= current.foreground + MIN_GAIN_SIZES:
        suggestions.append(("sizes", best_sizes))
        baseline = best_sizes.foreground
    if (
        best_any.aspect_ratios != current.aspect_ratios
        and best_any.foreground >= baseline + MIN_GAIN_RATIOS
    ):
        suggestions.append(("sizes and aspect ratios (more anchors per location)", best_any))
    return tuple(suggestions)


def analyze_anchor_coverage(
    cfg: Config,
    output_dir: str | os.PathLike | None = None,
    max_images: int | None = None,
    seed: int = 0,
    suggest: bool = True,
) -> AnchorCoverageStudy:
    """The coverage study of `cfg`'s anchors on its training split (a seeded sample of
    `max_images` images when given); writes anchor_coverage.{json,md,png} into `output_dir`."""
    cfg = resolve_data_paths(cfg)
    dataset = build_dataset(cfg, "train", training=True)
    # The generator exactly as the model builds it (strides from the FPN, quantisation, ...);
    # the network's weights are never used, so none are loaded.
    generator = build_model(cfg, num_classes=1, load_backbone_weights=False).anchor_generator
    indices = None
    if max_images is not None and max_images < len(dataset):
        indices = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:max_images])
    boxes = resized_training_boxes(
        dataset, cfg.input.min_size, cfg.input.max_size, cfg.input.size_divisibility, indices
    )
    matcher = cfg.model.matcher
    fg, bg = matcher.fg_iou_threshold, matcher.bg_iou_threshold
    current = evaluate_setting(generator, boxes, fg, bg)
    suggestions = suggest_anchors(generator, boxes, fg, bg, current) if suggest else ()
    study = AnchorCoverageStudy(
        current=current,
        suggestions=suggestions,
        fg_iou_threshold=fg,
        bg_iou_threshold=bg,
        allow_low_quality_matches=matcher.allow_low_quality_matches,
        num_images=boxes.num_images,
        num_boxes=len(boxes.boxes) // boxes.num_scales,
        min_sizes=tuple(cfg.input.min_size),
        max_size=cfg.input.max_size,
    )
    if output_dir is not None:
        output_dir = Path(output_dir)
        atomic_write_json(output_dir / JSON_NAME, study.to_dict())
        atomic_write_text(output_dir / MARKDOWN_NAME, format_coverage(study))
        plot_coverage(output_dir / PLOT_NAME, study)
    return study


def format_coverage(study: AnchorCoverageStudy) -> str:
    """Markdown: the coverage table of the current anchors, then each suggestion."""
    fg, bg = _number(study.fg_iou_threshold), _number(study.bg_iou_threshold)
    rescue = (
        "only allow_low_quality_matches gives the box an anchor"
        if study.allow_low_quality_matches
        else "no anchor is trained on the box (allow_low_quality_matches is false)"
    )
    lines = [
        f"Anchor coverage of {study.num_boxes} training boxes in {study.num_images} images, "
        f"resized to min_size {list(study.min_sizes)} / max_size {study.max_size} (each box "
        f"once per scale), by the best IoU of any anchor with the box. foreground: >= {fg}; "
        f"low-quality band: {bg}-{fg}, {rescue}; none: < {bg}, the box is missed.",
        "",
        f"Current anchors: {' '.join(study.current.overrides())}",
        "",
        *_table(study.current, None),
    ]
    if not study.suggestions:
        lines += ["", "No candidate setting raises foreground coverage; keep these anchors."]
    for why, setting in study.suggestions:
        lines += [
            "",
            f"Suggested ({why}): {' '.join(setting.overrides())}",
            f"foreground coverage {setting.foreground:.1%} (now {study.current.foreground:.1%})",
            "",
            *_table(setting, study.current),
        ]
    return "\n".join(lines) + "\n"


def plot_coverage(path: str | os.PathLike, study: AnchorCoverageStudy) -> Figure:
    """Stacked bars per fine size bucket (foreground / low-quality band / none) for the current
    anchors, with the foreground fraction of each suggestion marked; written to `path`."""
    fine = study.current.buckets[1 + len(COCO_BUCKETS) :]
    x = np.arange(len(fine))
    figure = Figure(figsize=(10.5, 4.5), layout="constrained")
    ax = figure.subplots()
    bottom = np.zeros(len(fine))
    fg, bg = _number(study.fg_iou_threshold), _number(study.bg_iou_threshold)
    for field, color, label in (
        ("foreground", "tab:green", f"foreground (best IoU >= {fg})"),
        ("low_quality", "tab:orange", f"low-quality band ({bg}-{fg})"),
        ("none", "0.6", f"none (< {bg})"),
    ):
        values = np.nan_to_num([getattr(b, field) for b in fine])
        ax.bar(x, values, bottom=bottom, color=color, label=label, width=0.7)
        bottom += values
    for marker, (_, setting) in zip("D^", study.suggestions, strict=False):
        values = [b.foreground for b in setting.buckets[1 + len(COCO_BUCKETS) :]]
        sizes = ",".join(_number(s) for s in setting.sizes)
        ratios = ",".join(_number(r) for r in setting.aspect_ratios)
        label = f"foreground with suggested\nsizes [{sizes}]\nratios [{ratios}]"
        ax.plot(x, values, marker, color="k", label=label)
    for i, bucket in enumerate(fine):
        ax.text(i, 1.01, str(bucket.num_boxes), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [b.name for b in fine])
    ax.set_xlabel("box side sqrt(w h) after resize (px); number of boxes above the bars")
    ax.set(ylabel="fraction of boxes", ylim=(0, 1.12))
    sizes = ",".join(_number(s) for s in study.current.sizes)
    ax.set_title(f"best anchor IoU of each training box, anchors [{sizes}]")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    atomic_savefig(path, figure, dpi=120)
    return figure


def _table(setting: AnchorSetting, before: AnchorSetting | None) -> list[str]:
    headers = ["box side (px)", "boxes", "foreground", "low-quality band", "none"]
    headers += ["median best IoU", *(["foreground now"] if before is not None else [])]
    names = {"small": "small (<32)", "medium": "medium (32-96)", "large": "large (>96)"}
    rows = []
    for i, b in enumerate(setting.buckets):
        row = [names.get(b.name, b.name), str(b.num_boxes), _percent(b.foreground)]
        row += [_percent(b.low_quality), _percent(b.none), _fixed(b.median_best_iou)]
        if before is not None:
            row.append(_percent(before.buckets[i].foreground))
        rows.append(row)
    return markdown_table(headers, rows)


def _variant(
    generator: AnchorGenerator, sizes: Sequence[float], aspect_ratios: Sequence[float]
) -> AnchorGenerator:
    """`generator` with other sizes and aspect ratios, everything else the same."""
    return AnchorGenerator(
        sizes=sizes,
        strides=generator.strides,
        scales=generator.scales,
        aspect_ratios=aspect_ratios,
        offset=generator.offset,
        quantize=generator.quantize,
        stride_from_feature_size=generator.stride_from_feature_size,
    )


def _feature_sizes(height: int, width: int, strides: Sequence[int]) -> list[tuple[int, int]]:
    # Every stride-2 layer of the backbone and FPN maps n to ceil(n / 2), and repeated ceilings
    # of halves equal one ceiling: the level of stride s is ceil(H / s) x ceil(W / s).
    return [(-(-height // s), -(-width // s)) for s in strides]


def _best_iou_on_grid(grid: Tensor, boxes: Tensor) -> Tensor:
    """grid: (h, w, A, 4) anchors of one level; boxes: (n, 4) -> (n,) best IoU on the level.

    The level is a product grid: anchor (row, col, a) spans x1[a, col]..x2[a, col] and
    y1[a, row]..y2[a, row], so the x and y overlaps are computed separately, (A, n, 2) each for
    the two nearest columns and rows, and combined into the (A, n, 2, 2) candidate IoUs."""
    x1, x2 = grid[0, :, :, 0].T, grid[0, :, :, 2].T  # (A, w) per shape and column
    y1, y2 = grid[:, 0, :, 1].T, grid[:, 0, :, 3].T  # (A, h) per shape and row
    cols = _two_nearest((x1 + x2) / 2, (boxes[:, 0] + boxes[:, 2]) / 2)  # (A, n, 2)
    rows = _two_nearest((y1 + y2) / 2, (boxes[:, 1] + boxes[:, 3]) / 2)  # (A, n, 2)
    overlap_x, width = _overlap(x1, x2, cols, boxes[:, 0], boxes[:, 2])
    overlap_y, height = _overlap(y1, y2, rows, boxes[:, 1], boxes[:, 3])
    inter = overlap_x[..., :, None] * overlap_y[..., None, :]  # (A, n, 2, 2)
    anchor_area = width[..., :, None] * height[..., None, :]
    box_area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[:, None, None]
    union = (anchor_area + box_area - inter).clamp_(min=torch.finfo(inter.dtype).tiny)
    return (inter / union).amax(dim=(0, 2, 3))


def _overlap(
    low: Tensor, high: Tensor, index: Tensor, box_low: Tensor, box_high: Tensor
) -> tuple[Tensor, Tensor]:
    """low, high: (A, L) anchor extents along one axis; index: (A, n, 2) positions; box_low,
    box_high: (n,) -> overlap lengths and anchor lengths, (A, n, 2) each."""
    flat = index.flatten(1)  # (A, n * 2)
    a_low = low.gather(1, flat).view_as(index)
    a_high = high.gather(1, flat).view_as(index)
    overlap = torch.minimum(a_high, box_high[:, None]) - torch.maximum(a_low, box_low[:, None])
    return overlap.clamp_(min=0), a_high - a_low


def _two_nearest(centres: Tensor, values: Tensor) -> Tensor:
    """centres: (A, L) ascending; values: (n,) -> (A, n, 2) indices of the centres just below
    and just above each value (clamped to the grid), one of which is the nearest."""
    centres = centres.contiguous()
    queries = values.expand(centres.shape[0], -1).contiguous()
    above = torch.searchsorted(centres, queries).clamp_(max=centres.shape[1] - 1)
    below = (above - 1).clamp_(min=0)
    return torch.stack([below, above], dim=-1)


def _same_values(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and bool(np.allclose(sorted(a), sorted(b)))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _number(value: float) -> str:
    return f"{value:g}"


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1%}"


def _fixed(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"
