r"""Cumulative distribution of the focal loss of a trained model (paper Figure 4).

    retinanet analyze-loss --weights runs/shapes/model_final.pth \
        --output-dir runs/shapes/loss_cdf --num-images 200
    retinanet analyze-loss --config configs/retinanet_R50_FPN_600.yaml \
        --weights runs/r50_600/model_final.pth --output-dir runs/r50_600/loss_cdf \
        --gammas 0 0.5 1 2 --num-images 500 --view binary

Runs the model on a seeded random sample of data.<split> (all images by default), labels the
anchors with the model's own matcher and re-evaluates the focal loss of every foreground and
background sample for each gamma. Writes DIR/loss_cdf.csv, loss_cdf_summary.json, loss_cdf.png,
loss_vs_pt.png (paper Figure 1) and loss_study.json, and prints the share of the loss carried
by the hardest samples. --config defaults to the config stored in the checkpoint; trailing
key=value arguments override config keys (e.g. precision.amp= to run the network in fp32).
"""

from __future__ import annotations

import argparse

from retinanet.analysis.loss_distribution import VIEWS
from retinanet.analysis.loss_study import SPLITS, format_loss_summary, run_loss_study
from retinanet.cli.arguments import add_checkpoint_config, add_device, add_overrides, add_seed
from retinanet.engine.device import resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_config(parser)
    parser.add_argument("--weights", required=True, help="checkpoint (.pth) of this project")
    parser.add_argument("--output-dir", required=True, help="where the curves and plots go")
    parser.add_argument(
        "--gammas",
        type=float,
        nargs="+",
        default=[0.0, 0.5, 1.0, 2.0],
        metavar="GAMMA",
        help="focal-loss gammas to evaluate (default 0 0.5 1 2)",
    )
    parser.add_argument("--num-images", type=int, help="images to sample (default: all)")
    parser.add_argument("--split", choices=SPLITS, default="val")
    parser.add_argument(
        "--view",
        choices=VIEWS,
        default="anchor",
        help="anchor: one sample per anchor; binary: one per (anchor, class) pair",
    )
    add_seed(parser, "the image sample")
    add_device(parser)
    add_overrides(parser)


def run(args: argparse.Namespace) -> int:
    study = run_loss_study(
        args.weights,
        args.output_dir,
        config_path=args.config,
        overrides=args.overrides,
        gammas=args.gammas,
        num_images=args.num_images,
        split=args.split,
        view=args.view,
        seed=args.seed,
        device=resolve_device(args.device),
        progress=True,
    )
    print(format_loss_summary(study), end="")
    print(f"-> {args.output_dir}")
    return 0
