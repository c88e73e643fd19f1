r"""COCO evaluation of a checkpoint on data.val.

    python tools/eval.py --config configs/shapes.yaml --weights runs/shapes/model_final.pth
    python tools/eval.py --weights weights/tv_r50.pth --output-dir runs/tv_eval \
        data.val.image_dir=datasets/coco/val2017 \
        data.val.annotation_file=datasets/coco/annotations/instances_val2017.json
    torchrun --nproc-per-node 8 tools/eval.py --config ... --weights ...

Writes DIR/coco_results.json (COCO results format: dataset category ids, xywh boxes) and
DIR/metrics.json (the 12 COCO numbers as fractions and per-category AP), prints the COCO summary
and a per-category table. --config defaults to the config stored in the checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.config import ConfigError  # noqa: E402
from retinanet.data import DatasetError  # noqa: E402
from retinanet.data.build import build_dataset, resolve_data_paths  # noqa: E402
from retinanet.engine.checkpoint import load_trained_model  # noqa: E402
from retinanet.engine.distributed import (  # noqa: E402
    init_distributed,
    is_main_process,
    main_process_first,
    shutdown_distributed,
)
from retinanet.engine.inference import evaluate_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=None, help="YAML config (default: the checkpoint's)")
    parser.add_argument("--weights", required=True, help="checkpoint (.pth) of this project")
    parser.add_argument("--output-dir", default=None, help="default: <weights folder>/eval")
    parser.add_argument("--device", default="auto")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    output_dir = (
        Path(args.output_dir) if args.output_dir else Path(args.weights).resolve().parent / "eval"
    )
    try:
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
    except (ConfigError, DatasetError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        shutdown_distributed()
        return 1
    if is_main_process():  # read before the process group is gone
        print(
            f"AP {metrics.AP:.4f}  AP50 {metrics.AP50:.4f}  AP75 {metrics.AP75:.4f} -> {output_dir}"
        )
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
