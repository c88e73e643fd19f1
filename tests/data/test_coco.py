import json
import warnings

import cv2
import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from retinanet.data.coco import CocoDetection, DatasetError, DatasetWarning
from retinanet.data.transforms import DetectionTransform


def _ann(ann_id, image_id, category_id, bbox, crowd=0):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "iscrowd": crowd,
        "area": float(np.prod(bbox[2:])),
    }


def _load_quietly(*args, **kwargs) -> CocoDetection:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any DatasetWarning here is a test failure
        return CocoDetection(*args, **kwargs)


def test_category_mapping_round_trip(write_coco):
    anns = [_ann(1, 1, 12, [1, 1, 5, 5]), _ann(2, 1, 3, [2, 2, 5, 5]), _ann(3, 1, 7, [3, 3, 5, 5])]
    ds = _load_quietly(*write_coco({1: (20, 30)}, anns))
    assert ds.num_classes == 3
    assert ds.category_ids == [3, 7, 12]
    assert ds.class_names == ["dog", "cat", "bird"]
    assert ds.category_id_to_label == {3: 0, 7: 1, 12: 2}
    labels = ds[0]["labels"]
    assert labels.dtype == torch.int64
    assert labels.tolist() == [2, 0, 1]
    assert [ds.category_ids[label] for label in labels] == [12, 3, 7]


def test_item_contract_and_crowd_boxes_separated(write_coco):
    anns = [_ann(1, 5, 7, [1, 2, 10, 6]), _ann(2, 5, 3, [4, 4, 8, 8], crowd=1)]
    image_dir, annotation_file = write_coco({5: (20, 30)}, anns)
    ds = _load_quietly(image_dir, annotation_file)
    item = ds[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 20, 30)
    bgr = cv2.imread(str(image_dir / "img5.png"))
    assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), bgr[..., ::-1])
    assert item["boxes"].dtype == torch.float32
    assert item["boxes"].tolist() == [[1, 2, 11, 8]]
    assert item["labels"].tolist() == [1]
    assert item["crowd_boxes"].tolist() == [[4, 4, 12, 12]]
    assert item["image_id"] == 5
    assert item["orig_size"] == (20, 30) and item["size"] == (20, 30)


def test_box_outside_image_is_clipped_and_degenerate_dropped_in_one_warning(write_coco):
    anns = [
        _ann(1, 1, 7, [-5, 10, 20, 100]),  # clipped to [0, 10, 15, 20]
        _ann(2, 1, 7, [3, 3, 0.5, 8]),  # w < 1 px: dropped
        _ann(3, 1, 3, [29.5, 3, 5, 8]),  # 0.5 px wide once clipped: dropped
        _ann(4, 1, 3, [2, 2, 4, 4]),  # fine
        _ann(5, 99, 3, [2, 2, 4, 4]),  # image 99 does not exist: skipped
    ]
    with pytest.warns(DatasetWarning) as record:
        ds = CocoDetection(*write_coco({1: (20, 30)}, anns))
    assert len(record) == 1
    message = str(record[0].message)
    assert "instances.json" in message
    assert "clipped 1 boxes" in message and "annotation id 1" in message
    assert "dropped 2 degenerate boxes" in message and "annotation id 2" in message
    assert "skipped 1 annotations" in message and "annotation id 5" in message
    assert ds.annotations(0)["boxes"].tolist() == [[0, 10, 15, 20], [2, 2, 6, 6]]


def test_images_without_annotations_kept_or_filtered(write_coco):
    anns = [_ann(1, 2, 7, [1, 1, 5, 5]), _ann(2, 3, 7, [1, 1, 5, 5], crowd=1)]
    paths = write_coco({1: (10, 10), 2: (10, 12), 3: (12, 10)}, anns)
    kept = _load_quietly(*paths)
    assert kept.image_ids == [1, 2, 3]
    assert kept[0]["boxes"].shape == (0, 4) and kept[0]["labels"].shape == (0,)
    filtered = _load_quietly(*paths, filter_empty=True)
    # an image with only crowd regions has nothing to detect either
    assert filtered.image_ids == [2]
    assert filtered[0]["boxes"].tolist() == [[1, 1, 6, 6]]
    assert filtered.aspect_ratios.tolist() == [1.2]


def test_unknown_category_names_annotation_and_category(write_coco):
    anns = [_ann(1, 1, 7, [1, 1, 5, 5]), _ann(42, 1, 5, [1, 1, 5, 5])]
    with pytest.raises(DatasetError, match=r"annotation id 42 has category_id 5"):
        CocoDetection(*write_coco({1: (10, 10)}, anns))


def test_missing_image_file_named_with_count_and_id(write_coco):
    image_dir, annotation_file = write_coco({1: (10, 10), 2: (10, 10), 3: (10, 10)}, [])
    (image_dir / "img2.png").unlink()
    (image_dir / "img3.png").unlink()
    with pytest.raises(DatasetError, match=r"2 images .* missing") as info:
        CocoDetection(image_dir, annotation_file)
    assert str(image_dir / "img2.png") in str(info.value)
    assert "image id 3" in str(info.value)


