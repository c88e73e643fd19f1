"""COCO-format detection datasets: an image folder plus an instances JSON, read through
pycocotools and checked up front so that bad input fails at construction with a message that
names the file, image id or annotation id at fault, never deep inside a DataLoader worker.

The rules live in one place: `read_coco_annotations` / `check_coco_dict` list every problem of
an annotation file (`DatasetProblem`), `decode_image` every problem of an image; the dataset
refuses the first error and warns about the repairs, evaluation refuses the first error of its
ground truth, and `retinanet check-dataset` (`retinanet.data.check`) lists them all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO

from retinanet.data.transforms import DetectionTransform

_MAX_NAMED = 3  # how many offending files an error message lists before "..."
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # ids are stored as int64
_MAX_SHOWN = 60  # characters of a bad value quoted in a message

ERROR, REPAIR = "error", "repair"


class DatasetError(ValueError):
    """A dataset file, folder or record that cannot be used; the message names the culprit."""


class ImageError(DatasetError):
    """An image that cannot be used: `code` is "missing", "unreadable", "undecodable",
    "truncated" or "size_mismatch"."""

    def __init__(self, message: str, code: str, image_id: int, path: str) -> None:
        super().__init__(message)
        self.code = code
        self.image_id = image_id
        self.path = path


# What an unreadable training image does: stop the run, or skip to the next readable image.
OnBadImage = Literal["stop", "skip"]
BAD_IMAGE_POLICIES: tuple[str, ...] = get_args(OnBadImage)


class DatasetWarning(UserWarning):
    """Records that were repaired (clipped) or skipped while loading a dataset."""


@dataclasses.dataclass(frozen=True)
class DatasetProblem:
    """One thing wrong with a COCO-format dataset.

    severity: "error" (the dataset is refused, or the image cannot be used) or "repair" (the
        loader clips the box, drops it or skips the annotation, with a `DatasetWarning`).
    kind: "file" (the annotation file or image folder as a whole), "category", "image" or
        "annotation".
    code: a short name of the rule broken, e.g. "missing", "duplicate_id", "unknown_category".
    message: what is wrong, naming the record (and for images the file).
    id: the record's id; None when it has no usable one.
    position: the record's index in its JSON list (None for problems found on disk).
    file_name: the image's `file_name` (images only).
    """

    severity: str
    kind: str
    code: str
    message: str
    id: int | None = None
    position: int | None = None
    file_name: str | None = None


class ProblemList:
    """The `errors` and `repairs` among a `problems` list of DatasetProblem."""

    problems: list[DatasetProblem]

    @property
    def errors(self) -> list[DatasetProblem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def repairs(self) -> list[DatasetProblem]:
        return [p for p in self.problems if p.severity == REPAIR]


@dataclasses.dataclass
class CocoRecords(ProblemList):
    """The usable content of an instances JSON and everything wrong with it.

    category_ids: sorted dataset category ids; class_names: their names, in that order.
    image_ids: (I,) int64 sorted ids of the valid image records; file_names: theirs;
        widths, heights: (I,) float64 pixels from the JSON.
    boxes: (A, 4) float32 xyxy original pixels, clipped to the image; labels: (A,) int64 in
        [0, len(category_ids)); is_crowd: (A,) bool; image_index: (A,) int64 row in image_ids
        (the annotations the loader keeps).
    num_images, num_annotations, num_categories: records in the file, valid or not.
    problems: errors and repairs, in file order within each kind.
    """

    source: str
    category_ids: list[int]
    class_names: list[str]
    image_ids: np.ndarray
    file_names: list[str]
    widths: np.ndarray
    heights: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    is_crowd: np.ndarray
    image_index: np.ndarray
    num_images: int
    num_annotations: int
    num_categories: int
    problems: list[DatasetProblem]

    def raise_on_errors(self) -> None:
        """DatasetError with the first error, and how many more there are."""
        errors = self.errors
        if errors:
            more = len(errors) - 1
            tail = (
                f" (and {more} more problems: `retinanet check-dataset` lists them)" if more else ""
            )
            raise DatasetError(f"{self.source}: {errors[0].message}{tail}")

    def warn_repairs(self, stacklevel: int = 2) -> None:
        """One DatasetWarning counting each kind of repair, with an example annotation id."""
        parts = []
        for code, what in _REPAIR_SUMMARIES.items():
            cases = [p for p in self.problems if p.code == code and p.severity == REPAIR]
            if cases:
                parts.append(what.format(n=len(cases)) + f" (e.g. annotation id {cases[0].id})")
        if parts:
            warnings.warn(
                f"{self.source}: " + ", ".join(parts), DatasetWarning, stacklevel=stacklevel + 1
            )


_REPAIR_SUMMARIES = {
    "clipped_box": "clipped {n} boxes to their image",
    "degenerate_box": "dropped {n} degenerate boxes (w or h < 1 px)",
    "unknown_image": "skipped {n} annotations whose image_id is not in 'images'",
}


class CocoDetection(torch.utils.data.Dataset):
    """Detection samples from a COCO-format dataset.

    Category ids are mapped to contiguous labels in [0, num_classes) in increasing id order
    (`category_ids[label]` maps back). Boxes partly outside their image are clipped to it, boxes
    narrower or lower than 1 px (after clipping) are dropped, and annotations whose image_id is not
    listed in `images` are skipped; all three are counted in one `DatasetWarning`. `iscrowd=1`
    annotations become ignore regions (`crowd_boxes`). Images are ordered by image id.

    Args:
        image_dir: folder holding the `file_name` of every image.
        annotation_file: instances JSON with `images`, `categories` and (optionally) `annotations`.
        transform: resize/augmentation; None returns images at their stored size.
        filter_empty: drop images without any non-crowd box (by default they are kept: they
            teach the classifier what background looks like).
        on_bad_image: what reading an item whose image cannot be read or decoded does.
            "stop": raise DatasetError naming the file; in data loaders
            (`bad_images_as_items`, set by the loader builders) an item with only `image_id`
            and `bad_image` (the message) instead, which the collate turns into a batch the
            trainer and evaluation stop on with that one line (an exception raised in a loader
            worker arrives wrapped in the worker's traceback). "skip": the next readable image
            in index order (deterministic, so resumed runs see the same data), with the
            messages of the skipped ones in `skipped_images`.

    An item (`dataset[i]` or `dataset[(i, seed)]`, the seed drawing the augmentation; an int index
    gives the deterministic test-time transform) is a dict:
        image: (3, H, W) uint8 RGB tensor, after resize/augmentation.
        boxes: (N, 4) float32 xyxy in the pixels of `image`; labels: (N,) int64.
        crowd_boxes: (M, 4) float32 xyxy in the pixels of `image`.
        image_id: int; orig_size: (H0, W0) as stored on disk; size: (H, W) of `image`.

    Raises:
        DatasetError: missing JSON or folder, malformed JSON, a record that breaks a rule of
            `check_coco_dict`, image files missing on disk, and (when an item is read) an image
            that cannot be decoded or whose size disagrees with the JSON. The message names the
            first problem; `retinanet check-dataset` lists them all.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        transform: DetectionTransform | None = None,
        filter_empty: bool = False,
        on_bad_image: str = "stop",
    ) -> None:
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(
                f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}"
            )
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.bad_images_as_items = False
        if not self.annotation_file.is_file():
            raise DatasetError(f"annotation file not found: {self.annotation_file}")
        if not self.image_dir.is_dir():
            raise DatasetError(f"image folder not found: {self.image_dir}")
        records = read_coco_annotations(self.annotation_file)
        records.raise_on_errors()
        records.warn_repairs()

        self.category_ids: list[int] = records.category_ids
        self.class_names: list[str] = records.class_names
        self.category_id_to_label: dict[int, int] = {
            c: label for label, c in enumerate(self.category_ids)
        }
        image_index = records.image_index
        keep = np.ones(len(records.image_ids), dtype=bool)  # the images this dataset serves
        if filter_empty:
            keep = np.bincount(image_index[~records.is_crowd], minlength=len(keep)) > 0
        if not keep.any():
            raise DatasetError(f"{self.annotation_file}: no image has a box (filter_empty=True)")
        # Annotations sorted by image so that image i owns rows offsets[i]:offsets[i + 1]; flat
        # numpy arrays (not per-image lists) also keep forked workers from copying them on read.
        by_image = np.argsort(image_index, kind="stable")
        by_image = by_image[keep[image_index[by_image]]]
        counts = np.bincount(image_index, minlength=len(keep))[keep]
        self._boxes = records.boxes[by_image]
        self._labels = records.labels[by_image]
        self._is_crowd = records.is_crowd[by_image]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.image_ids: list[int] = records.image_ids[keep].tolist()
        self._widths = records.widths[keep]
        self._heights = records.heights[keep]
        self._paths = [str(self.image_dir / records.file_names[i]) for i in np.flatnonzero(keep)]
        self._check_files_exist()

    @functools.cached_property
    def coco(self) -> COCO:
        """pycocotools index of the annotation file as stored, with the keys COCOeval reads
        filled in where the file omits them (see `complete_for_evaluation`). Built on first
        use: training never needs it, and DataLoader workers forked from a dataset holding the
        whole annotation file as Python objects would each end up copying it."""
        coco = COCO()
        coco.dataset = complete_for_evaluation(_load_json(self.annotation_file))
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
        return coco

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @property
    def aspect_ratios(self) -> np.ndarray:
        """(len,) float64 width / height of each image, from the JSON (no decoding)."""
        return self._widths / self._heights

    def __len__(self) -> int:
        return len(self.image_ids)

    def annotations(self, index: int) -> dict[str, np.ndarray]:
        """Cleaned annotations of image `index` in original-image pixels, without decoding it:
        boxes (N, 4) float32 xyxy, labels (N,) int64, crowd_boxes (M, 4) float32 xyxy."""
        rows = slice(self._offsets[index], self._offsets[index + 1])
        crowd = self._is_crowd[rows]
        return {
            "boxes": self._boxes[rows][~crowd],
            "labels": self._labels[rows][~crowd],
            "crowd_boxes": self._boxes[rows][crowd],
        }

    def read_image(self, index: int) -> np.ndarray:
        """(H0, W0, 3) uint8 RGB pixels of image `index`, exactly as stored (EXIF orientation is
        ignored, as in the COCO annotations)."""
        expected = (int(self._heights[index]), int(self._widths[index]))
        return decode_image(
            self._paths[index], self.image_ids[index], expected, self.annotation_file
        )

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        skipped: list[str] = []
        while True:
            try:
                image = self.read_image(index)
                break
            except DatasetError as err:
                if self.on_bad_image == "stop":
                    if not self.bad_images_as_items:
                        raise
                    return {"image_id": self.image_ids[index], "bad_image": str(err)}
                skipped.append(str(err))
                if len(skipped) == len(self):
                    raise DatasetError(f"no readable image in {self.image_dir}: {err}") from err
                index = (index + 1) % len(self)
        sample = self._sample(index, image, seed)
        if skipped:
            sample["skipped_images"] = skipped
        return sample

    def _sample(self, index: int, image: np.ndarray, seed: int | None) -> dict[str, Any]:
        target = self.annotations(index)
        num_objects = len(target["boxes"])
        boxes = np.concatenate([target["boxes"], target["crowd_boxes"]])
        if self.transform is not None:
            image, boxes, keep = self.transform(image, boxes, seed)
        else:
            keep = np.arange(len(boxes))
        is_object = keep < num_objects
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "boxes": torch.from_numpy(boxes[is_object]),
            "labels": torch.from_numpy(target["labels"][keep[is_object]]),
            "crowd_boxes": torch.from_numpy(boxes[~is_object]),
            "image_id": self.image_ids[index],
            "orig_size": (int(self._heights[index]), int(self._widths[index])),
            "size": (image.shape[0], image.shape[1]),
        }

    def _check_files_exist(self) -> None:
        missing = [i for i, path in enumerate(self._paths) if not os.path.isfile(path)]
        if missing:
            named = ", ".join(
                f"{self._paths[i]} (image id {self.image_ids[i]})" for i in missing[:_MAX_NAMED]
            )
            more = ", ..." if len(missing) > _MAX_NAMED else ""
            raise DatasetError(
                f"{len(missing)} images listed in {self.annotation_file} are missing on disk: "
                f"{named}{more}"
            )


