r"""COCO evaluation of a checkpoint on data.val.

    retinanet eval --config configs/shapes.yaml --weights runs/shapes/model_final.pth
    retinanet eval --weights weights/tv_r50.pth --output-dir runs/tv_eval \
        data.val.image_dir=datasets/coco/val2017 \
        data.val.annotation_file=datasets/coco/annotations/instances_val2017.json
    torchrun --nproc-per-node 8 tools/eval.py --config ... --weights ...

Writes DIR/coco_results.json (COCO results format: dataset category ids, xywh boxes) and
DIR/metrics.json (the 12 COCO numbers as fractions and per-category AP), prints the COCO summary
and a per-category table. --config defaults to the config stored in the checkpoint. Also writes
DIR/pr_curves.png (per-class precision-recall at IoU 0.5 and 0.5:0.95, data in pr_curves.csv)
and DIR/confusion_matrix.csv / .png (detections scoring >= --confusion-score-threshold matched
at IoU 0.5, with a background row and column); --no-plots skips them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from retinanet.analysis.detection_plots import write_detection_plots
from retinanet.cli.arguments import add_checkpoint_config, add_device, add_overrides
from retinanet.data.build import build_dataset, resolve_data_paths
from retinanet.engine.checkpoint import load_trained_model
from retinanet.engine.coco_metrics import RESULTS_FILENAME
from retinanet.engine.distributed import init_distributed, is_main_process, main_process_first
from retinanet.engine.inference import evaluate_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_config(parser)
    parser.add_argument("--weights", required=True, help="checkpoint (.pth) of this project")
    parser.add_argument("--output-dir", help="default: <weights folder>/eval")
    add_device(parser)
    parser.add_argument(
        "--confusion-score-threshold",
        type=float,
        default=0.5,
        help="detections counted in the confusion matrix score at least this (default 0.5)",
    )
    parser.add_argument(
        "--no-plots", action="store_true", help="skip the PR curves and the confusion matrix"
    )
    add_overrides(parser)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.confusion_score_threshold <= 1:
        raise ValueError(
            f"--confusion-score-threshold must be in [0, 1], got {args.confusion_score_threshold}"
        )
    output_dir = (
        Path(args.output_dir) if args.output_dir else Path(args.weights).resolve().parent / "eval"
    )
    device = init_distributed(args.device)
    model, cfg, classes = load_trained_model(args.weights, args.config, args.overrides, device)
    cfg = main_process_first(lambda: resolve_data_paths(cfg))
    dataset = build_dataset(cfg, "val", training=False)
    metrics = evaluate_model(
        model, dataset, classes, device, cfg, output_dir=output_dir, progress=True
    )
    if is_main_process():
        if not args.no_plots:
            write_detection_plots(
                output_dir,
                dataset,
                output_dir / RESULTS_FILENAME,
                metrics,
                score_threshold=args.confusion_score_threshold,
            )
        print(
            f"AP {metrics.AP:.4f}  AP50 {metrics.AP50:.4f}  AP75 {metrics.AP75:.4f} -> {output_dir}"
        )
    return 0
