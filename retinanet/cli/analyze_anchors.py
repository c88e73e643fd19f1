r"""How well the anchors of a config fit the boxes of its training set, before training.

    retinanet analyze-anchors --config configs/shapes.yaml
    retinanet analyze-anchors --config configs/retinanet_R50_FPN_1x.yaml --max-images 0 \
        data.train.image_dir=my_data/images data.train.annotation_file=my_data/train.json

For the training split (a seeded sample of --max-images images) after the configured resize,
prints per box size the fraction of ground-truth boxes whose best anchor IoU reaches
model.matcher.fg_iou_threshold (foreground), only the band down to bg_iou_threshold (where just
a low-quality match gives the box an anchor), or less (missed); then suggested
model.anchors.sizes / aspect_ratios overrides that raise the foreground fraction, with the
coverage they would give. Writes DIR/anchor_coverage.{md,json,png} (DIR defaults to
runs/<config name>/anchor_coverage). Trailing key=value arguments override config keys.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from retinanet.analysis.anchor_coverage import analyze_anchor_coverage, format_coverage
from retinanet.cli.arguments import add_overrides, add_seed
from retinanet.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--output-dir", help="where the table, JSON and plot go")
    parser.add_argument(
        "--max-images",
        type=int,
        default=5000,
        help="analyse a seeded random sample of this many training images (default 5000; 0: all)",
    )
    add_seed(parser, "the image sample")
    parser.add_argument(
        "--no-suggest", action="store_true", help="only measure the configured anchors"
    )
    add_overrides(parser)


def run(args: argparse.Namespace) -> int:
    if args.max_images < 0:
        raise ValueError(f"--max-images must be >= 0 (0: all images), got {args.max_images}")
    output_dir = Path(args.output_dir or Path("runs") / Path(args.config).stem / "anchor_coverage")
    cfg = load_config(args.config, args.overrides)
    study = analyze_anchor_coverage(
        cfg,
        output_dir,
        max_images=args.max_images or None,
        seed=args.seed,
        suggest=not args.no_suggest,
    )
    print(format_coverage(study), end="")
    print(f"-> {output_dir}")
    return 0
