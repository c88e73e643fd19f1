r"""Train a RetinaNet.

    retinanet train --config configs/shapes.yaml --output-dir runs/shapes
    retinanet train --config configs/retinanet_R50_FPN_1x.yaml --output-dir runs/r50 \
        train.batch_size=8
    torchrun --nproc-per-node 8 tools/train.py --config configs/retinanet_R50_FPN_1x.yaml \
        --output-dir runs/r50
    retinanet train --config ... --output-dir runs/r50 --resume     # continue after a crash

Trailing key=value arguments override config keys (an unknown key is an error naming it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from retinanet.cli.arguments import add_device, add_overrides
from retinanet.config import load_config
from retinanet.engine.trainer import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument(
        "--output-dir", help="where checkpoints and logs go (default runs/<config name>)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in --output-dir"
    )
    add_device(parser)
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    parser.add_argument(
        "--stop-at", type=int, metavar="ITER", help="stop after ITER iterations as if interrupted"
    )
    add_overrides(parser)


def run(args: argparse.Namespace) -> int:
    output_dir = args.output_dir or str(Path("runs") / Path(args.config).stem)
    cfg = load_config(args.config, args.overrides)
    result = train(
        cfg,
        output_dir,
        resume=args.resume,
        device=args.device,
        stop_at_iteration=args.stop_at,
        evaluate=not args.no_eval,
    )
    if result.metrics is not None:
        m = result.metrics
        print(f"final AP {m.AP:.4f}  AP50 {m.AP50:.4f}  -> {result.output_dir}")
    return 0
