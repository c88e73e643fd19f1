"""Inference over a dataset and COCO evaluation of a model, sharded over processes."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import Config
from ..data import Batch, CocoDetection
from ..data.build import build_test_loader
from ..data.classes import ClassInfo
from ..data.collate import raise_on_bad_images
from ..model.head import HeadOutputs
from ..model.retinanet import RetinaNet
from .coco_metrics import (
    CocoMetrics,
    detections_to_coco_results,
    evaluate_coco,
    format_category_table,
    write_evaluation,
)
from .distributed import (
    broadcast_from_main,
    gather_to_main,
    get_rank,
    get_world_size,
    is_main_process,
)
from .precision import autocast


def iter_model_outputs(
    model: RetinaNet,
    loader: Iterable[Batch],
    device: torch.device,
    amp: str = "",
    progress: bool = False,
    desc: str = "inference",
) -> Iterator[tuple[Batch, HeadOutputs]]:
    """Each batch of `loader` (moved to `device`) with the model's head outputs, computed in eval
    mode without gradients; the model's training mode is restored when the loop ends."""
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            raise_on_bad_images(batch, "fix or remove the file before evaluating")
            batch = batch.to(device, non_blocking=True)
            with torch.no_grad(), autocast(amp, device):
                outputs = model(batch.images, batch.image_sizes)
            yield batch, outputs
    finally:
        model.train(was_training)


@torch.no_grad()
def run_inference(
    model: RetinaNet,
    loader: Iterable[Batch],
    device: torch.device,
    amp: str = "",
    progress: bool = False,
) -> tuple[list[int], list[dict[str, np.ndarray]]]:
    """Detections of every image the loader yields: (image_ids, detections), detections as
    numpy arrays (`boxes` (N, 4) float32 xyxy original pixels, `scores` (N,), `labels` (N,))."""
    image_ids, detections = [], []
    for batch, outputs in iter_model_outputs(model, loader, device, amp, progress):
        original_sizes = torch.tensor(batch.orig_sizes, device=device)
        for image_id, det in zip(
            batch.image_ids, model.detect(outputs, batch.image_sizes, original_sizes), strict=True
        ):
            image_ids.append(int(image_id))
            detections.append(detections_to_numpy(det))
    return image_ids, detections


def detections_to_numpy(detection: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """boxes and scores as float32 arrays, labels as int64, on the CPU."""
    return {
        k: v.cpu().numpy() if k == "labels" else v.float().cpu().numpy()
        for k, v in detection.items()
    }


def keep_known_categories(
    results: list[dict[str, Any]], dataset: CocoDetection, source: str
) -> list[dict[str, Any]]:
    """Drop results whose category id the dataset does not have (a model trained on other
    classes, or torchvision's background / "N/A" entries), with one warning."""
    known = set(dataset.category_ids)
    kept = [r for r in results if r["category_id"] in known]
    if len(kept) < len(results):
        unknown = sorted({r["category_id"] for r in results} - known)
        warnings.warn(
            f"{source}: dropped {len(results) - len(kept)} detections of category ids "
            f"{unknown[:10]} that {dataset.annotation_file} does not define",
            stacklevel=2,
        )
    if not kept and results:
        raise ValueError(
            f"{source}: none of the model's category ids occur in {dataset.annotation_file}"
        )
    return kept


def evaluate_model(
    model: RetinaNet,
    dataset: CocoDetection,
    classes: ClassInfo,
    device: torch.device,
    cfg: Config,
    output_dir: str | Path | None = None,
    progress: bool = False,
    verbose: bool = True,
) -> CocoMetrics:
    """COCO bbox evaluation of `model` on `dataset`, loaded and run as `cfg` says (eval.*,
    precision.*). Every process runs inference on its shard; rank 0 gathers the detections,
    evaluates, writes coco_results.json and metrics.json into `output_dir` (when given), and the
    metrics are returned on every process."""
    loader = build_test_loader(cfg, dataset, rank=get_rank(), world_size=get_world_size())
    amp = cfg.precision.amp
    image_ids, detections = run_inference(
        model, loader, device, amp, progress=progress and is_main_process()
    )
    gathered = gather_to_main((image_ids, detections))
    metrics = None
    if is_main_process():
        all_ids = [i for ids, _ in gathered for i in ids]
        all_dets = [d for _, dets in gathered for d in dets]
        results = detections_to_coco_results(all_ids, all_dets, classes.category_ids)
        results = keep_known_categories(results, dataset, "evaluation")
        metrics = evaluate_coco(
            dataset.coco, results, backend=cfg.eval.backend, image_ids=dataset.image_ids
        )
        if output_dir is not None:
            write_evaluation(output_dir, results, metrics)
        if verbose:
            print(metrics.summary)
            print(format_category_table(metrics))
    return broadcast_from_main(metrics)
