"""COCO-format detection datasets: an image folder plus an instances JSON, read through
pycocotools and checked up front so that bad input fails at construction with a message that
names the file, image id or annotation id at fault, never deep inside a DataLoader worker."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO

from retinanet.data.transforms import DetectionTransform

_MAX_NAMED = 3  # how many offending files an error message lists before "..."


class DatasetError(ValueError):
    """A dataset file, folder or record that cannot be used; the message names the culprit."""


BAD_IMAGE_POLICIES = ("stop", "skip")


class DatasetWarning(UserWarning):
    """Records that were repaired (clipped) or skipped while loading a dataset."""


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
        DatasetError: missing JSON or folder, malformed JSON, missing keys, duplicate ids, an
            unknown category id, image files missing on disk, and (when an item is read) an
            image that cannot be decoded or whose size disagrees with the JSON.
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
        data = _load_json(self.annotation_file)

        categories = _read_categories(data, self.annotation_file)
        self.category_ids: list[int] = sorted(categories)
        self.class_names: list[str] = [categories[c] for c in self.category_ids]
        self.category_id_to_label: dict[int, int] = {
            c: label for label, c in enumerate(self.category_ids)
        }

        image_ids, file_names, widths, heights = _read_images(data, self.annotation_file)
        order = np.argsort(image_ids, kind="stable")
        image_ids, widths, heights = image_ids[order], widths[order], heights[order]
        file_names = [file_names[i] for i in order]

        boxes, labels, is_crowd, image_index = self._clean_annotations(
            data, image_ids, widths, heights
        )
        # Annotations sorted by image so that image i owns rows offsets[i]:offsets[i + 1]; flat
        # numpy arrays (not per-image lists) also keep forked workers from copying them on read.
        by_image = np.argsort(image_index, kind="stable")
        counts = np.bincount(image_index, minlength=len(image_ids))
        if filter_empty:
            positives = np.bincount(image_index[~is_crowd], minlength=len(image_ids))
            keep_image = positives > 0
            keep_ann = keep_image[image_index[by_image]]
            by_image, counts = by_image[keep_ann], counts[keep_image]
            image_ids, widths, heights = (
                image_ids[keep_image],
                widths[keep_image],
                heights[keep_image],
            )
            file_names = [file_names[i] for i in np.flatnonzero(keep_image)]
        self._boxes = boxes[by_image]
        self._labels = labels[by_image]
        self._is_crowd = is_crowd[by_image]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

        if len(image_ids) == 0:
            raise DatasetError(f"{self.annotation_file}: no image has a box (filter_empty=True)")
        self.image_ids: list[int] = image_ids.tolist()
        self._widths = widths
        self._heights = heights
        self._paths = [str(self.image_dir / f) for f in file_names]
        self._check_files_exist()

    @functools.cached_property
    def coco(self) -> COCO:
        """pycocotools index of the annotation file, as stored (for evaluation). Built on first
        use: training never needs it, and DataLoader workers forked from a dataset holding the
        whole annotation file as Python objects would each end up copying it."""
        coco = COCO()
        coco.dataset = _load_json(self.annotation_file)
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
        path, image_id = self._paths[index], self.image_ids[index]
        try:
            encoded = np.fromfile(path, dtype=np.uint8)
        except OSError as e:
            raise DatasetError(f"cannot read image {path} (image id {image_id}): {e}") from e
        flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
        bgr = cv2.imdecode(encoded, flags) if encoded.size else None
        if bgr is None:
            raise DatasetError(
                f"cannot decode image {path} (image id {image_id}): corrupt or not an image"
            )
        expected = (int(self._heights[index]), int(self._widths[index]))
        if bgr.shape[:2] != expected:
            raise DatasetError(
                f"image {path} (image id {image_id}) is {bgr.shape[1]}x{bgr.shape[0]} pixels but "
                f"{self.annotation_file} says {expected[1]}x{expected[0]}"
            )
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

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

    def _clean_annotations(
        self,
        data: dict[str, Any],
        image_ids: np.ndarray,
        widths: np.ndarray,
        heights: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Validate, clip and filter the annotations. Returns boxes (A, 4) float32 xyxy original
        pixels, labels (A,) int64, is_crowd (A,) bool, image_index (A,) int64 (row in image_ids,
        which is sorted)."""
        source = self.annotation_file
        ann_ids, ann_image_ids, cat_ids, xywh, crowd = _read_annotations(data, source)

        known_cat = np.isin(cat_ids, self.category_ids)
        if not known_cat.all():
            bad = np.flatnonzero(~known_cat)
            raise DatasetError(
                f"{source}: {len(bad)} annotations use a category id not in 'categories', e.g. "
                f"annotation id {ann_ids[bad[0]]} has category_id {cat_ids[bad[0]]}"
            )
        labels = np.searchsorted(self.category_ids, cat_ids).astype(np.int64)

        # image_ids is sorted and non-empty: pos is the row of each annotation's image if any.
        pos = np.minimum(np.searchsorted(image_ids, ann_image_ids), len(image_ids) - 1)
        known_image = image_ids[pos] == ann_image_ids

        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        limits = np.stack([widths[pos], heights[pos], widths[pos], heights[pos]], axis=1)
        clipped_boxes = np.clip(boxes, 0.0, limits)
        degenerate = (clipped_boxes[:, 2:] - clipped_boxes[:, :2] < 1.0).any(axis=1)
        was_clipped = (clipped_boxes != boxes).any(axis=1) & ~degenerate

        keep = known_image & ~degenerate
        problems = []
        for mask, what in (
            (was_clipped & known_image, "clipped {n} boxes to their image"),
            (degenerate & known_image, "dropped {n} degenerate boxes (w or h < 1 px)"),
            (~known_image, "skipped {n} annotations whose image_id is not in 'images'"),
        ):
            if mask.any():
                example = ann_ids[np.flatnonzero(mask)[0]]
                problems.append(what.format(n=int(mask.sum())) + f" (e.g. annotation id {example})")
        if problems:
            warnings.warn(f"{source}: " + ", ".join(problems), DatasetWarning, stacklevel=3)
        return (
            clipped_boxes[keep].astype(np.float32),
            labels[keep],
            crowd[keep],
            pos[keep].astype(np.int64),
        )

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


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"malformed JSON in {path}: {e}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read annotation file {path}: {e}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top level")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: missing or non-list key '{key}'")
    if not isinstance(data.get("annotations", []), list):
        raise DatasetError(f"{path}: key 'annotations' is not a list")
    data.setdefault("annotations", [])
    return data


