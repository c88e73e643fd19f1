r"""Confidence calibration of trained detectors, before and after NMS, with temperature scaling
and isotonic regression fitted on half of the validation images.

    retinanet calibrate --weights runs/gamma0/model_final.pth runs/gamma1/model_final.pth \
        runs/gamma2/model_final.pth runs/gamma3/model_final.pth --output-dir runs/calibration
    retinanet calibrate --config configs/shapes.yaml --weights runs/shapes/model_final.pth \
        --output-dir runs/shapes/calibration --iou 0.75 --bins 15 --min-score 0.5

For each checkpoint, writes DIR/<model name>/calibration.json (D-ECE, MCE, Brier score and the
bins of each score set, the fitted temperature and isotonic map, COCO AP / AP50 before and after
recalibration) and one reliability diagram per score set; then DIR/calibration.csv and
DIR/calibration.md with one row per checkpoint. The model name is the folder of a
model_final.pth, else the checkpoint's file name. --config defaults to each checkpoint's stored
config; trailing key=value arguments override config keys.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from retinanet.analysis.calibration_study import CalibrationSettings, compare_calibration
from retinanet.cli.arguments import add_checkpoint_config, add_device, add_overrides
from retinanet.engine.device import resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_config(parser)
    parser.add_argument(
        "--weights", required=True, nargs="+", metavar="CKPT", help="one or more checkpoints"
    )
    parser.add_argument("--output-dir", required=True)
    parser.add_argument(
        "--iou", type=float, default=0.5, help="IoU at which a detection is correct (0.5)"
    )
    parser.add_argument("--bins", type=int, default=10, help="confidence bins over [0, 1] (10)")
    parser.add_argument(
        "--min-score",
        type=float,
        default=0.3,
        help="score detections whose original score is at least this (0.3)",
    )
    parser.add_argument(
        "--fit-fraction",
        type=float,
        default=0.5,
        help="fraction of the images the calibrators are fitted on (0.5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the fit/evaluation split")
    add_device(parser)
    add_overrides(parser)


def run(args: argparse.Namespace) -> int:
    misplaced = [w for w in args.weights if "=" in w and not Path(w).exists()]
    if misplaced:
        raise FileNotFoundError(
            f"checkpoint not found: {misplaced[0]}; put key=value overrides before --weights"
        )
    records = compare_calibration(
        args.weights,
        args.output_dir,
        config_path=args.config,
        overrides=args.overrides,
        settings=CalibrationSettings(
            args.iou, args.bins, args.min_score, args.fit_fraction, args.seed
        ),
        device=resolve_device(args.device),
        progress=True,
    )
    for record in records:
        for key in ("temperature", "isotonic"):
            error = record[key]["error"]
            if error is not None:
                print(f"warning: {record['model']}: no {key} fit: {error}", file=sys.stderr)
    print((Path(args.output_dir) / "calibration.md").read_text(encoding="utf-8"), end="")
    return 0
