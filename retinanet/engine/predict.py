"""Prediction on image files and videos: detections as JSON, and the images or the video with
the detections drawn."""

from __future__ import annotations

import colorsys
import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from ..detector import Detections, Detector, read_image
from ..files import atomic_open, atomic_path, atomic_write_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")


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


def class_color(index: int) -> tuple[int, int, int]:
    """A BGR colour for contiguous class `index`: golden-ratio steps around the hue circle, so
    that neighbouring classes differ."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.85, 1.0)
    return int(b * 255), int(g * 255), int(r * 255)


def draw_detections(
    image_bgr: np.ndarray, detections: Detections, score_threshold: float
) -> np.ndarray:
    """A copy of the (H, W, 3) uint8 BGR image with boxes and 'name score' labels of the
    detections scoring >= score_threshold."""
    canvas = image_bgr.copy()
    thickness = max(1, round(min(canvas.shape[:2]) / 400))
    keep = np.flatnonzero(detections.scores >= score_threshold)
    # Lowest scores first, so the most confident boxes end up on top.
    for i in keep[np.argsort(detections.scores[keep], kind="stable")]:
        x1, y1, x2, y2 = (int(round(v)) for v in detections.boxes[i])
        color = class_color(int(detections.class_indices[i]))
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness)
        text = f"{detections.names[i]} {detections.scores[i]:.2f}"
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


def detection_entry(detections: Detections) -> dict[str, Any]:
    """One predictions.json entry: boxes [[x1, y1, x2, y2], ...] in original pixels (1e-3 px),
    scores (1e-5), labels as dataset category ids, class_names."""
    return {
        "boxes": detections.boxes.round(3).tolist(),
        "scores": detections.scores.round(5).tolist(),
        "labels": detections.labels.tolist(),
        "class_names": list(detections.names),
    }


def predict_files(
    detector: Detector,
    files: Sequence[Path],
    output_dir: str | os.PathLike,
    score_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Write output_dir/predictions.json (one entry per image: file_name and the fields of
    `detection_entry`, with every detection the detector returns) and a copy of each image
    with the detections scoring >= score_threshold drawn; returns the entries. Images are read
    and run `detector.batch_size` at a time."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for start in range(0, len(files), detector.batch_size):
        chunk = files[start : start + detector.batch_size]
        images = [read_image(f) for f in chunk]
        for path, image, det in zip(chunk, images, detector(images), strict=True):
            entries.append({"file_name": path.name, **detection_entry(det)})
            write_image(output_dir / path.name, draw_detections(image, det, score_threshold))
    atomic_write_json(output_dir / "predictions.json", entries)
    return entries


def is_video(path: str | os.PathLike) -> bool:
    """Whether `path` names a video file, by its suffix."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def predict_video(
    detector: Detector,
    video: str | os.PathLike,
    output_dir: str | os.PathLike,
    score_threshold: float = 0.5,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Detect objects in every frame of `video`, `detector.batch_size` frames per forward pass.
    Writes output_dir/<video stem>.mp4 (the frames with the detections scoring >=
    score_threshold drawn; same frame rate and size, codec mp4v) and output_dir/predictions.json
    (one entry per frame: file_name, frame (0-based index), timestamp (seconds: frame / the
    video's frame rate) and the fields of `detection_entry`); returns the entries. Both files
    appear only once the whole video is done."""
    video, output_dir = Path(video), Path(output_dir)
    if not video.is_file():
        raise FileNotFoundError(f"video not found: {video}")
    capture = cv2.VideoCapture(str(video))
    try:
        if not capture.isOpened():
            raise ValueError(
                f"cannot open video {video} (unreadable, or a format OpenCV's FFmpeg cannot decode)"
            )
        fps = capture.get(cv2.CAP_PROP_FPS)
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"video {video} reports no frame rate ({fps}); cannot time frames")
        ok, first = capture.read()
        if not ok:
            raise ValueError(f"cannot read any frame of video {video} (empty or corrupt)")
        height, width = first.shape[:2]
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None  # an estimate; may be 0
        entries: list[dict[str, Any]] = []
        output_dir.mkdir(parents=True, exist_ok=True)
        with (
            _atomic_video_writer(output_dir / f"{video.stem}.mp4", fps, (width, height)) as writer,
            tqdm(total=total, desc=video.name, unit="frame", disable=not progress) as bar,
        ):
            for frames in _frame_batches(capture, first, detector.batch_size):
                for frame, det in zip(frames, detector(frames), strict=True):
                    index = len(entries)
                    entries.append(
                        {
                            "file_name": video.name,
                            "frame": index,
                            "timestamp": round(index / fps, 6),
                            **detection_entry(det),
                        }
                    )
                    writer.write(draw_detections(frame, det, score_threshold))
                bar.update(len(frames))
    finally:
        capture.release()
    atomic_write_json(output_dir / "predictions.json", entries)
    return entries


def _frame_batches(
    capture: cv2.VideoCapture, first: np.ndarray, batch_size: int
) -> Iterator[list[np.ndarray]]:
    """The frames (H, W, 3) uint8 BGR of `capture`, `first` (already read) included, in lists
    of `batch_size` (the last may be shorter)."""
    frames = [first]
    while True:
        if len(frames) == batch_size:
            yield frames
            frames = []
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    if frames:
        yield frames


@contextlib.contextmanager
def _atomic_video_writer(
    path: Path, fps: float, size: tuple[int, int]
) -> Iterator[cv2.VideoWriter]:
    """An mp4v VideoWriter on a temporary file beside `path`, renamed to `path` on a clean exit
    and removed on an error. size: (width, height) in pixels."""
    # VideoWriter picks the container from the suffix, so the temporary name ends in .mp4.
    with atomic_path(path, suffix=".tmp.mp4") as tmp:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
        try:
            if not writer.isOpened():
                raise OSError(f"cannot write video {path}: OpenCV cannot open it with codec mp4v")
            yield writer
        finally:
            writer.release()  # before the rename, and on an error
