"""Prediction on image files: detections as JSON and images with the detections drawn."""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ..data import DatasetError, DetectionTransform, collate_detection
from ..model.retinanet import RetinaNet
from .checkpoint import ClassInfo
from .files import atomic_open, atomic_write_json
from .inference import detections_to_numpy
from .precision import autocast

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def list_images(path: str | os.PathLike) -> list[Path]:
    """An image file, or the image files of a folder (sorted, not recursive)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--input not found: {path}")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    return files


def read_rgb(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB; DatasetError naming the file if unreadable."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"cannot read image {path} (missing, unreadable or not an image)")
    return np.ascontiguousarray(image[:, :, ::-1])


@torch.no_grad()
def predict_images(
    model: RetinaNet,
    images: Sequence[np.ndarray],
    transform: DetectionTransform,
    size_divisibility: int,
    device: torch.device,
    amp: str = "",
) -> list[dict[str, np.ndarray]]:
    """Detections for RGB uint8 images (H, W, 3): boxes (N, 4) xyxy in original pixels, scores,
    labels (contiguous class indices), as numpy arrays."""
    samples = []
    for image in images:
        resized, _, _ = transform(image, np.zeros((0, 4), np.float32))
        samples.append(
            {
                "image": torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))),
                "boxes": torch.zeros(0, 4),
                "labels": torch.zeros(0, dtype=torch.int64),
                "crowd_boxes": torch.zeros(0, 4),
                "image_id": 0,
                "orig_size": tuple(image.shape[:2]),
                "size": tuple(resized.shape[:2]),
            }
        )
    batch = collate_detection(samples, size_divisibility).to(device)
    with autocast(amp, device):
        outputs = model(batch.images, batch.image_sizes)
    detections = model.detect(
        outputs, batch.image_sizes, torch.tensor(batch.orig_sizes, device=device)
    )
    return [detections_to_numpy(d) for d in detections]


def class_colors(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct BGR colours, one per class."""
    colors = []
    for i in range(num_classes):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0)
        colors.append((int(b * 255), int(g * 255), int(r * 255)))
    return colors


def draw_detections(
    image_rgb: np.ndarray,
    detection: dict[str, np.ndarray],
    class_names: Sequence[str],
    score_threshold: float,
) -> np.ndarray:
    """A BGR copy of the image with boxes and 'name score' labels of detections >= threshold."""
    canvas = np.ascontiguousarray(image_rgb[:, :, ::-1]).copy()
    colors = class_colors(len(class_names))
    thickness = max(1, round(min(canvas.shape[:2]) / 400))
    keep = detection["scores"] >= score_threshold
    # Lowest scores first, so the most confident boxes end up on top.
    for box, score, label in sorted(
        zip(
            detection["boxes"][keep],
            detection["scores"][keep],
            detection["labels"][keep],
            strict=True,
        ),
        key=lambda d: d[1],
    ):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        color = colors[int(label)]
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness)
        text = f"{class_names[int(label)]} {score:.2f}"
        scale = 0.4 * thickness
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        top = max(y1 - th - base, 0)
        cv2.rectangle(canvas, (x1, top), (x1 + tw, top + th + base), color, -1)
        cv2.putText(
            canvas, text, (x1, top + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA
        )
    return canvas


def write_image(path: Path, image_bgr: np.ndarray) -> None:
    """Encode by the file's suffix and write atomically."""
    ok, encoded = cv2.imencode(path.suffix or ".png", image_bgr)
    if not ok:
        raise ValueError(f"cannot encode {path}")
    with atomic_open(path, "wb") as f:
        f.write(encoded.tobytes())


def predict_files(
    model: RetinaNet,
    files: Sequence[Path],
    classes: ClassInfo,
    transform: DetectionTransform,
    size_divisibility: int,
    output_dir: str | os.PathLike,
    device: torch.device,
    score_threshold: float = 0.5,
    batch_size: int = 4,
    amp: str = "",
) -> list[dict[str, Any]]:
    """Write output_dir/predictions.json (one entry per image: file_name, boxes [[x1, y1, x2,
    y2], ...] in original pixels, scores, labels as dataset category ids, class_names) and a copy
    of each image with the detections scoring >= score_threshold drawn; returns the entries."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images = [read_rgb(f) for f in chunk]
        for path, image, det in zip(
            chunk,
            images,
            predict_images(model, images, transform, size_divisibility, device, amp),
            strict=True,
        ):
            labels = det["labels"].astype(np.int64)
            entries.append(
                {
                    "file_name": path.name,
                    "boxes": det["boxes"].round(3).tolist(),
                    "scores": det["scores"].round(5).tolist(),
                    "labels": [classes.category_ids[i] for i in labels],
                    "class_names": [classes.names[i] for i in labels],
                }
            )
            write_image(
                output_dir / path.name, draw_detections(image, det, classes.names, score_threshold)
            )
    atomic_write_json(output_dir / "predictions.json", entries)
    return entries