def decode_image(
    path: str | os.PathLike,
    image_id: int,
    expected_size: tuple[int, int] | None = None,
    annotation_file: str | os.PathLike = "the annotation file",
) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of the image file `path`, as stored (EXIF orientation ignored,
    as in the COCO annotations); `expected_size` (H, W) is what the JSON says.

    Raises ImageError: the file is missing or unreadable, is a JPEG or PNG cut short (some
    decoders fill the missing rows with grey instead of failing), does not decode, or has
    another size."""
    path = str(path)
    name = f"image {path} (image id {image_id})"
    try:
        encoded = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError as e:
        raise ImageError(f"{name} is missing", "missing", image_id, path) from e
    except (OSError, ValueError) as e:  # ValueError: a name the OS cannot represent
        raise ImageError(f"cannot read {name}: {e}", "unreadable", image_id, path) from e
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imdecode(encoded, flags) if encoded.size else None
    # Checked whether or not it decoded: OpenCV 5 refuses a cut-short JPEG, 4.x pads it with
    # grey and succeeds; either way the message says what happened.
    if _is_truncated(encoded):
        raise ImageError(
            f"{name} is truncated: the file ends before the image data does",
            "truncated",
            image_id,
            path,
        )
    if bgr is None:
        raise ImageError(
            f"cannot decode {name}: corrupt or not an image", "undecodable", image_id, path
        )
    if expected_size is not None and bgr.shape[:2] != tuple(expected_size):
        height, width = expected_size
        raise ImageError(
            f"{name} is {bgr.shape[1]}x{bgr.shape[0]} pixels but {annotation_file} says "
            f"{width}x{height}",
            "size_mismatch",
            image_id,
            path,
        )
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _is_truncated(encoded: np.ndarray) -> bool:
    """A JPEG whose image data has no end-of-image marker, or a PNG without its IEND chunk.
    OpenCV 4 decodes a cut-short JPEG "successfully", padding the missing rows with grey, so a
    broken download would otherwise train as half an image."""
    data = encoded.tobytes()
    if data.startswith(b"\xff\xd8"):
        return not _jpeg_is_complete(data)
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return b"IEND" not in data[-65536:]
    return False


def _jpeg_is_complete(data: bytes) -> bool:
    """Walk the segments to the first scan (skipping APPn payloads, where an EXIF thumbnail has
    an end marker of its own) and look for the end-of-image marker after it: inside the
    entropy-coded data a 0xFF byte is always followed by 0x00 or a restart marker, so the first
    0xFF 0xD9 there is the real end."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return True  # not the layout this walk understands: leave it to the decoder
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
        elif marker == 0xDA:  # start of scan
            return data.find(b"\xff\xd9", i + 2) != -1
        elif 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return False


