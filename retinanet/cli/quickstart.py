r"""The main job on the embedded dataset, end to end: generate the synthetic shapes dataset,
train configs/shapes.yaml from scratch, evaluate it with pycocotools, run the paper's
loss-distribution analysis (Figure 4) and the calibration study, and draw predictions.

    retinanet quickstart                                  # everything into runs/quickstart
    retinanet quickstart --output-dir runs/qs2 train.max_iter=400     # a shorter run

Running it again continues an interrupted training (--resume semantics) and redoes the analyses.
Outputs: DIR/train (checkpoints, metrics.jsonl, TensorBoard, eval/metrics.json),
DIR/loss_analysis (loss_cdf.png/csv, loss_cdf_summary.json, loss_vs_pt.png),
DIR/calibration (reliability diagrams, calibration.json/csv/md), DIR/predictions, and
DIR/summary.json (the headline numbers and the time of each stage).
"""

from __future__ import annotations

import argparse

from retinanet.cli.arguments import add_device, add_overrides
from retinanet.config import load_config
from retinanet.engine.device import resolve_device
from retinanet.quickstart import SHAPES_CONFIG, run_quickstart


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="runs/quickstart")
    parser.add_argument("--config", default=str(SHAPES_CONFIG), help="default: configs/shapes.yaml")
    add_device(parser)
    parser.add_argument("--num-predictions", type=int, default=8, help="val images to draw")
    add_overrides(parser)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    summary = run_quickstart(
        cfg, args.output_dir, resolve_device(args.device), args.num_predictions
    )
    print(
        f"\nAP {summary['AP']:.3f} (AP50 {summary['AP50']:.3f}, AP75 {summary['AP75']:.3f}) after "
        f"{summary['iterations']} iterations; total {summary['timings']['total_s'] / 60:.1f} min. "
        f"Everything is in {args.output_dir}/ (summary.json lists the files)."
    )
    return 0
