"""A converted dataset as COCO instances JSON, the format `CocoDetection` reads.

Image ids are 1..N in the dataset's image order and annotation ids 1..M; `bbox` is [x, y, w, h]
in image pixels, `area` is w * h, and ignore regions (VOC `difficult`) have `iscrowd: 1`. Every
image is listed, including the ones without objects.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from retinanet.files import atomic_write_json

from .records import ConvertedDataset


def to_coco(dataset: ConvertedDataset) -> dict[str, Any]:
    """The COCO instances dict (`images`, `annotations`, `categories`) of `dataset`."""
    images, annotations = [], []
    for image_id, record in enumerate(dataset.images, start=1):
        width, height = int(record.width), int(record.height)
        images.append(
            {"id": image_id, "file_name": record.file_name, "width": width, "height": height}
        )
        xywh = np.concatenate(
            [record.boxes[:, :2], record.boxes[:, 2:] - record.boxes[:, :2]], axis=1
        )
        # .tolist() gives plain Python numbers, which json writes without numpy types.
        for box, category_id, crowd in zip(
            xywh.tolist(), record.category_ids.tolist(), record.iscrowd.tolist(), strict=True
        ):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": int(crowd),
                }
            )
    categories = [{"id": cid, "name": name} for cid, name in dataset.categories]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_coco(path: str | os.PathLike, dataset: ConvertedDataset) -> dict[str, Any]:
    """Write `to_coco(dataset)` to `path` atomically (a crash leaves any previous file intact)
    and return it."""
    coco = to_coco(dataset)
    atomic_write_json(path, coco, indent=None)
    return coco
