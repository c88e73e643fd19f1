"""The CSV list popularised by keras-retinanet: one row per object,

    path,x1,y1,x2,y2,class_name

with corners in image pixels (x2, y2 exclusive, like COCO's x + w), and a row `path,,,,,` for an
image without objects. Paths are relative to the CSV file's folder unless absolute (or relative to
`image_dir` when given). The classes file has rows `class_name,id`; its ids become the category
ids.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from retinanet.data.coco import DatasetError

from .records import BoxCollector, ConvertedDataset, Problems, image_size, read_lines


def read_classes_csv(path: str | os.PathLike) -> list[tuple[int, str]]:
    """(id, name) per row of a `class_name,id` file, in its order; a malformed row, a repeated
    name or id is an error naming the line."""
    categories: list[tuple[int, str]] = []
    for number, row in _rows(path):
        if not row:
            continue
        where = f"{path}:{number}"
        if len(row) != 2:
            raise DatasetError(f"{where}: expected 'class_name,id', got {','.join(row)!r}")
        name, raw_id = row[0].strip(), row[1].strip()
        try:
            category_id = int(raw_id)
        except ValueError:
            raise DatasetError(f"{where}: class id {raw_id!r} is not an integer") from None
        if not name or category_id < 0:
            raise DatasetError(f"{where}: need a class name and an id >= 0")
        if any(name == n or category_id == c for c, n in categories):
            raise DatasetError(f"{where}: class name {name!r} or id {category_id} repeats")
        categories.append((category_id, name))
    if not categories:
        raise DatasetError(f"{path}: no classes")
    return categories


def read_csv_dataset(
    annotation_file: str | os.PathLike,
    classes_file: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    skip_invalid: bool = False,
) -> ConvertedDataset:
    """Convert a CSV dataset; images in the order of their first row. The COCO `file_name` is
    the path as written (relative to `image_dir`, by default the CSV file's folder)."""
    annotation_file = Path(annotation_file)
    root = Path(image_dir) if image_dir is not None else annotation_file.parent
    categories = read_classes_csv(classes_file)
    category_of = {name: cid for cid, name in categories}
    problems = Problems(skip_invalid)
    collectors: dict[str, BoxCollector | None] = {}  # None: the image could not be read
    for number, row in _rows(annotation_file):
        if not row or not any(v.strip() for v in row):
            continue
        where = f"{annotation_file}:{number}"
        if len(row) != 6:
            problems.report(where, f"expected 'path,x1,y1,x2,y2,class_name', got {len(row)} fields")
            continue
        path = row[0].strip()
        if path not in collectors:
            collectors[path] = _collector(root / path, where, problems)
        boxes = collectors[path]
        if boxes is None:
            # The missing image was reported on its first row; its other rows go with it.
            continue
        values = [v.strip() for v in row[1:]]
        if not any(values):
            continue  # `path,,,,,`: an image without objects
        _add_row(values, where, category_of, boxes, problems)
    images = [
        boxes.record(Path(path).as_posix())
        for path, boxes in collectors.items()
        if boxes is not None
    ]
    return ConvertedDataset(images, categories, problems.skipped)


def _rows(path: str | os.PathLike) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each row; csv handles quoted fields with commas."""
    reader = csv.reader(read_lines(path))
    # line_num counts the lines read so far: a quoted field may span several.
    return [(reader.line_num, row) for row in reader]


def _collector(path: Path, where: str, problems: Problems) -> BoxCollector | None:
    try:
        width, height = image_size(path)
    except FileNotFoundError:
        problems.report(where, f"image {path} not found")
        return None
    except OSError as e:
        problems.report(where, f"cannot read image {path}: {e}")
        return None
    return BoxCollector(width, height)


def _add_row(
    values: list[str],
    where: str,
    category_of: dict[str, int],
    boxes: BoxCollector,
    problems: Problems,
) -> None:
    *corners, name = values
    try:
        x1, y1, x2, y2 = (float(v) for v in corners)
    except ValueError:
        problems.report(where, f"box {corners} is not 4 numbers")
        return
    if name not in category_of:
        problems.report(where, f"unknown class {name!r} (not in the classes file)")
        return
    boxes.add((x1, y1, x2, y2), category_of[name], False, where, problems)
