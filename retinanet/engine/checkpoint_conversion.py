"""Turn torchvision or Detectron2 RetinaNet weights into a checkpoint of this project."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..config import Config, load_config
from ..data.classes import ClassInfo
from ..model.build import build_model
from ..model.foreign_weights import (
    TORCHVISION_COCO_CATEGORIES,
    convert_detectron2,
    convert_torchvision,
    torchvision_variant,
)
from .checkpoint import load_model_weights, save_checkpoint

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
SOURCES = ("torchvision", "detectron2")


def _classes_for(num_classes: int, source: str) -> ClassInfo:
    if source == "torchvision" and num_classes == len(TORCHVISION_COCO_CATEGORIES):
        # torchvision's labels are COCO category ids (0 = background, gaps = "N/A").
        return ClassInfo(list(TORCHVISION_COCO_CATEGORIES), list(range(num_classes)))
    if source == "detectron2" and num_classes == 80:
        # The 80 COCO categories in category-id order (the contiguous order Detectron2 uses).
        ids = [
            i
            for i, n in enumerate(TORCHVISION_COCO_CATEGORIES)
            if n not in ("N/A", "__background__")
        ]
        return ClassInfo([TORCHVISION_COCO_CATEGORIES[i] for i in ids], ids)
    return ClassInfo([f"class_{i}" for i in range(num_classes)], list(range(num_classes)))


def _read_source(path: Path, source: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if source == "detectron2" and path.suffix == ".pkl":
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to unpickle means a bad file
        raise ValueError(f"cannot read {source} weights from {path}: {err}") from err


def convert_checkpoint(
    source: str, src: str | Path, output: str | Path, config_path: str | Path | None = None
) -> tuple[Config, ClassInfo]:
    """Convert `src` (a torchvision .pth state dict or a Detectron2 model_final.pkl) and write a
    checkpoint to `output` after checking that every tensor lands in the model built from the
    matching config (configs/torchvision_retinanet_R50_FPN[_v2].yaml or
    configs/detectron2_retinanet_R50_FPN.yaml unless `config_path` is given)."""
    if source not in SOURCES:
        raise ValueError(f"--from must be one of {SOURCES}, got {source!r}")
    src = Path(src)
    raw = _read_source(src, source)
    overrides: list[str] = []
    if source == "torchvision":
        state = convert_torchvision(raw)
        default = (
            "torchvision_retinanet_R50_FPN_v2.yaml"
            if torchvision_variant(raw) == "v2"
            else "torchvision_retinanet_R50_FPN.yaml"
        )
    else:
        state, pixel = convert_detectron2(raw)
        default = "detectron2_retinanet_R50_FPN.yaml"
        overrides += [f"input.{k}={v}" for k, v in pixel.items()]
    cfg = load_config(config_path or CONFIG_DIR / default, overrides)
    num_anchors = len(cfg.model.anchors.scales) * len(cfg.model.anchors.aspect_ratios)
    num_classes = state["head.cls_score.weight"].shape[0] // num_anchors
    classes = _classes_for(num_classes, source)
    model = build_model(cfg, num_classes, load_backbone_weights=False)
    # A ValueError naming the tensors that differ, and the config the model was built from
    # (often picked automatically, so the user may not know which).
    load_model_weights(model, {"model": state}, f"{src} (config {config_path or default})")
    save_checkpoint(output, model, cfg, classes, iteration=0)
    return cfg, classes
