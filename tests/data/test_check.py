"""`retinanet check-dataset`: every image decoded and every annotation checked by the loader's
rules, all problems listed, exit status 0 (clean) or 1."""

import json
import math
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from retinanet.cli import main as cli
from retinanet.data import coco
from retinanet.data.check import check_dataset
from retinanet.data.coco import CocoDetection, DatasetError, ImageError, decode_image

REPO = Path(__file__).resolve().parents[2]


def _ann(ann_id, image_id, bbox, category_id=1):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox}


def _pixels(seed, height, width):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.uint8)


def write_faulty_dataset(root: Path) -> tuple[Path, Path]:
    """Five images: img1.png and img2.jpg fine, img3.jpg cut to half its bytes, img4.png not on
    disk, img5.png 12x10 on disk but 10x12 in the JSON; annotation 3 has a NaN width, annotation
    4 a box that reaches past its image (a repair, not an error)."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True)
    cv2.imwrite(str(image_dir / "img1.png"), _pixels(1, 20, 30))
    cv2.imwrite(str(image_dir / "img2.jpg"), _pixels(2, 24, 32))
    ok, jpeg = cv2.imencode(".jpg", _pixels(3, 64, 64), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    (image_dir / "img3.jpg").write_bytes(jpeg.tobytes()[: len(jpeg) // 2])
    cv2.imwrite(str(image_dir / "img5.png"), _pixels(5, 10, 12))  # (H, W) = (10, 12)
    images = [
        {"id": 1, "file_name": "img1.png", "width": 30, "height": 20},
        {"id": 2, "file_name": "img2.jpg", "width": 32, "height": 24},
        {"id": 3, "file_name": "img3.jpg", "width": 64, "height": 64},
        {"id": 4, "file_name": "img4.png", "width": 8, "height": 8},
        {"id": 5, "file_name": "img5.png", "width": 10, "height": 12},
    ]
    annotations = [
        _ann(1, 1, [1, 1, 10, 10]),
        _ann(2, 2, [2, 2, 5, 5], category_id=2),
        _ann(3, 1, [3, 3, float("nan"), 4]),
        _ann(4, 2, [20, 20, 30, 10]),
    ]
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    annotation_file = root / "instances.json"
    annotation_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return image_dir, annotation_file


EXPECTED_ERRORS = [  # (kind, code, id, file_name), in report order
    ("image", "truncated", 3, "img3.jpg"),
    ("image", "missing", 4, "img4.png"),
    ("image", "size_mismatch", 5, "img5.png"),
    ("annotation", "non_finite_bbox", 3, None),
]


def test_faulty_dataset_lists_every_problem_and_exits_1(tmp_path, capsys):
    image_dir, annotation_file = write_faulty_dataset(tmp_path / "data")
    report_path = tmp_path / "out" / "report.json"
    argv = ["check-dataset", "--images", str(image_dir), "--annotations", str(annotation_file)]
    assert cli([*argv, "--workers", "3", "--output", str(report_path)]) == 1

    report = json.loads(report_path.read_text())
    assert report["passed"] is False
    (dataset,) = report["datasets"]
    assert dataset["split"] is None
    assert dataset["num_images"] == 5 and dataset["num_annotations"] == 4
    assert dataset["num_decoded"] == 2  # img1.png, img2.jpg
    errors = [p for p in dataset["problems"] if p["severity"] == "error"]
    got = [(p["kind"], p["code"], p["id"], p["file_name"]) for p in errors]
    assert got == EXPECTED_ERRORS
    repairs = [(p["kind"], p["code"], p["id"]) for p in dataset["problems"] if p not in errors]
    assert repairs == [("annotation", "clipped_box", 4)]
    assert (dataset["num_errors"], dataset["num_repairs"]) == (4, 1)
    assert list(report_path.parent.iterdir()) == [report_path]  # no temporary file left

    out = capsys.readouterr().out
    assert "4 errors, 1 repairs" in out and out.rstrip().endswith("FAILED")
    for line in (
        f"error: image {image_dir / 'img3.jpg'} (image id 3) is truncated",
        f"error: image {image_dir / 'img4.png'} (image id 4) is missing",
        f"error: image {image_dir / 'img5.png'} (image id 5) is 12x10 pixels but",
        "error: annotation id 3 has a non-finite bbox [3, 3, nan, 4]",
        "repair: annotation id 4 has a box partly outside its image: clipped",
    ):
        assert line in out, line


def test_report_does_not_depend_on_the_number_of_threads(tmp_path):
    image_dir, annotation_file = write_faulty_dataset(tmp_path)
    one = check_dataset(image_dir, annotation_file, workers=1).problems
    many = check_dataset(image_dir, annotation_file, workers=4).problems
    assert one == many and len(one) == 5


def test_loader_refuses_what_the_check_reports(tmp_path):
    """One set of rules: the loader raises on the first error the check lists, and reading the
    truncated JPEG (which OpenCV 4 decodes, padded with grey) fails in the loader too."""
    image_dir, annotation_file = write_faulty_dataset(tmp_path)
    with pytest.raises(DatasetError, match=r"instances\.json: annotation id 3 has a non-finite"):
        CocoDetection(image_dir, annotation_file)

    data = json.loads(annotation_file.read_text())
    data["annotations"] = data["annotations"][:2]
    data["images"] = data["images"][:3]  # img1, img2 and the truncated img3
    annotation_file.write_text(json.dumps(data))
    dataset = CocoDetection(image_dir, annotation_file)
    assert dataset[1]["image_id"] == 2
    with pytest.raises(ImageError, match=r"img3\.jpg \(image id 3\) is truncated") as info:
        dataset[2]
    assert info.value.code == "truncated"


def test_truncation_is_found_whatever_the_decoder_does(tmp_path, monkeypatch):
    ok, jpeg = cv2.imencode(".jpg", _pixels(3, 64, 64))
    assert ok
    # An end-of-image marker inside an APPn segment (as in an EXIF thumbnail) is not the end.
    payload = b"XMP\x00\xff\xd8thumbnail\xff\xd9"
    segment = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    data = jpeg.tobytes()[:2] + segment + jpeg.tobytes()[2:]
    complete, cut = tmp_path / "complete.jpg", tmp_path / "cut.jpg"
    complete.write_bytes(data + b"\x00" * 5000)  # bytes after the end marker are fine
    cut.write_bytes(data[:-300])
    assert decode_image(complete, 1, (64, 64)).shape == (64, 64, 3)
    with pytest.raises(ImageError, match=r"cut\.jpg \(image id 2\) is truncated"):
        decode_image(cut, 2, (64, 64))

    ok, png = cv2.imencode(".png", _pixels(4, 16, 16))
    (tmp_path / "cut.png").write_bytes(png.tobytes()[:-12])  # without the IEND chunk
    # OpenCV 4 decodes cut-short files, filling in grey: the rule must not rely on a failure.
    monkeypatch.setattr(coco.cv2, "imdecode", lambda *args: np.zeros((64, 64, 3), np.uint8))
    for name in ("cut.jpg", "cut.png"):
        with pytest.raises(ImageError, match="is truncated") as info:
            decode_image(tmp_path / name, 3)
        assert info.value.code == "truncated"
        # Callers that catch it get the image without parsing the message.
        assert (info.value.image_id, info.value.path) == (3, str(tmp_path / name))
    assert decode_image(complete, 1).shape == (64, 64, 3)
    with pytest.raises(ImageError) as info:
        decode_image(tmp_path / "gone.jpg", 5)
    assert (info.value.code, info.value.image_id) == ("missing", 5)


def test_clean_dataset_exits_0_and_repairs_fail_only_when_strict(write_coco, tmp_path, capsys):
    image_dir, annotation_file = write_coco(
        {1: (20, 30), 2: (16, 16)},
        [_ann(1, 1, [1, 1, 5, 5], category_id=7), _ann(2, 2, [0, 0, 16, 16], category_id=3)],
    )
    argv = ["check-dataset", "--images", str(image_dir), "--annotations", str(annotation_file)]
    assert cli(argv) == 0
    assert capsys.readouterr().out.rstrip().endswith("passed")

    data = json.loads(annotation_file.read_text())
    data["annotations"][1]["bbox"] = [0, 0, 17, 16]  # one pixel past the image
    annotation_file.write_text(json.dumps(data))
    assert cli(argv) == 0
    assert cli([*argv, "--strict"]) == 1
    assert "repair: annotation id 2 has a box partly outside" in capsys.readouterr().out


def test_unusable_annotation_file_is_a_problem_not_a_crash(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    report_path = tmp_path / "report.json"
    argv = ["check-dataset", "--images", str(tmp_path / "images"), "--annotations", str(broken)]
    assert cli([*argv, "--output", str(report_path)]) == 1
    problems = json.loads(report_path.read_text())["datasets"][0]["problems"]
    assert [(p["kind"], p["code"]) for p in problems] == [("file", "annotation_file")]
    assert "malformed JSON in" in problems[0]["message"]
    assert "error: malformed JSON in" in capsys.readouterr().out

    # usage errors end in the shared "error: ..." line
    assert cli(["check-dataset", "--images", str(tmp_path)]) == 1
    assert "give --config, or both --images and --annotations" in capsys.readouterr().err


def test_config_splits_of_the_synthetic_dataset(tmp_path):
    report_path = tmp_path / "report.json"
    overrides = [
        f"data.synthetic.root={tmp_path / 'shapes'}",
        "data.synthetic.num_train=4",
        "data.synthetic.num_val=2",
        "data.synthetic.image_size=48",
    ]
    config = str(REPO / "configs" / "shapes.yaml")
    assert cli(["check-dataset", "--config", config, "--output", str(report_path), *overrides]) == 0
    report = json.loads(report_path.read_text())
    assert report["passed"] is True
    assert [(d["split"], d["num_decoded"], d["problems"]) for d in report["datasets"]] == [
        ("train", 4, []),
        ("val", 2, []),
    ]
    assert cli(["check-dataset", "--config", config, "--split", "val", *overrides]) == 0


def test_tiny_coco_is_clean(coco_tiny_dir):
    annotation_file = coco_tiny_dir / "annotations" / "instances_val2017.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = check_dataset(coco_tiny_dir / "val2017", annotation_file, workers=2)
    assert report.problems == []
    assert (report.num_images, report.num_decoded) == (50, 50)
    assert (report.num_annotations, report.num_categories) == (382, 80)
    assert report.passed(strict=True)
    assert math.isfinite(report.seconds)
