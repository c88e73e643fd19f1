r"""COCO evaluation of a checkpoint on data.val.

    retinanet eval --config configs/shapes.yaml --weights runs/shapes/model_final.pth
    retinanet eval --weights weights/tv_r50.pth --output-dir runs/tv_eval \
        data.val.image_dir=datasets/coco/val2017 \
        data.val.annotation_file=datasets/coco/annotations/instances_val2017.json
    torchrun --nproc-per-node 8 tools/eval.py --config ... --weights ...

Writes DIR/coco_results.json (COCO results format: dataset category ids, xywh boxes) and
DIR/metrics.json (the 12 COCO numbers as fractions and per-category AP), prints the COCO summary
and a per-category table. --config defaults to the config stored in the checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from retinanet.data.build import build_dataset, resolve_data_paths
from retinanet.engine.checkpoint import load_trained_model
from retinanet.engine.distributed import init_distributed, is_main_process, main_process_first
from retinanet.engine.inference import evaluate_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (default: the checkpoint's)")
    parser.add_argument("--weights", required=True, help="checkpoint (.pth) of this project")
    parser.add_argument("--output-dir", default=None, help="default: <weights folder>/eval")
    parser.add_argument("--device", default="auto")
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def run(args: argparse.Namespace) -> int:
    output_dir = (
        Path(args.output_dir) if args.output_dir else Path(args.weights).resolve().parent / "eval"
    )
    device = init_distributed(args.device)
    model, cfg, classes = load_trained_model(args.weights, args.config, args.overrides, device)
    cfg = main_process_first(lambda: resolve_data_paths(cfg))
    dataset = build_dataset(cfg, "val", training=False)
    metrics = evaluate_model(
        model,
        dataset,
        classes,
        device,
        output_dir=output_dir,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.data.num_workers,
        size_divisibility=cfg.input.size_divisibility,
        backend=cfg.eval.backend,
        amp=cfg.train.amp,
        progress=True,
    )
    if is_main_process():
        print(
            f"AP {metrics.AP:.4f}  AP50 {metrics.AP50:.4f}  AP75 {metrics.AP75:.4f} -> {output_dir}"
        )
    return 0
