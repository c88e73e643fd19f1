import math
import time
import warnings

import numpy as np
import pytest

from retinanet.data.coco import CocoDetection
from retinanet.data.shapes import (
    SHAPE_NAMES,
    ObjectSampling,
    ensure_shapes_dataset,
    render_shapes_image,
    shape_polygons,
)

SMALL = {"num_train": 6, "num_val": 3, "image_size": 64, "seed": 1}


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path):
    ensure_shapes_dataset(tmp_path / "a", **SMALL)
    ensure_shapes_dataset(tmp_path / "b", **SMALL)
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len([f for f in files_a if f.endswith(".png")]) == 9
    assert files_a == files_b
    ensure_shapes_dataset(tmp_path / "c", **{**SMALL, "seed": 2})
    assert _files(tmp_path / "c")["train/000001.png"] != files_a["train/000001.png"]


def test_regenerates_only_when_absent_interrupted_or_different(tmp_path):
    paths = ensure_shapes_dataset(tmp_path, **SMALL)
    stamp = paths.train_annotation_file.stat().st_mtime_ns
    ensure_shapes_dataset(tmp_path, **SMALL)
    assert paths.train_annotation_file.stat().st_mtime_ns == stamp  # reused

    (tmp_path / "meta.json").unlink()  # as if interrupted before the end
    (paths.val_image_dir / "000001.png").unlink()
    ensure_shapes_dataset(tmp_path, **SMALL)
    assert (paths.val_image_dir / "000001.png").is_file()

    ensure_shapes_dataset(tmp_path, **{**SMALL, "num_val": 4})
    assert len(list(paths.val_image_dir.glob("*.png"))) == 4
    assert not list(tmp_path.glob(".*.partial"))


def test_output_is_a_clean_coco_dataset(tmp_path):
    paths = ensure_shapes_dataset(tmp_path, **{**SMALL, "image_size": (48, 80)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no clipped or degenerate boxes
        ds = CocoDetection(paths.train_image_dir, paths.train_annotation_file)
    assert ds.class_names == list(SHAPE_NAMES) and ds.num_classes >= 5
    item = ds[0]
    assert item["orig_size"] == (48, 80)
    ann = ds.coco.anns[1]
    assert ann.keys() >= {"id", "image_id", "category_id", "bbox", "area", "iscrowd"}
    assert ds.coco.imgs[1] == {"id": 1, "file_name": "000001.png", "width": 80, "height": 48}
    # the PNG on disk holds exactly the rendered pixels
    rendered = render_shapes_image(np.random.default_rng([1, 0, 0]), 48, 80)
    assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), rendered.image)
    np.testing.assert_array_equal(ds.annotations(0)["boxes"], rendered.boxes)


def _render_many(count, size=192, **kwargs):
    return [
        render_shapes_image(np.random.default_rng([7, i]), size, size, **kwargs)
        for i in range(count)
    ]


ONE_OBJECT = ObjectSampling(max_objects=1, empty_fraction=0.0)


def test_counts_classes_sizes_and_overlap_statistics():
    images = _render_many(200)
    counts = np.array([len(r.labels) for r in images])
    assert counts.min() == 0 and counts.max() == 10
    assert 2 <= (counts == 0).sum() <= 25  # about 5 % empty
    labels = np.concatenate([r.labels for r in images])
    assert set(labels.tolist()) == set(range(len(SHAPE_NAMES))) and len(SHAPE_NAMES) >= 5
    boxes = np.concatenate([r.boxes for r in images])
    longest = (boxes[:, 2:] - boxes[:, :2]).max(axis=1)
    assert longest.max() <= 0.5 * 192 + 1  # diameters up to half the side
    assert longest.max() >= 0.4 * 192
    assert longest.min() <= 10  # the smallest objects are ~8 px
    assert (longest <= 32).mean() > 0.3  # log-uniform sizes: small objects are common
    for r in images:
        b = r.boxes
        low = np.maximum(b[:, None, :2], b[None, :, :2])
        high = np.minimum(b[:, None, 2:], b[None, :, 2:])
        inter = np.prod(np.clip(high - low, 0, None), axis=2)
        area = np.prod(b[:, 2:] - b[:, :2], axis=1)
        iou = inter / (area[:, None] + area[None] - inter)
        np.fill_diagonal(iou, 0)
        assert iou.max(initial=0) <= 0.3


def _shoelace(polygon):
    x, y = polygon.T
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def test_boxes_are_tight_around_the_drawn_pixels():
    for r in _render_many(20):
        for i, box in enumerate(r.boxes):
            ys, xs = np.nonzero(r.instance_map == i + 1)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert r.areas[i] == len(xs)
            # later shapes hide at most 30 % of an object; the rasterised shape is never smaller
            # than its outline's area (shoelace formula, minus a ring's hole)
            outline_area = sum(
                sign * _shoelace(p)
                for sign, p in zip((1, -1), shape_polygons(r.shapes[i]), strict=False)
            )
            assert r.areas[i] >= 0.7 * outline_area


def test_single_object_box_matches_its_geometry():
    """Without occluders the box is the extent of the shape's outline, up to a pixel; for
    circles and rings that outline's extent is the circle, for squares it is set by the corners
    at angle + k pi / 2 (closed forms, independent of the rasteriser)."""
    checked = 0
    for r in _render_many(60, size=96, objects=ONE_OBJECT):
        (shape,) = r.shapes
        name = SHAPE_NAMES[shape.label]
        cx, cy, radius = shape.center_x, shape.center_y, shape.radius
        if name in ("circle", "ring"):
            extent = [cx - radius, cy - radius, cx + radius, cy + radius]
        elif name == "square":
            t = shape.angle + np.arange(4) * math.pi / 2
            xs, ys = cx + radius * np.cos(t), cy + radius * np.sin(t)
            extent = [xs.min(), ys.min(), xs.max(), ys.max()]
        else:
            outline = shape_polygons(shape)[0]
            extent = [*outline.min(axis=0), *outline.max(axis=0)]
        # cv2 fills every pixel the outline touches: the box contains the outline (up to the
        # 1/16 px vertex precision) and overhangs it by at most one pixel on each side
        overhang = (np.array(extent) - r.boxes[0]) * [1, 1, -1, -1]
        assert overhang.min() >= -0.1 and overhang.max() <= 1.1
        checked += name in ("circle", "ring", "square")
    assert checked >= 10


def test_ring_has_a_hole():
    for r in _render_many(40, objects=ONE_OBJECT):
        (shape,) = r.shapes
        if SHAPE_NAMES[shape.label] == "ring" and shape.radius > 8:
            assert r.instance_map[round(shape.center_y), round(shape.center_x)] == 0
            return
    pytest.fail("no ring drawn")


def test_generation_is_fast(tmp_path):
    # CPU time of this process, so that other jobs on the machine do not make the test flaky
    start = time.process_time()
    ensure_shapes_dataset(tmp_path, num_train=40, num_val=10, image_size=192)
    per_image = (time.process_time() - start) / 50
    # about 10 ms; 30 ms would already be a minute for 2000 images
    assert per_image < 0.03


def test_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="object sizes"):
        ensure_shapes_dataset(tmp_path, image_size=12)
    with pytest.raises(ValueError, match="num_val"):
        ensure_shapes_dataset(tmp_path, num_val=0)