def test_unreadable_image_names_file_and_id(write_coco):
    image_dir, annotation_file = write_coco({1: (10, 10)}, [])
    data = json.loads(annotation_file.read_text())
    data["images"].append({"id": 8, "file_name": "broken.jpg", "width": 10, "height": 10})
    annotation_file.write_text(json.dumps(data))
    (image_dir / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg" * 10)
    ds = _load_quietly(image_dir, annotation_file)  # existence is checked, decoding is lazy
    ds[0]
    with pytest.raises(DatasetError, match=r"broken\.jpg \(image id 8\)"):
        ds[1]


def test_image_size_disagreeing_with_json_is_an_error(write_coco):
    image_dir, annotation_file = write_coco({1: (10, 10)}, [])
    data = json.loads(annotation_file.read_text())
    data["images"][0]["width"] = 11
    annotation_file.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"img1\.png \(image id 1\) is 10x10 .* says 11x10"):
        _load_quietly(image_dir, annotation_file)[0]


def test_wrong_paths_are_named(write_coco, tmp_path):
    image_dir, annotation_file = write_coco({1: (10, 10)}, [])
    with pytest.raises(DatasetError, match="annotation file not found: .*nope.json"):
        CocoDetection(image_dir, tmp_path / "nope.json")
    with pytest.raises(DatasetError, match="image folder not found: .*no_images"):
        CocoDetection(tmp_path / "no_images", annotation_file)


def test_malformed_json_and_records_are_named(write_coco, tmp_path):
    image_dir, annotation_file = write_coco({1: (10, 10)}, [])
    bad = tmp_path / "truncated.json"
    bad.write_text(annotation_file.read_text()[:-5])
    with pytest.raises(DatasetError, match="malformed JSON in .*truncated.json"):
        CocoDetection(image_dir, bad)

    data = json.loads(annotation_file.read_text())
    del data["categories"]
    bad.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="truncated.json: missing .* 'categories'"):
        CocoDetection(image_dir, bad)

    for broken, expected in [
        ({"id": 9, "image_id": 1, "category_id": 7}, "annotation id 9 has no 'bbox'"),
        (_ann(10, 1, 7, [1, 2, 3]), r"annotation id 10 has bbox \[1, 2, 3\]"),
        (_ann(11, 1, 7, [1, 2, 3, float("nan")]), "annotation id 11 has a non-finite bbox"),
    ]:
        image_dir, annotation_file = write_coco(
            {1: (10, 10)}, [_ann(1, 1, 7, [1, 1, 2, 2]), broken]
        )
        with pytest.raises(DatasetError, match=expected):
            CocoDetection(image_dir, annotation_file)


def test_transform_scales_boxes_with_the_image(write_coco):
    anns = [_ann(1, 1, 7, [2, 4, 10, 6]), _ann(2, 1, 3, [0, 0, 5, 5], crowd=1)]
    ds = _load_quietly(*write_coco({1: (20, 30)}, anns), transform=DetectionTransform(40, 1000))
    item = ds[0]
    assert item["size"] == (40, 60) and item["image"].shape == (3, 40, 60)
    assert item["orig_size"] == (20, 30)
    assert item["boxes"].tolist() == [[4, 8, 24, 20]]
    assert item["crowd_boxes"].tolist() == [[0, 0, 10, 10]]
    assert ds[(0, 123)]["boxes"].tolist() == [[4, 8, 24, 20]]  # no random op configured


def test_tiny_coco_matches_pycocotools(coco_tiny_dir):
    annotation_file = coco_tiny_dir / "annotations" / "instances_val2017.json"
    ds = _load_quietly(coco_tiny_dir / "val2017", annotation_file)
    reference = COCO(str(annotation_file))
    assert ds.image_ids == sorted(reference.getImgIds())
    assert ds.category_ids == sorted(reference.getCatIds())
    assert ds.num_classes == 80 and ds.class_names[0] == "person"
    num_crowd = 0
    for index, image_id in enumerate(ds.image_ids):
        anns = reference.loadAnns(reference.getAnnIds(imgIds=image_id))
        objects = [a for a in anns if not a["iscrowd"]]
        num_crowd += len(anns) - len(objects)
        expected = np.array([a["bbox"] for a in objects], dtype=np.float64).reshape(-1, 4)
        expected[:, 2:] += expected[:, :2]
        got = ds.annotations(index)
        np.testing.assert_allclose(got["boxes"], expected, atol=1e-4)
        assert [ds.category_ids[label] for label in got["labels"]] == [
            a["category_id"] for a in objects
        ]
        assert len(got["crowd_boxes"]) == len(anns) - len(objects)
    assert num_crowd > 0
    empty = [i for i in ds.image_ids if not reference.getAnnIds(imgIds=i, iscrowd=False)]
    assert len(empty) == 2
    filtered = _load_quietly(coco_tiny_dir / "val2017", annotation_file, filter_empty=True)
    assert filtered.image_ids == [i for i in ds.image_ids if i not in empty]
    # decoding: RGB pixels as stored, at the size the JSON gives
    item = ds[0]
    info = reference.imgs[ds.image_ids[0]]
    assert item["orig_size"] == (info["height"], info["width"])
    bgr = cv2.imread(str(coco_tiny_dir / "val2017" / info["file_name"]))
    assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), bgr[..., ::-1])
    # the evaluation object holds every ground-truth annotation
    assert len(ds.coco.anns) == len(reference.anns)