def read_coco_annotations(annotation_file: str | os.PathLike) -> CocoRecords:
    """Read and check an instances JSON: `check_coco_dict` of its content.

    Raises DatasetError only when the file as a whole is unusable (missing, not JSON, not an
    object with 'images' and 'categories' lists); problems of records are listed instead."""
    path = Path(annotation_file)
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}")
    return check_coco_dict(_load_json(path), str(path))


def check_coco_dict(data: Any, source: str) -> CocoRecords:
    """Check the content of an instances JSON (as json.load returns it) against the loader's
    rules and collect the usable records, in the form `CocoRecords` describes.

    Rules: every category has an integer id and a string name; every image an integer id, a
    string file_name and whole-number width and height >= 1; every annotation integer id,
    image_id and category_id and a bbox of four finite numbers, optionally iscrowd 0 or 1 and a
    finite area >= 0; ids are unique within their kind; an annotation's category exists
    (errors). An annotation of an image not in 'images' is skipped, a box partly outside its
    image clipped, a box under 1 px wide or high dropped (repairs).

    Raises DatasetError when `data` is not an object with 'images' and 'categories' lists (and
    'annotations', if present, a list)."""
    _check_structure(data, source)
    problems: list[DatasetProblem] = []
    categories = _read_categories(data["categories"], problems)
    images = _read_images(data["images"], problems)
    category_ids = sorted(categories)
    annotations = _read_annotations(data.get("annotations", []), problems)
    kept = _resolve_annotations(annotations, category_ids, images, problems)
    return CocoRecords(
        source=source,
        category_ids=category_ids,
        class_names=[categories[c] for c in category_ids],
        image_ids=images.ids,
        file_names=images.file_names,
        widths=images.widths,
        heights=images.heights,
        **kept,
        num_images=len(data["images"]),
        num_annotations=len(data.get("annotations", [])),
        num_categories=len(data["categories"]),
        problems=sort_by_kind(problems),
    )


