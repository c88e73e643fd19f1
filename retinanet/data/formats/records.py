"""What every source format is converted into before it becomes COCO JSON: image records with
their boxes, the class list, and the input problems that were skipped; plus the checks all formats
share (a box inside its image, a readable image, a class list without duplicates).

Problems a user can fix are reported as `where: what`, `where` being `file:line` (or the file and
the object), and either raised as `DatasetError` or, with `skip_invalid`, collected in
`ConvertedDataset.skipped` while the offending record is left out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from retinanet.data.coco import DatasetError

# File suffixes looked for when an image is named without one (VOC ids, YOLO label stems).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Boxes may overhang their image by this much (px) from rounding in the tool that wrote them;
# they are clipped. Beyond it a box is an error: it was drawn on another image or scaled wrongly.
BORDER_TOLERANCE = 1.0


@dataclass
class ImageRecord:
    """One image of a converted dataset.

    file_name: path relative to the image folder (as COCO's `file_name`), POSIX separators.
    width, height: stored pixel size of the file (EXIF orientation ignored, as the loader does).
    boxes: (N, 4) float64 xyxy in image pixels; category_ids: (N,) int64; iscrowd: (N,) bool,
    True for ignore regions (VOC `difficult`).
    """

    file_name: str
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    category_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    iscrowd: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))


@dataclass
class ConvertedDataset:
    """images in a stable order (sorted file names, or the list's order); categories as
    (id, name) in the classes file's order; skipped: one `where: what` line per left-out record."""

    images: list[ImageRecord]
    categories: list[tuple[int, str]]
    skipped: list[str] = field(default_factory=list)


class Problems:
    """Raises each reported problem as a DatasetError, or with `skip_invalid` collects it."""

    def __init__(self, skip_invalid: bool) -> None:
        self.skip_invalid = skip_invalid
        self.skipped: list[str] = []

    def report(self, where: str, message: str) -> None:
        text = f"{where}: {message}"
        if not self.skip_invalid:
            raise DatasetError(text)
        self.skipped.append(text)


class BoxCollector:
    """Boxes of one image, accumulated record by record and checked against its size."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self._boxes: list[tuple[float, float, float, float]] = []
        self._category_ids: list[int] = []
        self._crowd: list[bool] = []

    def add(
        self,
        box: tuple[float, float, float, float],
        category_id: int,
        crowd: bool,
        where: str,
        problems: Problems,
    ) -> None:
        """Add `box` (x1, y1, x2, y2 image pixels) unless it is invalid, which is reported."""
        x1, y1, x2, y2 = box
        if not all(np.isfinite(box)):
            problems.report(where, f"box {list(box)} has a non-finite coordinate")
            return
        if x2 <= x1 or y2 <= y1:
            problems.report(where, f"box {_fmt(box)} has x2 <= x1 or y2 <= y1")
            return
        tol = BORDER_TOLERANCE
        if x1 < -tol or y1 < -tol or x2 > self.width + tol or y2 > self.height + tol:
            problems.report(
                where, f"box {_fmt(box)} lies outside the {self.width}x{self.height} image"
            )
            return
        clipped = (
            max(x1, 0.0),
            max(y1, 0.0),
            min(x2, float(self.width)),
            min(y2, float(self.height)),
        )
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            problems.report(where, f"box {_fmt(box)} has no area inside the image")
            return
        self._boxes.append(clipped)
        self._category_ids.append(category_id)
        self._crowd.append(crowd)

    def record(self, file_name: str) -> ImageRecord:
        return ImageRecord(
            file_name=file_name,
            width=self.width,
            height=self.height,
            boxes=np.asarray(self._boxes, dtype=np.float64).reshape(-1, 4),
            category_ids=np.asarray(self._category_ids, dtype=np.int64),
            iscrowd=np.asarray(self._crowd, dtype=bool),
        )


def _fmt(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) in pixels of the image file, as stored. Raises OSError when the file is
    missing or not an image."""
    try:
        # Reads the header only: fast enough for folders of many thousands of images.
        with Image.open(path) as image:
            return image.size
    except UnidentifiedImageError:
        pass
    # A format Pillow does not know may still be one OpenCV (the training loader) decodes.
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    pixels = cv2.imdecode(np.fromfile(path, dtype=np.uint8), flags)
    if pixels is None:
        raise OSError(f"{path} is not an image that can be decoded")
    return pixels.shape[1], pixels.shape[0]


def read_names(path: str | os.PathLike) -> list[str]:
    """Class names, one per line (blank lines at the end ignored); a blank line in between or a
    name given twice is an error naming the line."""
    path = Path(path)
    lines = read_lines(path)
    while lines and not lines[-1].strip():
        lines.pop()
    names: list[str] = []
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            raise DatasetError(f"{path}:{number}: empty class name")
        if name in names:
            raise DatasetError(f"{path}:{number}: class {name!r} is listed twice")
        names.append(name)
    if not names:
        raise DatasetError(f"{path}: no class names")
    return names


def find_image(folder: Path, stem: str) -> Path | None:
    """`folder/stem` with one of IMAGE_SUFFIXES (either case), or None."""
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def read_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a text file (a UTF-8 byte-order mark is dropped); DatasetError if it is
    missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"file not found: {path}")
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
