r"""Detect objects in an image or a folder of images.

    retinanet predict --config configs/shapes.yaml --weights runs/shapes/model_final.pth \
        --input datasets/shapes/val --output runs/predictions --score-threshold 0.5

Writes DIR/predictions.json (one entry per image: file_name, boxes [[x1, y1, x2, y2], ...] in
original-image pixels, scores, labels as dataset category ids, class_names) and a copy of each
image with the detections scoring >= --score-threshold drawn.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from retinanet.data.build import build_transform
from retinanet.engine.checkpoint import load_trained_model
from retinanet.engine.device import resolve_device
from retinanet.engine.predict import list_images, predict_files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (default: the checkpoint's)")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--input", required=True, help="an image file or a folder of images")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument(
        "--score-threshold", type=float, default=0.5, help="draw detections scoring at least this"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def run(args: argparse.Namespace) -> int:
    files = list_images(args.input)
    if any(f.resolve().parent == Path(args.output).resolve() for f in files):
        raise ValueError(
            f"--output {args.output} holds the input images; drawn copies would overwrite them"
        )
    device = resolve_device(args.device)
    model, cfg, classes = load_trained_model(args.weights, args.config, args.overrides, device)
    entries = predict_files(
        model,
        files,
        classes,
        build_transform(cfg, training=False),
        cfg.input.size_divisibility,
        args.output,
        device,
        score_threshold=args.score_threshold,
        batch_size=args.batch_size,
        amp=cfg.train.amp,
    )
    shown = sum(sum(s >= args.score_threshold for s in e["scores"]) for e in entries)
    print(f"{len(entries)} images, {shown} detections >= {args.score_threshold} -> {args.output}")
    return 0