def complete_for_evaluation(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with what COCOeval reads but COCO files may leave out filled in: 'annotations'
    (empty), an annotation's 'iscrowd' (0) and 'area' (the box's w * h, the usual stand-in for
    datasets without masks; 0 for a box with a negative side). The records given are not
    modified; `data` itself is returned when nothing is missing."""
    annotations = data.get("annotations")
    if annotations is None:
        return {**data, "annotations": []}
    if all(isinstance(a, dict) and "area" in a and "iscrowd" in a for a in annotations):
        return data
    completed = []
    for ann in annotations:
        if isinstance(ann, dict) and ("area" not in ann or "iscrowd" not in ann):
            ann = dict(ann)
            ann.setdefault("iscrowd", 0)
            if "area" not in ann:
                # A box with a negative side (dropped for training, kept as COCO has it for
                # evaluation) covers nothing.
                bbox = ann.get("bbox")
                area = max(float(bbox[2]), 0.0) * max(float(bbox[3]), 0.0)
                ann["area"] = min(area, sys.float_info.max)  # finite, as the rules require
        completed.append(ann)
    return {**data, "annotations": completed}


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"malformed JSON in {path}: {e}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read annotation file {path}: {e}") from e
    except RecursionError as e:
        raise DatasetError(f"malformed JSON in {path}: nested too deeply") from e
    _check_structure(data, str(path))
    return data


def _check_structure(data: Any, source: str) -> None:
    if not isinstance(data, dict):
        raise DatasetError(f"{source}: expected a JSON object at the top level")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{source}: missing or non-list key '{key}'")
    if not isinstance(data.get("annotations", []), list):
        raise DatasetError(f"{source}: key 'annotations' is not a list")


def sort_by_kind(problems: list[DatasetProblem]) -> list[DatasetProblem]:
    """Problems of the files, then of categories, images and annotations: the order a reader fixes
    them in; stable, so file order within each kind is kept."""
    order = {"file": 0, "category": 1, "image": 2, "annotation": 3}
    return sorted(problems, key=lambda p: order[p.kind])


def _is_int(value: Any) -> bool:
    """An integer id: within int64 (how ids are stored), and not a JSON true/false (which
    Python and numpy would read as 1/0, but faster-coco-eval refuses)."""
    return (
        isinstance(value, (int, np.integer))
        and not isinstance(value, bool)
        and _INT64_MIN <= value <= _INT64_MAX
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating))


def _is_finite(value: Any) -> bool:
    """A number that is finite as a float (an int too large for a float is not)."""
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:
        return False


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _record_problem(kind: str, record: Any, position: int, code: str, what: str) -> DatasetProblem:
    """An error of record `position` of the `kind` list, named as "image id 5" (or "image #3"
    without a usable id)."""
    record_id = (
        int(record["id"]) if isinstance(record, dict) and _is_int(record.get("id")) else None
    )
    name = f"{kind} #{position}" if record_id is None else f"{kind} id {record_id}"
    file_name = record.get("file_name") if kind == "image" and isinstance(record, dict) else None
    if not isinstance(file_name, str):
        file_name = None
    return DatasetProblem(ERROR, kind, code, f"{name} {what}", record_id, position, file_name)


def _missing_or_bad(record: Any, int_keys: tuple[str, ...], other_keys: tuple[str, ...]) -> str:
    """What is wrong with the keys every record of a kind needs ('' when nothing)."""
    if not isinstance(record, dict):
        return f"is not an object but {_shown(record)}"
    for key in (*int_keys, *other_keys):
        if key not in record:
            return f"has no '{key}'"
    for key in int_keys:
        if not _is_int(record[key]):
            return f"has a non-integer {key} {_shown(record[key])}"
    return ""


def _read_categories(records: list[Any], problems: list[DatasetProblem]) -> dict[int, str]:
    """category id -> name, of the valid category records."""
    names: dict[int, str] = {}
    for position, cat in enumerate(records):
        what = _missing_or_bad(cat, ("id",), ("name",))
        code = "malformed_record"
        if not what and not isinstance(cat["name"], str):
            what = f"has a non-string name {_shown(cat['name'])}"
        if not what and int(cat["id"]) in names:
            what, code = "appears more than once", "duplicate_id"
        if what:
            problems.append(_record_problem("category", cat, position, code, what))
            continue
        names[int(cat["id"])] = cat["name"]
    if not records:
        problems.append(DatasetProblem(ERROR, "file", "no_categories", "'categories' is empty"))
    return names


class _Images(NamedTuple):
    """Valid image records sorted by id: ids (I,) int64, file_names, widths (I,) float64,
    heights (I,) float64; and invalid_ids, the ids of invalid records (their annotations are
    left out without a message of their own)."""

    ids: np.ndarray
    file_names: list[str]
    widths: np.ndarray
    heights: np.ndarray
    invalid_ids: set[int]


def _read_images(records: list[Any], problems: list[DatasetProblem]) -> _Images:
    """The image records as `_Images`; a problem for each invalid one."""
    ids: list[int] = []
    names: list[str] = []
    sizes: list[tuple[float, float]] = []
    seen: set[int] = set()
    invalid: set[int] = set()
    for position, img in enumerate(records):
        what = _missing_or_bad(img, ("id",), ("file_name", "width", "height"))
        code = "malformed_record"
        if not what and not (isinstance(img["file_name"], str) and img["file_name"]):
            what = f"has file_name {_shown(img['file_name'])}, expected a non-empty string"
        for key in ("width", "height"):
            if not what and not _is_pixel_count(img[key]):
                what = f"has {key} {_shown(img[key])}, expected a whole number >= 1"
        if not what and int(img["id"]) in seen:
            what, code = "appears more than once", "duplicate_id"
        if what:
            problems.append(_record_problem("image", img, position, code, what))
            if isinstance(img, dict) and _is_int(img.get("id")):
                invalid.add(int(img["id"]))
            continue
        seen.add(int(img["id"]))
        ids.append(int(img["id"]))
        names.append(img["file_name"])
        sizes.append((float(img["width"]), float(img["height"])))
    if not records:
        problems.append(DatasetProblem(ERROR, "file", "no_images", "'images' is empty"))
    ids_array = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids_array, kind="stable")
    size_array = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)[order]
    return _Images(
        ids_array[order],
        [names[i] for i in order],
        size_array[:, 0].copy(),
        size_array[:, 1].copy(),
        invalid - seen,
    )


def _is_pixel_count(value: Any) -> bool:
    return _is_finite(value) and value >= 1 and float(value).is_integer() and value <= _INT64_MAX


@dataclasses.dataclass
class _Annotations:
    """Columns of the annotation records that passed the per-record rules: ids, image_ids,
    category_ids (A,) int64; xywh (A, 4) float64; crowd (A,) bool; position (A,) int64 index in
    the JSON list."""

    ids: np.ndarray
    image_ids: np.ndarray
    category_ids: np.ndarray
    xywh: np.ndarray
    crowd: np.ndarray
    position: np.ndarray


def _read_annotations(records: list[Any], problems: list[DatasetProblem]) -> _Annotations:
    """The valid annotation records as columns; a problem for each invalid one.

    The whole list is first read as numpy arrays, which takes a COCO-sized file in well under a
    second; only when that shows anything unusual are the records checked one by one in Python,
    by the rules of `_annotation_record_problem`, which decide."""
    columns = _annotation_columns(records)
    if columns is not None:
        return columns
    valid = []
    for position, ann in enumerate(records):
        if found := _annotation_record_problem(ann):
            problems.append(_record_problem("annotation", ann, position, *found))
        else:
            valid.append(position)
    kept = [records[i] for i in valid]
    return _Annotations(
        np.asarray([a["id"] for a in kept], dtype=np.int64).reshape(-1),
        np.asarray([a["image_id"] for a in kept], dtype=np.int64).reshape(-1),
        np.asarray([a["category_id"] for a in kept], dtype=np.int64).reshape(-1),
        np.asarray([[float(v) for v in a["bbox"]] for a in kept], dtype=np.float64).reshape(-1, 4),
        np.asarray([bool(a.get("iscrowd", 0)) for a in kept], dtype=bool).reshape(-1),
        np.asarray(valid, dtype=np.int64).reshape(-1),
    )


def _annotation_columns(records: list[Any]) -> _Annotations | None:
    """The records as columns when every one is plainly valid (integer ids within int64, a
    bbox of four finite numbers, iscrowd 0 or 1, a finite area >= 0), else None."""
    count = len(records)
    try:
        id_lists = [[a[key] for a in records] for key in ("id", "image_id", "category_id")]
        # numpy reads true/false among integers as 1/0 without a trace: look for them first.
        if any(type(value) is bool for values in id_lists for value in values):
            return None
        ids, image_ids, category_ids = (np.asarray(values) for values in id_lists)
        crowd = np.asarray([a.get("iscrowd", 0) for a in records])
        area = np.asarray([a.get("area", 0.0) for a in records])
        xywh = np.asarray([a["bbox"] for a in records])
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
        return None
    with np.errstate(invalid="ignore"):
        plain = (  # an empty list reads as float64 columns: the record-by-record path takes it
            all(column.dtype.kind == "i" for column in (ids, image_ids, category_ids))
            and xywh.shape == (count, 4)
            and xywh.dtype.kind in "iuf"
            and crowd.dtype.kind in "biuf"
            and area.dtype.kind in "iuf"
            and np.isfinite(xywh).all()
            and np.isin(crowd, (0, 1)).all()
            and np.isfinite(area).all()
            and (area >= 0).all()
        )
    if not plain:
        return None
    return _Annotations(
        ids.astype(np.int64),
        image_ids.astype(np.int64),
        category_ids.astype(np.int64),
        xywh.astype(np.float64),
        crowd.astype(bool),
        np.arange(count, dtype=np.int64),
    )


def _annotation_record_problem(ann: Any) -> tuple[str, str] | None:
    """(code, what is wrong) for an annotation record that breaks a per-record rule."""
    what = _missing_or_bad(ann, ("id", "image_id", "category_id"), ("bbox",))
    if what:
        return "malformed_record", what
    bbox = ann["bbox"]
    if not (
        isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)
    ):
        return "malformed_record", f"has bbox {_shown(bbox)}, expected [x, y, w, h]"
    if not all(_is_finite(v) for v in bbox):
        return "non_finite_bbox", f"has a non-finite bbox {_shown(bbox)}"
    crowd = ann.get("iscrowd", 0)
    if not (_is_number(crowd) and crowd in (0, 1)):
        return "malformed_record", f"has iscrowd {_shown(crowd)}, expected 0 or 1"
    area = ann.get("area", 0.0)
    if not (_is_finite(area) and area >= 0):
        return "malformed_record", f"has area {_shown(area)}, expected a finite number >= 0"
    return None


def _resolve_annotations(
    anns: _Annotations, category_ids: list[int], images: _Images, problems: list[DatasetProblem]
) -> dict[str, np.ndarray]:
    """Check ids against each other and boxes against their images; clip and filter. Returns the
    annotations the loader keeps, named as in `CocoRecords`: boxes (A, 4) float32 xyxy original
    pixels, labels (A,) int64, is_crowd (A,) bool, image_index (A,) int64 (row in images.ids)."""

    def report(mask: np.ndarray, code: str, what: Any, severity: str = ERROR) -> None:
        """A problem for each annotation in `mask`; `what(row)` or `what` says what is wrong."""
        for row in np.flatnonzero(mask):
            text = what(row) if callable(what) else what
            problems.append(
                DatasetProblem(
                    severity,
                    "annotation",
                    code,
                    f"annotation id {anns.ids[row]} {text}",
                    int(anns.ids[row]),
                    int(anns.position[row]),
                )
            )

    # Every repeat of an id after its first occurrence.
    first = np.zeros(len(anns.ids), dtype=bool)
    first[np.unique(anns.ids, return_index=True)[1]] = True
    report(~first, "duplicate_id", "appears more than once")

    known_cat = np.isin(anns.category_ids, category_ids)
    report(
        ~known_cat,
        "unknown_category",
        lambda row: f"has category_id {anns.category_ids[row]}, which is not in 'categories'",
    )
    labels = np.searchsorted(category_ids, anns.category_ids).astype(np.int64)

    pos = np.searchsorted(images.ids, anns.image_ids)  # len(images.ids): above every image id
    known_image = pos < len(images.ids)
    known_image[known_image] = images.ids[pos[known_image]] == anns.image_ids[known_image]
    # Annotations of an image whose own record is broken go with it, without a message.
    of_invalid_image = np.isin(anns.image_ids, list(images.invalid_ids))
    report(
        ~known_image & ~of_invalid_image,
        "unknown_image",
        "has an image_id that is not in 'images': skipped",
        REPAIR,
    )

    with np.errstate(over="ignore"):  # x + w of huge values is inf, clipped below
        boxes = np.concatenate([anns.xywh[:, :2], anns.xywh[:, :2] + anns.xywh[:, 2:]], axis=1)
    sizes = np.stack([images.widths, images.heights, images.widths, images.heights], axis=1)
    limits = np.zeros_like(boxes)  # boxes of unknown images are not kept, nor reported below
    limits[known_image] = sizes[pos[known_image]]
    clipped_boxes = np.clip(boxes, 0.0, limits)
    degenerate = (clipped_boxes[:, 2:] - clipped_boxes[:, :2] < 1.0).any(axis=1)
    was_clipped = (clipped_boxes != boxes).any(axis=1) & ~degenerate
    report(
        was_clipped & known_image,
        "clipped_box",
        "has a box partly outside its image: clipped",
        REPAIR,
    )
    report(
        degenerate & known_image,
        "degenerate_box",
        "has a box under 1 px wide or high (after clipping): dropped",
        REPAIR,
    )

    keep = known_image & ~degenerate & known_cat & first
    return {
        "boxes": clipped_boxes[keep].astype(np.float32),
        "labels": labels[keep],
        "is_crowd": anns.crowd[keep],
        "image_index": pos[keep].astype(np.int64),
    }
