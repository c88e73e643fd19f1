r"""Export a checkpoint to one ONNX file that holds the whole detector, for ONNX Runtime alone.

    retinanet export --weights runs/shapes/model_final.pth --output runs/shapes/model.onnx
    retinanet export --weights tv_r50.pth --output r50.onnx --opset 17 --batch-size 1

Input `images` float32 (N, 3, H, W), RGB, 0-255, resized by the caller as the metadata's
min_size / max_size say; outputs `boxes` (N, D, 4) xyxy in input pixels, `scores` (N, D),
`labels` (N, D) dataset category ids, `num_detections` (N,). H and W are free; N is free
unless --batch-size fixes it. Needs `pip install -e ".[export]"`. --config defaults to the
config stored in the checkpoint.
"""

from __future__ import annotations

import argparse

from retinanet.cli.arguments import add_checkpoint_config, add_overrides
from retinanet.deploy.onnx_export import DEFAULT_OPSET, export_onnx
from retinanet.engine.checkpoint import load_trained_model


def _batch_size(value: str) -> int | None:
    if value == "dynamic":
        return None
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'dynamic', got {value!r}")
    return size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_config(parser)
    parser.add_argument("--weights", required=True, help="checkpoint (.pth) of this project")
    parser.add_argument("--output", required=True, help="ONNX file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--batch-size", type=_batch_size, help="N or 'dynamic' (default)")
    add_overrides(parser)


def run(args: argparse.Namespace) -> int:
    try:
        import onnx  # noqa: F401
    except ImportError as err:
        raise OSError('retinanet export needs onnx: pip install -e ".[export]"') from err
    model, cfg, classes = load_trained_model(args.weights, args.config, args.overrides, "cpu")
    path = export_onnx(
        model,
        args.output,
        classes,
        cfg.input.size_divisibility,
        cfg.input.test_min_size,
        cfg.input.test_max_size,
        opset=args.opset,
        batch_size=args.batch_size,
    )
    batch = "dynamic" if args.batch_size is None else args.batch_size
    print(
        f"wrote {path}: {classes.num_classes} classes, batch {batch}, up to "
        f"{cfg.model.inference.max_detections} detections per image, opset {args.opset}; "
        f"resize images to shortest side {cfg.input.test_min_size}, longest at most "
        f"{cfg.input.test_max_size}"
    )
    return 0
