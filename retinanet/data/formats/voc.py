"""Pascal VOC: one XML file per image (`Annotations/<id>.xml`) beside an image folder
(`JPEGImages/`).

Each `<object>` has a `<name>`, a `<bndbox>` with `xmin ymin xmax ymax` and optionally
`<difficult>1</difficult>`. VOC coordinates are 1-based inclusive pixel indices: the box covers
pixels xmin..xmax, which in continuous pixel coordinates (COCO's) is [xmin - 1, xmax). Difficult
objects become ignore regions (COCO `iscrowd=1`): never trained on as foreground or background,
and not counted as missed by COCO evaluation, as VOC's own evaluation treats them.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from retinanet.data.coco import DatasetError

from .records import (
    BoxCollector,
    ConvertedDataset,
    ImageRecord,
    Problems,
    find_image,
    image_size,
    read_lines,
)

_OBJECT_TAG = re.compile(rb"<object[\s>]")


def read_voc(
    image_dir: str | os.PathLike,
    annotation_dir: str | os.PathLike,
    classes: Sequence[str] | None = None,
    ids_file: str | os.PathLike | None = None,
    skip_invalid: bool = False,
) -> ConvertedDataset:
    """Convert a VOC dataset.

    image_dir: the images (JPEGImages); an XML's `<filename>` is looked up there, else its id
        with a usual image suffix.
    annotation_dir: the XML files; all `*.xml` in it (sorted), or those listed in `ids_file`.
    classes: class names, category ids 1..K in this order; default: every name found, sorted.
    ids_file: a VOC split list (`ImageSets/Main/train.txt`): one id per line, the first word.
    skip_invalid: leave out (and list) bad objects and images instead of raising DatasetError.
    """
    image_dir, annotation_dir = Path(image_dir), Path(annotation_dir)
    for folder, what in ((image_dir, "image"), (annotation_dir, "annotation")):
        if not folder.is_dir():
            raise DatasetError(f"{what} folder not found: {folder}")
    problems = Problems(skip_invalid)
    parsed = [p for path in _xml_files(annotation_dir, ids_file) if (p := _parse(path, problems))]
    names = list(classes) if classes else sorted({o.name for p in parsed for o in p.objects})
    if not names:
        raise DatasetError(f"{annotation_dir}: no objects, so no classes; pass a classes file")
    categories = list(enumerate(names, start=1))  # COCO ids 1..K
    category_of = {name: cid for cid, name in categories}
    records = [_image_record(voc, image_dir, category_of, problems) for voc in parsed]
    return ConvertedDataset([r for r in records if r is not None], categories, problems.skipped)


@dataclass
class _VocObject:
    name: str
    box: tuple[float, ...] | None  # VOC's xmin, ymin, xmax, ymax; None when unreadable
    difficult: bool
    where: str  # file:line for messages


@dataclass
class _VocFile:
    path: Path
    filename: str
    size: tuple[int, int] | None  # (width, height) from <size>
    objects: list[_VocObject]


def _xml_files(annotation_dir: Path, ids_file: str | os.PathLike | None) -> list[Path]:
    if ids_file is None:
        return sorted(annotation_dir.glob("*.xml"))
    paths = []
    for number, line in enumerate(read_lines(ids_file), start=1):
        words = line.split()
        if not words:
            continue
        path = annotation_dir / f"{words[0]}.xml"
        if not path.is_file():
            raise DatasetError(f"{ids_file}:{number}: no annotation file {path}")
        paths.append(path)
    return paths


def _parse(path: Path, problems: Problems) -> _VocFile | None:
    """The XML's file name, size and objects; None (reported) when it cannot be used at all."""
    raw = path.read_bytes()
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as e:
        problems.report(f"{path}:{e.position[0]}", f"malformed XML ({e})")
        return None
    # ElementTree keeps no line numbers; the n-th <object> tag of the text is the n-th object.
    lines = [raw.count(b"\n", 0, m.start()) + 1 for m in _OBJECT_TAG.finditer(raw)]
    elements = root.findall("object")
    if len(lines) != len(elements):  # e.g. an <object> inside a comment: name by position
        lines = []
    objects = [
        _parse_object(element, f"{path}:{lines[i]}" if lines else f"{path} (object {i + 1})")
        for i, element in enumerate(elements)
    ]
    return _VocFile(path, (root.findtext("filename") or "").strip(), _size(root), objects)


def _parse_object(element: ET.Element, where: str) -> _VocObject:
    name = (element.findtext("name") or "").strip()
    difficult = (element.findtext("difficult") or "0").strip() not in ("0", "")
    box_element = element.find("bndbox")
    box = None
    if box_element is not None:
        try:
            box = tuple(
                float(box_element.findtext(k) or "") for k in ("xmin", "ymin", "xmax", "ymax")
            )
        except ValueError:
            box = None
    return _VocObject(name, box, difficult, where)


def _size(root: ET.Element) -> tuple[int, int] | None:
    """(width, height) from <size>, None when absent or zero (some tools write 0)."""
    try:
        width = int(float(root.findtext("size/width") or 0))
        height = int(float(root.findtext("size/height") or 0))
    except ValueError:
        return None
    return (width, height) if width > 0 and height > 0 else None


def _image_record(
    voc: _VocFile, image_dir: Path, category_of: dict[str, int], problems: Problems
) -> ImageRecord | None:
    image_path = image_dir / voc.filename if voc.filename else None
    if image_path is None or not image_path.is_file():
        image_path = find_image(image_dir, voc.path.stem)
    if image_path is None:
        named = f"{voc.filename} or " if voc.filename else ""
        problems.report(
            f"{voc.path}", f"no image {named}{voc.path.stem}.<jpg|png|...> in {image_dir}"
        )
        return None
    try:
        width, height = image_size(image_path)
    except OSError as e:
        problems.report(f"{voc.path}", f"cannot read image {image_path}: {e}")
        return None
    if voc.size is not None and voc.size != (width, height):
        problems.report(
            f"{voc.path}",
            f"<size> says {voc.size[0]}x{voc.size[1]} but {image_path} is {width}x{height}",
        )
        return None
    boxes = BoxCollector(width, height)
    for obj in voc.objects:
        if obj.box is None:
            problems.report(obj.where, "object without a numeric <bndbox> xmin/ymin/xmax/ymax")
        elif obj.name not in category_of:
            problems.report(obj.where, f"unknown class {obj.name!r}")
        else:
            xmin, ymin, xmax, ymax = obj.box
            box = (xmin - 1.0, ymin - 1.0, xmax, ymax)
            boxes.add(box, category_of[obj.name], obj.difficult, obj.where, problems)
    return boxes.record(image_path.relative_to(image_dir).as_posix())
