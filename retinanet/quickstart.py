"""The main job on the embedded dataset, end to end: train (generating the synthetic shapes
dataset on first use), evaluate, the loss-distribution study (paper, Figure 4), the calibration
study and drawn predictions, with the time each stage took."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from retinanet.analysis.calibration_study import calibrate_model, write_calibration_table
from retinanet.analysis.loss_study import format_loss_summary, run_loss_study
from retinanet.config import Config
from retinanet.detector import Detector
from retinanet.engine.predict import list_images, predict_files
from retinanet.engine.trainer import train
from retinanet.files import atomic_write_json

SHAPES_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml"


def run_quickstart(
    cfg: Config,
    output_dir: str | os.PathLike,
    device: torch.device,
    num_predictions: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every stage into `output_dir` (train/, loss_analysis/, calibration/, predictions/)
    and write `summary.json`; returns the summary. Running it again continues an interrupted
    training and redoes the analyses."""
    out = Path(output_dir)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    print("== 1/4 train (the dataset is generated on first use) ==")
    result = train(cfg, out / "train", resume=True, device=str(device), progress=progress)
    timings["train_and_eval_s"] = time.perf_counter() - start
    weights = result.final_checkpoint

    print("== 2/4 loss distribution of foreground and background anchors (paper, Figure 4) ==")
    t = time.perf_counter()
    study = run_loss_study(weights, out / "loss_analysis", device=device, progress=progress)
    print(format_loss_summary(study))
    timings["loss_analysis_s"] = time.perf_counter() - t

    print("== 3/4 calibration of the detector's scores ==")
    t = time.perf_counter()
    record = calibrate_model(
        weights, out / "calibration", device=device, name="shapes", progress=progress
    )
    write_calibration_table([record], out / "calibration")
    timings["calibration_s"] = time.perf_counter() - t

    print("== 4/4 predictions on validation images ==")
    t = time.perf_counter()
    # Every detection into predictions.json, as `retinanet predict` writes it; 0.5 selects the
    # ones drawn.
    detector = Detector.from_checkpoint(weights, device=device, score_threshold=0.0)
    files = list_images(detector.config.data.val.image_dir)[:num_predictions]
    predict_files(detector, files, out / "predictions", score_threshold=0.5)
    timings["predictions_s"] = time.perf_counter() - t
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
    return summary
