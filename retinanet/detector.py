"""The Python inference API: a trained checkpoint as a callable that takes image files or OpenCV
images and returns detections in original-image pixels.

    from retinanet import Detector

    detector = Detector.from_checkpoint("runs/quickstart/train/model_final.pth")
    for det in detector(["a.jpg", "b.jpg"]):
        print(det.boxes, det.scores, det.names)

Images go through the test-time resize and padding of evaluation and the precision the
checkpoint's config asks for (precision.amp), so the detections are those `retinanet eval` scores
(up to float rounding: from_checkpoint folds the backbone's BatchNorms into its convolutions,
which is faster; fold_norms=False keeps the network exactly as evaluation runs it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from .config import Config
from .data import DetectionTransform, collate_detection
from .data.build import build_transform
from .data.classes import ClassInfo
from .engine.checkpoint import load_trained_model
from .engine.device import resolve_device
from .engine.inference import run_inference
from .engine.precision import AmpMode, resolve_amp
from .model.retinanet import RetinaNet

# A path to an image file, or an (H, W, 3) uint8 image (BGR unless the call says rgb=True).
ImageInput = str | os.PathLike | np.ndarray


# eq=False: comparing arrays field by field has no single truth value.
@dataclass(eq=False)
class Detections:
    """The detections of one image, in decreasing score order.

    boxes: (N, 4) float32 xyxy in original-image pixels.
    scores: (N,) float32 class probabilities.
    labels: (N,) int64 dataset category ids (the numbers of the training annotations and of
        predictions.json).
    names: the N class names.
    class_indices: (N,) int64 the model's contiguous class indices in [0, K).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    names: list[str]
    class_indices: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as (H, W, 3) uint8 BGR, as cv2.imread returns it; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot read image {path} (unreadable or not an image)")
    return image


def to_rgb(image: ImageInput, rgb: bool = False, name: str = "image") -> np.ndarray:
    """A path or an (H, W, 3) uint8 array (BGR, or RGB with rgb=True) -> contiguous (H, W, 3)
    uint8 RGB. `name` says which input an error is about (e.g. "images[2]")."""
    if isinstance(image, (str, os.PathLike)):
        return np.ascontiguousarray(read_image(image)[:, :, ::-1])
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"{name}: expected a path or an (H, W, 3) uint8 NumPy array, got "
            f"{type(image).__module__}.{type(image).__qualname__} (for a PIL image pass "
            "np.asarray(image) with rgb=True)"
        )
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(
            f"{name}: expected an (H, W, 3) uint8 array (BGR as cv2.imread returns it, or RGB "
            f"with rgb=True), got shape {image.shape} dtype {image.dtype}"
        )
    return np.ascontiguousarray(image if rgb else image[:, :, ::-1])


