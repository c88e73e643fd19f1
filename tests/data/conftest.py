"""Hand-made COCO-format datasets written to tmp_path."""

import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

# Deliberately unsorted, non-contiguous ids: labels follow increasing id (3, 7, 12).
CATEGORIES = [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 12, "name": "bird"}]


@pytest.fixture
def write_coco(tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    """write_coco(sizes, annotations, categories=CATEGORIES) -> (image_dir, annotation_file).

    sizes: {image_id: (height, width)}; image `id` is written as `img{id}.png` with seeded random
    pixels (so images differ and resampling is visible).
    """

    def write(
        sizes: dict[int, tuple[int, int]],
        annotations: list[dict],
        categories: list[dict] | None = None,
    ) -> tuple[Path, Path]:
        image_dir = tmp_path / "images"
        image_dir.mkdir(exist_ok=True)
        images = []
        for image_id, (height, width) in sizes.items():
            pixels = np.random.default_rng(image_id).integers(0, 256, (height, width, 3))
            cv2.imwrite(str(image_dir / f"img{image_id}.png"), pixels.astype(np.uint8))
            images.append(
                {
                    "id": image_id,
                    "file_name": f"img{image_id}.png",
                    "width": width,
                    "height": height,
                }
            )
        annotation_file = tmp_path / "instances.json"
        data = {
            "images": images,
            "annotations": annotations,
            "categories": CATEGORIES if categories is None else categories,
        }
        annotation_file.write_text(json.dumps(data))
        return image_dir, annotation_file

    return write
