"""YOLO (Darknet / Ultralytics) labels: one text file per image, `labels/<stem>.txt` beside
`images/<stem>.jpg` (sub-folders mirrored), one line per object:

    class_index cx cy w h

class_index is 0-based into the names file; the box centre and size are fractions of the image
width and height, so the image sizes are read from the image files. An image without a label file
(or with an empty one) has no objects.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from retinanet.data.coco import DatasetError

from .records import (
    IMAGE_SUFFIXES,
    BoxCollector,
    ConvertedDataset,
    Problems,
    image_size,
    read_lines,
)


def read_yolo(
    image_dir: str | os.PathLike,
    label_dir: str | os.PathLike,
    classes: Sequence[str],
    skip_invalid: bool = False,
    ignore: Sequence[str | os.PathLike] = (),
) -> ConvertedDataset:
    """Convert a YOLO dataset.

    image_dir: images, searched recursively (suffixes IMAGE_SUFFIXES), sorted by path.
    label_dir: `<relative path of the image without suffix>.txt` for each image.
    classes: class names; class index i becomes category id i + 1.
    skip_invalid: leave out (and list) bad lines and images instead of raising DatasetError.
    ignore: files in label_dir that are not labels (e.g. a classes.txt kept there).
    """
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    for folder, what in ((image_dir, "image"), (label_dir, "label")):
        if not folder.is_dir():
            raise DatasetError(f"{what} folder not found: {folder}")
    if not classes:
        raise DatasetError("YOLO labels need the class names (--classes names.txt)")
    problems = Problems(skip_invalid)
    image_paths = sorted(
        p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    stems = {p.relative_to(image_dir).with_suffix("") for p in image_paths}
    ignored = {Path(p).resolve() for p in ignore}
    for label in sorted(label_dir.rglob("*.txt")):
        stem = label.relative_to(label_dir).with_suffix("")
        if stem not in stems and label.resolve() not in ignored:
            problems.report(str(label), f"no image for this label file in {image_dir}")

    images = []
    for path in image_paths:
        try:
            width, height = image_size(path)
        except OSError as e:
            problems.report(str(path), f"cannot read image: {e}")
            continue
        boxes = BoxCollector(width, height)
        label = label_dir / path.relative_to(image_dir).with_suffix(".txt")
        if label.is_file():
            for number, line in enumerate(read_lines(label), start=1):
                if line.strip():
                    _add_line(line, f"{label}:{number}", len(classes), boxes, problems)
        images.append(boxes.record(path.relative_to(image_dir).as_posix()))
    return ConvertedDataset(images, list(enumerate(classes, start=1)), problems.skipped)


def _add_line(
    line: str, where: str, num_classes: int, boxes: BoxCollector, problems: Problems
) -> None:
    words = line.split()
    if len(words) != 5:
        problems.report(where, f"expected 'class cx cy w h', got {line.strip()!r}")
        return
    try:
        index = int(words[0])
        cx, cy, w, h = (float(v) for v in words[1:])
    except ValueError:
        problems.report(where, f"expected an integer class and 4 numbers, got {line.strip()!r}")
        return
    if not 0 <= index < num_classes:
        problems.report(where, f"class index {index} is not in [0, {num_classes})")
        return
    x1, x2 = (cx - w / 2) * boxes.width, (cx + w / 2) * boxes.width
    y1, y2 = (cy - h / 2) * boxes.height, (cy + h / 2) * boxes.height
    boxes.add((x1, y1, x2, y2), index + 1, False, where, problems)