def _read_categories(data: dict[str, Any], source: Path) -> dict[int, str]:
    """category id -> name."""
    names: dict[int, str] = {}
    for position, cat in enumerate(data["categories"]):
        try:
            cat_id, name = int(cat["id"]), str(cat["name"])
        except (KeyError, TypeError, ValueError) as e:
            raise _record_error(source, "category", position, cat, e) from e
        if cat_id in names:
            raise DatasetError(f"{source}: category id {cat_id} appears twice")
        names[cat_id] = name
    if not names:
        raise DatasetError(f"{source}: 'categories' is empty")
    return names


def _record_error(
    source: Path, kind: str, position: int, record: Any, error: Exception
) -> DatasetError:
    """The error for an image or category record that lacks a key or holds a bad value."""
    has_id = isinstance(record, dict) and "id" in record
    culprit = f"{kind} id {record['id']}" if has_id else f"{kind} #{position}"
    if isinstance(error, KeyError):
        return DatasetError(f"{source}: {culprit} has no {error}")
    return DatasetError(f"{source}: {culprit} is malformed ({error})")


def _read_images(
    data: dict[str, Any], source: Path
) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """image ids (I,) int64, file names, widths (I,) float64, heights (I,) float64."""
    ids, names, widths, heights = [], [], [], []
    for position, img in enumerate(data["images"]):
        try:
            ids.append(int(img["id"]))
            names.append(str(img["file_name"]))
            widths.append(float(img["width"]))
            heights.append(float(img["height"]))
        except (KeyError, TypeError, ValueError) as e:
            raise _record_error(source, "image", position, img, e) from e
    ids_array = np.asarray(ids, dtype=np.int64)
    widths_array, heights_array = np.asarray(widths), np.asarray(heights)
    unique, counts = np.unique(ids_array, return_counts=True)
    if (counts > 1).any():
        raise DatasetError(f"{source}: image id {unique[counts > 1][0]} appears more than once")
    if len(ids_array) == 0:
        raise DatasetError(f"{source}: 'images' is empty")
    bad_size = (widths_array < 1) | (heights_array < 1)
    if bad_size.any():
        raise DatasetError(
            f"{source}: image id {ids_array[bad_size][0]} has a width or height below 1"
        )
    return ids_array, names, widths_array, heights_array


def _read_annotations(
    data: dict[str, Any], source: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """annotation ids (A,), image ids (A,), category ids (A,) int64; bbox (A, 4) float64 xywh;
    iscrowd (A,) bool."""
    anns = data["annotations"]
    try:
        ann_ids = np.asarray([a["id"] for a in anns], dtype=np.int64)
        image_ids = np.asarray([a["image_id"] for a in anns], dtype=np.int64)
        cat_ids = np.asarray([a["category_id"] for a in anns], dtype=np.int64)
        crowd = np.asarray([a.get("iscrowd", 0) for a in anns], dtype=bool)
        xywh = np.asarray([a["bbox"] for a in anns] or np.zeros((0, 4)), dtype=np.float64)
        if xywh.ndim != 2 or xywh.shape[1] != 4 or ann_ids.ndim != 1:
            raise ValueError("bbox is not [x, y, w, h]")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _describe_bad_annotation(anns, source) from e
    finite = np.isfinite(xywh).all(axis=1)
    if not finite.all():
        raise DatasetError(f"{source}: annotation id {ann_ids[~finite][0]} has a non-finite bbox")
    return ann_ids, image_ids, cat_ids, xywh, crowd


def _describe_bad_annotation(anns: list[Any], source: Path) -> DatasetError:
    """The error naming the first annotation that the vectorised read could not digest."""
    for position, ann in enumerate(anns):
        if not isinstance(ann, dict):
            return DatasetError(f"{source}: annotation #{position} is not an object")
        culprit = f"annotation id {ann['id']}" if "id" in ann else f"annotation #{position}"
        for key in ("id", "image_id", "category_id", "bbox"):
            if key not in ann:
                return DatasetError(f"{source}: {culprit} has no '{key}'")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4):
            return DatasetError(f"{source}: {culprit} has bbox {bbox!r}, expected [x, y, w, h]")
        for key in ("id", "image_id", "category_id"):
            if not isinstance(ann[key], int):
                return DatasetError(f"{source}: {culprit} has a non-integer {key} {ann[key]!r}")
    return DatasetError(f"{source}: unreadable annotations")
