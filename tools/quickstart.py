r"""The main job on the embedded dataset, end to end: generate the synthetic shapes dataset,
train configs/shapes.yaml from scratch, evaluate it with pycocotools, run the paper's
loss-distribution analysis (Figure 4) and the calibration study, and draw predictions.

    python tools/quickstart.py                                  # everything into runs/quickstart
    python tools/quickstart.py --output-dir runs/qs2 train.max_iter=400     # a shorter run

Running it again continues an interrupted training (--resume semantics) and redoes the analyses.
Outputs: DIR/train (checkpoints, metrics.jsonl, TensorBoard, eval/metrics.json),
DIR/loss_analysis (loss_cdf.png/csv, loss_cdf_summary.json, loss_vs_pt.png),
DIR/calibration (reliability diagrams, calibration.json/csv/md), DIR/predictions, and
DIR/summary.json (the headline numbers and the time of each stage).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.analysis.calibration_study import calibrate_model, write_calibration_table  # noqa: E402
from retinanet.analysis.loss_study import format_loss_summary, run_loss_study  # noqa: E402
from retinanet.config import ConfigError, load_config  # noqa: E402
from retinanet.data import DatasetError  # noqa: E402
from retinanet.data.build import build_transform  # noqa: E402
from retinanet.engine.checkpoint import load_trained_model  # noqa: E402
from retinanet.engine.device import resolve_device  # noqa: E402
from retinanet.engine.files import atomic_write_json  # noqa: E402
from retinanet.engine.predict import list_images, predict_files  # noqa: E402
from retinanet.engine.trainer import train  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default="runs/quickstart")
    parser.add_argument("--config", default=str(CONFIG), help="default: configs/shapes.yaml")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-predictions", type=int, default=8, help="val images to draw")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        device = resolve_device(args.device)

        print("== 1/4 train (the dataset is generated on first use) ==")
        result = train(cfg, out / "train", resume=True, device=args.device)
        timings["train_and_eval_s"] = time.perf_counter() - start
        weights = result.final_checkpoint

        print("== 2/4 loss distribution of foreground and background anchors (paper, Figure 4) ==")
        t = time.perf_counter()
        study = run_loss_study(weights, out / "loss_analysis", device=device)
        print(format_loss_summary(study))
        timings["loss_analysis_s"] = time.perf_counter() - t

        print("== 3/4 calibration of the detector's scores ==")
        t = time.perf_counter()
        record = calibrate_model(weights, out / "calibration", device=device, name="shapes")
        write_calibration_table([record], out / "calibration")
        timings["calibration_s"] = time.perf_counter() - t

        print("== 4/4 predictions on validation images ==")
        t = time.perf_counter()
        model, trained_cfg, classes = load_trained_model(weights, device=device)
        files = list_images(trained_cfg.data.val.image_dir)[: args.num_predictions]
        predict_files(
            model,
            files,
            classes,
            build_transform(trained_cfg, training=False),
            trained_cfg.input.size_divisibility,
            out / "predictions",
            device,
            score_threshold=0.5,
        )
        timings["predictions_s"] = time.perf_counter() - t
    except (ConfigError, DatasetError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    timings["total_s"] = time.perf_counter() - start
    metrics = result.metrics
    summary = {
        "AP": metrics.AP,
        "AP50": metrics.AP50,
        "AP75": metrics.AP75,
        "iterations": result.iterations,
        "timings": timings,
        "outputs": {
            "checkpoint": str(weights),
            "metrics": str(out / "train" / "eval" / "metrics.json"),
            "loss_cdf": str(out / "loss_analysis" / "loss_cdf.png"),
            "calibration": str(out / "calibration"),
            "predictions": str(out / "predictions"),
        },
    }
    atomic_write_json(out / "summary.json", summary)
    print(
        f"\nAP {metrics.AP:.3f} (AP50 {metrics.AP50:.3f}, AP75 {metrics.AP75:.3f}) after "
        f"{result.iterations} iterations; total {timings['total_s'] / 60:.1f} min. "
        f"Everything is in {out}/ (summary.json lists the files)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
