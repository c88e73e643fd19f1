r"""Detect objects in an image, a folder of images or a video.

    retinanet predict --config configs/shapes.yaml --weights runs/shapes/model_final.pth \
        --input datasets/shapes/val --output runs/predictions --score-threshold 0.5
    retinanet predict --weights runs/shapes/model_final.pth --input clip.mp4 --output runs/clip

For images, writes DIR/predictions.json (one entry per image: file_name, boxes [[x1, y1, x2,
y2], ...] in original-image pixels, scores, labels as dataset category ids, class_names) and a
copy of each image with the detections scoring >= --score-threshold drawn. For a video (by its
suffix: .mp4, .avi, .mov, .mkv, ...), writes DIR/<name>.mp4 with the detections drawn (same
frame rate and size) and DIR/predictions.json with one entry per frame, which also holds
`frame` (0-based index) and `timestamp` (seconds). The JSON keeps every detection of the model
(score above model.inference.score_threshold), whatever --score-threshold.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from retinanet.cli.arguments import add_checkpoint_config, add_device, add_overrides
from retinanet.detector import Detector
from retinanet.engine.predict import is_video, list_images, predict_files, predict_video


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_config(parser)
    parser.add_argument("--weights", required=True)
    parser.add_argument(
        "--input", required=True, help="an image file, a folder of images or a video file"
    )
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument(
        "--score-threshold", type=float, default=0.5, help="draw detections scoring at least this"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="images or frames per pass")
    add_device(parser)
    add_overrides(parser)


def run(args: argparse.Namespace) -> int:
    video = is_video(args.input)
    files = [Path(args.input)] if video else list_images(args.input)
    if video and not files[0].is_file():
        raise FileNotFoundError(f"--input not found: {args.input}")
    if any(f.resolve().parent == Path(args.output).resolve() for f in files):
        raise ValueError(
            f"--output {args.output} holds the input; the drawn copies would overwrite it"
        )
    # Every detection goes into the JSON; --score-threshold only selects the ones drawn.
    detector = Detector.from_checkpoint(
        args.weights,
        device=args.device,
        score_threshold=0.0,
        config=args.config,
        overrides=args.overrides,
        batch_size=args.batch_size,
    )
    if video:
        entries = predict_video(
            detector, files[0], args.output, score_threshold=args.score_threshold, progress=True
        )
        what = "frames"
    else:
        entries = predict_files(detector, files, args.output, score_threshold=args.score_threshold)
        what = "images"
    shown = sum(sum(s >= args.score_threshold for s in e["scores"]) for e in entries)
    print(f"{len(entries)} {what}, {shown} detections >= {args.score_threshold} -> {args.output}")
    return 0