class Detector:
    """A RetinaNet ready to detect objects in images.

    detector(images, rgb=False) takes one image or a list of them: a path, or an (H, W, 3) uint8
    NumPy array in BGR order as cv2.imread and cv2.VideoCapture give it (rgb=True for RGB
    arrays). It returns one `Detections` per image (a list for a list), boxes in the pixels of
    the image as given. Lists are run `batch_size` images per forward pass.

    Args:
        model: the network; it is put in eval mode.
        classes: names and dataset category ids of the model's classes.
        transform: the test-time resize (`build_transform(cfg, training=False)`).
        size_divisibility: a batch is zero-padded to a multiple of it (input.size_divisibility).
        device: the device the model is on.
        amp: None (fp32), 'bf16', 'fp16' or 'auto' (see retinanet.engine.precision).
        score_threshold: detections scoring below it are dropped; 0 keeps every detection of the
            model's postprocessing (those above model.inference.score_threshold, 0.05 by
            default, at most model.inference.max_detections per image).
        batch_size: images per forward pass.
        config: the config the model was built from, kept for reference.
    """

    def __init__(
        self,
        model: RetinaNet,
        classes: ClassInfo,
        transform: DetectionTransform,
        size_divisibility: int,
        device: torch.device,
        amp: AmpMode | None = None,
        score_threshold: float = 0.5,
        batch_size: int = 4,
        config: Config | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        self.model = model.eval()
        self.classes = classes
        self.transform = transform
        self.size_divisibility = size_divisibility
        self.device = torch.device(device)
        # Resolved now, so that a precision the device cannot run fails here, not mid-video.
        self.amp = resolve_amp(amp, self.device)
        self.score_threshold = score_threshold
        self.batch_size = batch_size
        self.config = config
        self._category_ids = np.asarray(classes.category_ids, dtype=np.int64)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "auto",
        score_threshold: float = 0.5,
        config: str | os.PathLike | None = None,
        overrides: Sequence[str] = (),
        batch_size: int = 4,
        fold_norms: bool = True,
    ) -> Detector:
        """A detector from a checkpoint of ours (a training's or tools/convert.py's), loaded
        without running code from the file (torch.load weights_only). The architecture, resize
        and precision come from the config stored in it, or from `config` (a YAML file) when
        given, plus `overrides` ("key=value"); the classes always come from the checkpoint.
        device: auto (CUDA when available), cpu, cuda or cuda:N. fold_norms: fold the
        backbone's BatchNorms into its convolutions (`RetinaNet.fold_norms`)."""
        torch_device = resolve_device(device)
        model, cfg, classes = load_trained_model(path, config, list(overrides), torch_device)
        if fold_norms:
            model.fold_norms()
        return cls(
            model,
            classes,
            build_transform(cfg, training=False),
            cfg.input.size_divisibility,
            torch_device,
            amp=cfg.precision.amp,
            score_threshold=score_threshold,
            batch_size=batch_size,
            config=cfg,
        )

    @property
    def class_names(self) -> list[str]:
        return list(self.classes.names)

    def __call__(
        self, images: ImageInput | Sequence[ImageInput], rgb: bool = False
    ) -> Detections | list[Detections]:
        """Detections of one image, or a list of them for a list (see the class docstring)."""
        if not isinstance(images, (list, tuple)):
            return self.detect_rgb([to_rgb(images, rgb)])[0]
        results: list[Detections] = []
        for start in range(0, len(images), self.batch_size):
            # Read one batch at a time: a long list of files never sits in memory at once.
            chunk = images[start : start + self.batch_size]
            batch = [to_rgb(x, rgb, f"images[{start + i}]") for i, x in enumerate(chunk)]
            results += self.detect_rgb(batch)
        return results

    def detect_rgb(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """One forward pass over (H, W, 3) uint8 RGB images, whatever their number."""
        if not images:
            return []
        samples = []
        for image in images:
            resized, _, _ = self.transform(image, np.zeros((0, 4), np.float32))
            samples.append(
                {
                    "image": torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))),
                    "boxes": torch.zeros(0, 4),
                    "labels": torch.zeros(0, dtype=torch.int64),
                    "crowd_boxes": torch.zeros(0, 4),
                    "image_id": 0,
                    "orig_size": tuple(image.shape[:2]),
                }
            )
        batch = collate_detection(samples, self.size_divisibility)
        _, detections = run_inference(self.model, [batch], self.device, self.amp)
        return [self._to_detections(d) for d in detections]

    def _to_detections(self, det: dict[str, np.ndarray]) -> Detections:
        keep = det["scores"] >= self.score_threshold
        indices = det["labels"][keep].astype(np.int64)
        return Detections(
            boxes=det["boxes"][keep],
            scores=det["scores"][keep],
            labels=self._category_ids[indices],
            names=[self.classes.names[i] for i in indices],
            class_indices=indices,
        )

    def __repr__(self) -> str:
        return (
            f"Detector({self.classes.num_classes} classes, device={self.device}, "
            f"amp={self.amp or 'fp32'}, score_threshold={self.score_threshold})"
        )
